"""The secure aggregation benchmark must keep running: its --quick mode, end to end, with the same model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "secagg.py"


def test_quick_secagg_benchmark_runs_and_matches_fedavg() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split("|") for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [4, 8], out.stdout
    for r in rows:
        plain_s, secure_s, ratio, plain_mb, secure_mb, bytes_ratio, diff = (float(c) for c in r[1:])
        assert plain_s > 0 and secure_s > 0
        # the printed seconds are rounded to 1 ms, so the recomputed ratio is only that precise
        slack = ratio * (0.0006 / plain_s + 0.0006 / secure_s) + 0.01
        assert abs(ratio - secure_s / plain_s) < slack
        assert secure_mb >= plain_mb > 0 and bytes_ratio >= 1.0
        assert diff < 1e-5  # the secure model is FedAvg's up to quantization
