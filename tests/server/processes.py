"""Real ``fedloom`` processes for end-to-end tests: launch them with logs, wait with a deadline, show the logs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """``python -m fedloom.cli *args``, its output appended to ``log`` (a restarted server keeps one log)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}  # several processes share the cores
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fedloom.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)


def finish(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes within one shared deadline; a process still running then is killed and counts as None."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append(None)
    return codes


def logs(tmp_path: Path) -> str:
    """The tail of every log under ``tmp_path``, for assertion messages."""
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
