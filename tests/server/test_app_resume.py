"""`fedloom server --resume`: the run directory is reconciled with the saved state; foreign states are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedloom.fleet import InProcessFleet
from fedloom.rundir import RunDir, load_model
from fedloom.server import app, runstate
from fedloom.server.driver import Driver, RunConfig
from fedloom.strategies import fedavg
from fedloom.tensors import NamedTensors


class Plus:
    def fit(self, weights, config):
        return weights.map(lambda a: a + 1), 1, {"loss": 0.5}

    def evaluate(self, weights, config):
        return 1, {}


def _state_after(rounds: int, run_dir: Path) -> runstate.RunState:
    initial = NamedTensors({"w": np.zeros(3, np.float32)})
    driver = Driver(InProcessFleet({"a": Plus()}), fedavg(), initial, RunConfig(rounds=rounds), checkpoint_dir=run_dir)
    driver.run()
    return runstate.load(run_dir)


def test_reconcile_rewrites_metrics_and_model_from_the_state_and_drops_torn_files(tmp_path: Path) -> None:
    saved = _state_after(2, tmp_path)
    out = RunDir(tmp_path)
    out.record(saved.records[0], saved.weights.map(lambda a: a * 0 + 1))  # as a crash after round 2's state left it
    (tmp_path / ".state.safetensors.crash").write_bytes(b"torn")
    (tmp_path / ".model.safetensors.abc123").write_bytes(b"torn")
    app.reconcile(out, saved)
    assert [r["round"] for r in out.records()] == [1, 2]
    assert out.records()[1] == json.loads(json.dumps(saved.records[1].to_json()))
    np.testing.assert_array_equal(load_model(tmp_path / "model.safetensors")["w"], np.full(3, 2, np.float32))
    assert not list(tmp_path.glob(".*.safetensors.*"))


def _serve(run_dir: Path, seed: int):
    return app.serve(address="127.0.0.1:0", rounds=3, min_clients=1, fraction=1.0, min_results=1, round_timeout=5,
                     wait_timeout=0, seed=seed, fit_config={}, run_dir=run_dir, resume=True)


def test_resume_refuses_a_missing_state(tmp_path: Path) -> None:
    with pytest.raises(runstate.StateError, match="no run state"):
        _serve(tmp_path / "nothing", seed=0)


def test_resume_refuses_a_state_of_another_run(tmp_path: Path) -> None:
    _state_after(1, tmp_path)  # another model (w: float32[3]) than the server's digits CNN
    with pytest.raises(runstate.StateError, match="refusing to resume"):
        _serve(tmp_path, seed=0)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before touching the run directory
