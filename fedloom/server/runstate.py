"""The run state, saved atomically after every round so a coordinator can resume.

One ``state.safetensors`` file holds the global weights, every array of the
strategy and sampler state, and (in its metadata) the JSON skeleton of that
state, the round number and the history. Nothing is pickled: the skeleton
knows dicts, lists, tuples, numbers, strings, None, numpy arrays and the
frozen dataclasses of ``fedloom`` itself, and nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedloom.rundir import atomic_write
from fedloom.tensors import DTYPES, NamedTensors
from fedloom.types import RoundRecord

STATE = "state.safetensors"
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class RunState:
    round: int
    weights: NamedTensors
    strategy: Any
    sampler: Any
    records: tuple[RoundRecord, ...]
    fingerprint: str = ""  # what the run was started with; a resume must match it
    watch: Any = None  # early stopping and best-model state


class StateError(ValueError):
    """A state file that cannot be read back, or belongs to another run."""


def _encode(obj: Any, arrays: dict[str, np.ndarray], path: str) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype == DTYPES["bfloat16"]:
            arrays[path] = obj.view(np.uint16)
            return {"__array__": path, "bf16": True}
        arrays[path] = np.ascontiguousarray(obj)
        return {"__array__": path}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"state at {path!r}: only string keys can be saved")
        return {"__dict__": {k: _encode(v, arrays, f"{path}/{k}") for k, v in obj.items()}}
    if isinstance(obj, list | tuple):
        items = [_encode(v, arrays, f"{path}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        if not cls.__module__.startswith("fedloom."):
            raise TypeError(f"state at {path!r}: {cls.__qualname__} is not a fedloom type")
        fields = {f.name: _encode(getattr(obj, f.name), arrays, f"{path}/{f.name}") for f in dataclasses.fields(obj)}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"state at {path!r}: cannot save a {type(obj).__name__}")


def _decode(node: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(node, list):
        return [_decode(v, arrays) for v in node]
    if not isinstance(node, dict):
        return node
    if "__array__" in node:
        array = arrays[node["__array__"]]
        return array.view(DTYPES["bfloat16"]) if node.get("bf16") else array
    if "__dict__" in node:
        return {k: _decode(v, arrays) for k, v in node["__dict__"].items()}
    if "__tuple__" in node:
        return tuple(_decode(v, arrays) for v in node["__tuple__"])
    if "__dataclass__" in node:
        module, _, qualname = node["__dataclass__"].partition(":")
        if not module.startswith("fedloom."):
            raise StateError(f"state names a foreign type {node['__dataclass__']!r}")
        cls: Any = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        return cls(**{k: _decode(v, arrays) for k, v in node["fields"].items()})
    raise StateError(f"unreadable state node with keys {sorted(node)[:5]}")


def save(run_dir: str | Path, state: RunState) -> Path:
    """Write the run state atomically; a crash mid-write keeps the previous file."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    path = Path(run_dir) / STATE
    arrays: dict[str, np.ndarray] = {}
    weights = _encode(dict(state.weights), arrays, "weights")
    tree = {"strategy": _encode(state.strategy, arrays, "strategy"),
            "sampler": _encode(state.sampler, arrays, "sampler"), "watch": _encode(state.watch, arrays, "watch")}
    meta = {
        "format": str(FORMAT),
        "round": str(state.round),
        "order": json.dumps(list(state.weights)),
        "weights": json.dumps(weights),
        "tree": json.dumps(tree),
        "records": json.dumps([_record_json(r) for r in state.records]),
        "fingerprint": state.fingerprint,
    }
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=meta))
    return path


def load(run_dir: str | Path) -> RunState:
    path = Path(run_dir) / STATE
    if not path.exists():
        raise StateError(f"no run state at {path}; was the run started with this --run-dir?")
    from safetensors import safe_open

    try:
        arrays = load_file(str(path))
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        if meta.get("format") != str(FORMAT):
            raise StateError(f"{path}: unsupported state format {meta.get('format')!r}")
        weights = _decode(json.loads(meta["weights"]), arrays)
        tree = json.loads(meta["tree"])
        records = tuple(_record_from(r) for r in json.loads(meta["records"]))
        order = json.loads(meta["order"])
        return RunState(int(meta["round"]), NamedTensors((n, weights[n]) for n in order),
                        _decode(tree["strategy"], arrays), _decode(tree["sampler"], arrays), records,
                        meta.get("fingerprint", ""), _decode(tree.get("watch"), arrays))
    except StateError:
        raise
    except Exception as exc:
        raise StateError(f"{path} is not a readable fedloom run state: {exc}") from exc


def _record_json(r: RoundRecord) -> dict:
    return {"round": r.round, "metrics": dict(r.metrics), "num_results": r.num_results,
            "failures": dict(r.failures), "seconds": r.seconds, "best": r.best, "stopped": r.stopped}


def _record_from(d: dict) -> RoundRecord:
    return RoundRecord(int(d["round"]), d["metrics"], int(d["num_results"]), d["failures"], float(d["seconds"]),
                       bool(d.get("best", False)), str(d.get("stopped", "")))
