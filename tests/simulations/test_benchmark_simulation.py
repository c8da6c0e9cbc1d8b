"""``benchmarks/simulation.py --quick --no-flower`` runs end to end and reports every system."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "simulation.py"


@pytest.mark.slow
def test_quick_benchmark_without_flower(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-flower", "--rounds", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["system"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"raw", "fedloom"}
    for row in rows.values():
        assert "error" not in row, row
        assert len(row["rounds"]) == 2 and row["round_s"] > 0 and row["pss_mib"] > 0
        assert 0.0 <= row["accuracy"] <= 1.0
    assert rows["raw"]["x_raw"] == 1.0
    assert rows["fedloom"]["actors"] >= 1 and rows["fedloom"]["startup"] > 0
    assert "fedloom" in proc.stdout and "round s" in proc.stdout
