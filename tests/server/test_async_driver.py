"""The asynchronous (FedBuff) driver and its pieces, with hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom import InProcessFleet, NamedTensors, RunConfig
from fedloom.server.async_driver import AsyncDriver, rebase
from fedloom.strategies import Update, fedavg
from fedloom.strategies.asynchronous import fedbuff, server_lr, staleness_scaling
from fedloom.strategies.pipeline import RoundInfo


class Shift:
    """Returns the weights it got plus ``shift``; ``fail`` makes it raise."""

    def __init__(self, shift: float = 1.0, fail: bool = False):
        self.shift, self.fail = shift, fail

    def fit(self, weights, config):
        if self.fail:
            raise RuntimeError("boom")
        return NamedTensors({n: a + self.shift for n, a in weights.items()}), 1, {"seen": float(weights["w"][0])}

    def evaluate(self, weights, config):
        return 1, {}


W0 = NamedTensors({"w": np.zeros(3, np.float32)})


def test_rebase_applies_a_stale_delta_to_the_current_model() -> None:
    start = NamedTensors({"w": np.array([1.0, 1.0], np.float32), "k": np.array([5], np.int64)})
    update = NamedTensors({"w": np.array([2.0, 0.5], np.float32), "k": np.array([7], np.int64)})
    current = NamedTensors({"w": np.array([10.0, 20.0], np.float32), "k": np.array([6], np.int64)})
    out = rebase(current, start, update)
    np.testing.assert_array_equal(out["w"], [11.0, 19.5])
    np.testing.assert_array_equal(out["k"], [8])
    assert out["w"].dtype == np.float32 and out["k"].dtype == np.int64


@pytest.mark.parametrize(
    ("staleness", "exponent", "expected"), [(0, 0.5, 4.0), (3, 0.5, 3.0), (8, 0.5, 2.0 + 2.0 / 3.0), (1, 1.0, 3.0)]
)
def test_staleness_scaling_shrinks_the_delta(staleness: int, exponent: float, expected: float) -> None:
    # global 2, update 4: delta 2, scaled by (1 + s) ** -exponent
    glob = NamedTensors({"w": np.array([2.0], np.float32)})
    update = Update("n", NamedTensors({"w": np.array([4.0], np.float32)}), 1, staleness=staleness)
    piece = staleness_scaling(exponent=exponent)
    out, _ = piece.apply(piece.init(glob), update, glob)
    np.testing.assert_allclose(out.weights["w"], [expected])


def test_server_lr_moves_part_of_the_way() -> None:
    glob = NamedTensors({"w": np.array([0.0, 10.0], np.float32)})
    agg = NamedTensors({"w": np.array([4.0, 14.0], np.float32)})
    out, _ = server_lr(0.5).apply(None, glob, agg, RoundInfo(1, 2, 2.0))
    np.testing.assert_allclose(out["w"], [2.0, 12.0])


@pytest.mark.parametrize("workers", [1, 4])
def test_each_server_update_adds_the_mean_shift(workers: int) -> None:
    # exponent 0: staleness does not shrink deltas, so every version adds exactly 1
    fleet = InProcessFleet({str(i): Shift() for i in range(6)}, workers=workers)
    strategy = fedbuff(buffer_size=2, concurrency=3, staleness_exponent=0.0)
    history = AsyncDriver(fleet, strategy, W0, RunConfig(rounds=5, seed=1)).run()
    assert [r.round for r in history.rounds] == [1, 2, 3, 4, 5]
    assert all(r.num_results == 2 for r in history.rounds)
    np.testing.assert_allclose(history.weights["w"], np.full(3, 5.0))


def test_failing_clients_are_recorded_and_updates_continue() -> None:
    trainers = {"ok1": Shift(), "ok2": Shift(), "bad": Shift(fail=True)}
    history = AsyncDriver(InProcessFleet(trainers), fedbuff(buffer_size=2, concurrency=3, staleness_exponent=0.0),
                          W0, RunConfig(rounds=3)).run()
    assert len(history.rounds) == 3
    reasons = [v for r in history.rounds for v in r.failures.values()]
    assert reasons and all("boom" in v for v in reasons)
    np.testing.assert_allclose(history.weights["w"], np.full(3, 3.0))


def test_async_driver_refuses_a_synchronous_strategy() -> None:
    with pytest.raises(ValueError, match="synchronous"):
        AsyncDriver(InProcessFleet({"a": Shift()}), fedavg(), W0, RunConfig(rounds=1))


def test_make_driver_picks_by_strategy() -> None:
    from fedloom.server.async_driver import make_driver
    from fedloom.server.driver import Driver

    fleet = InProcessFleet({"a": Shift()})
    assert isinstance(make_driver(fleet, fedavg(), W0, RunConfig(rounds=1)), Driver)
    assert isinstance(make_driver(fleet, fedbuff(), W0, RunConfig(rounds=1), evaluate=None), AsyncDriver)
    with pytest.raises(ValueError, match="does not support checkpoint_dir"):
        make_driver(fleet, fedbuff(), W0, RunConfig(rounds=1), checkpoint_dir="x")
