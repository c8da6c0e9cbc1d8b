"""The run directory: ``metrics.jsonl`` (a line per round) and ``model.safetensors``.

Files are replaced atomically (write to a temporary file, fsync, rename), so a
crash never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from fedloom.tensors import NamedTensors
from fedloom.types import RoundRecord

MODEL = "model.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.jsonl"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(path: Path, weights: NamedTensors) -> None:
    from safetensors.torch import save_file  # torch only when a model is written: the coordinator starts lean

    tensors = {k: v.contiguous() for k, v in weights.to_torch().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"order": json.dumps(list(weights))}))


def load_model(path: str | Path) -> NamedTensors:
    """Read a safetensors model, keeping the parameter order it was saved in when recorded."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    order = json.loads(meta["order"]) if "order" in meta else list(state)
    return NamedTensors.from_torch({k: state[k] for k in order})


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def record(self, record: RoundRecord, weights: NamedTensors) -> None:
        """Model first, then its metrics line: a crash in between leaves a model one round ahead."""
        save_model(self.path / MODEL, weights)
        if record.best:
            save_model(self.path / BEST, weights)
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict]:
        p = self.path / METRICS
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
