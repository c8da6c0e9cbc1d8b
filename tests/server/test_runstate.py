"""Run state: saved atomically, read back exactly, and a resumed run ends bit-identical."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom import Driver, InProcessFleet, NamedTensors, RunConfig, fedavg
from fedloom.server import runstate
from fedloom.strategies.asynchronous import Asynchronous
from fedloom.strategies.scaffold import scaffold
from fedloom.tensors import DTYPES


class Noisy:
    """A trainer whose update depends on the round's seeded numpy RNG (as real training does)."""

    def fit(self, weights, config):
        noise = np.random.standard_normal(weights["w"].shape).astype(np.float32)
        out = {"w": weights["w"] + noise, **{n: a for n, a in weights.items() if n != "w"}}
        if "scaffold.c/w" in weights:
            out = {"w": out["w"], "scaffold.dc/w": noise}
        return NamedTensors(out), 1 + int(abs(noise[0]) * 10), {"loss": float(noise[0])}

    def evaluate(self, weights, config):
        return 1, {}


INITIAL = NamedTensors({"w": np.zeros(4, np.float32)})


def _driver(strategy, tmp_path, rounds: int = 6) -> Driver:
    fleet = InProcessFleet({f"n{i}": Noisy() for i in range(5)})
    return Driver(fleet, strategy, INITIAL, RunConfig(rounds=rounds, fraction=0.6, seed=11), checkpoint_dir=tmp_path)


@pytest.mark.parametrize("make", [fedavg, scaffold])
def test_resume_from_any_round_ends_bit_identical(tmp_path, make) -> None:
    straight = _driver(make(), tmp_path / "a").run()
    for stop in (1, 3, 5):
        first = _driver(make(), tmp_path / f"b{stop}", rounds=stop)
        first.run()
        resumed = _driver(make(), tmp_path / f"c{stop}")
        resumed.restore(runstate.load(tmp_path / f"b{stop}"))
        history = resumed.run()
        assert history.weights.equal(straight.weights), f"stopped after round {stop}"
        assert [r.metrics for r in history.rounds] == [r.metrics for r in straight.rounds]


def test_state_round_trip_of_nested_values(tmp_path) -> None:
    tree = {"a": [np.arange(3), (1, 2.5, None, "x")], "b": {"c": np.ones((2, 2), DTYPES["bfloat16"]), "t": True},
            "d": Asynchronous(buffer_size=3, concurrency=4)}
    saved = runstate.RunState(3, INITIAL, tree, {"n0": {"examples": 2.0}}, ())
    runstate.save(tmp_path, saved)
    back = runstate.load(tmp_path)
    assert back.round == 3 and back.weights.equal(INITIAL) and back.sampler == {"n0": {"examples": 2.0}}
    np.testing.assert_array_equal(back.strategy["a"][0], np.arange(3))
    assert back.strategy["a"][1] == (1, 2.5, None, "x") and back.strategy["d"] == Asynchronous(3, 4)
    assert back.strategy["b"]["c"].dtype == DTYPES["bfloat16"] and back.strategy["b"]["t"] is True


def test_refuses_foreign_objects_and_bad_files(tmp_path) -> None:
    with pytest.raises(TypeError, match="cannot save"):
        runstate.save(tmp_path, runstate.RunState(0, INITIAL, object(), {}, ()))
    with pytest.raises(runstate.StateError, match="no run state"):
        runstate.load(tmp_path / "missing")
    (tmp_path / runstate.STATE).write_bytes(b"\x00garbage")
    with pytest.raises(runstate.StateError, match="not a readable"):
        runstate.load(tmp_path)


def test_resume_with_another_seed_is_refused(tmp_path) -> None:
    _driver(fedavg(), tmp_path / "a", rounds=1).run()
    other = Driver(InProcessFleet({"n0": Noisy()}), fedavg(), INITIAL, RunConfig(rounds=2, seed=12))
    with pytest.raises(runstate.StateError, match="refusing to resume"):
        other.restore(runstate.load(tmp_path / "a"))
