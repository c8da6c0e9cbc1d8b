"""The transport benchmark must keep running: its --quick mode, end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "transport.py"


@pytest.mark.slow
def test_quick_transport_benchmark_runs_and_moves_correct_weights() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if "MB model" in line]
    assert [int(line.split()[0]) for line in lines] == [2, 4], out.stdout
    assert all("weights ok" in line for line in lines), out.stdout
    rates = [float(m) for m in re.findall(r"\| +([0-9.]+) GB/s", out.stdout)]
    assert len(rates) == 4 and all(r > 0 for r in rates), out.stdout  # fedloom and the plain-gRPC floor
    floors = [line for line in out.stdout.splitlines() if "plain gRPC streams" in line]
    assert len(floors) == 2 and all(re.search(r"reaches [0-9.]+x of it", line) for line in floors), out.stdout
