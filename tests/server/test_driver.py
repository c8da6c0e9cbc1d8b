"""The round driver over the in-process fleet, with tiny numpy trainers (no torch)."""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

import fedloom.fleet
from fedloom.fleet import InProcessFleet
from fedloom.server.driver import Driver, RunConfig
from fedloom.strategies import fedavg
from fedloom.tensors import NamedTensors
from fedloom.types import Failure, Instruction, Outcome, RoundRecord

INIT = NamedTensors({"w": np.zeros(2, np.float32), "step": np.zeros((), np.int64)})


class Const:
    """Returns fixed weights, example count and loss, whatever it is given."""

    def __init__(self, w, n, loss=0.0, accuracy=0.5):
        self.w, self.n, self.loss, self.accuracy = np.asarray(w, np.float32), n, loss, accuracy
        self.configs: list[dict] = []

    def fit(self, weights, config):
        self.configs.append(dict(config))
        return NamedTensors({"w": self.w.copy(), "step": weights["step"] + 1}), self.n, {"loss": self.loss}

    def evaluate(self, weights, config):
        return self.n, {"accuracy": self.accuracy}


class AddDelta:
    """Adds ``delta`` to the global weights it receives (so rounds chain)."""

    def __init__(self, delta, n=1):
        self.delta, self.n = np.float32(delta), n

    def fit(self, weights, config):
        return NamedTensors({"w": weights["w"] + self.delta, "step": weights["step"] + 1}), self.n, {}

    def evaluate(self, weights, config):
        return self.n, {}


class Raises(Const):
    def fit(self, weights, config):
        raise RuntimeError("disk on fire")


class NaNs(Const):
    def fit(self, weights, config):
        return NamedTensors({"w": np.array([np.nan, 1], np.float32), "step": weights["step"]}), 1000, {}


class Noisy:
    """Uses the global numpy RNG, which execute() seeds from (seed, round, node)."""

    def fit(self, weights, config):
        w = weights["w"] + np.random.standard_normal(2).astype(np.float32)
        return NamedTensors({"w": w, "step": weights["step"]}), 1, {}

    def evaluate(self, weights, config):
        return 1, {}


def _three():
    return {"a": Const([1, 2], 1, loss=1.0), "b": Const([3, 4], 1, loss=2.0), "c": Const([5, 6], 2, loss=3.0)}


def test_fedavg_over_three_trainers_hand_computed():
    trainers = _three()
    hist = Driver(InProcessFleet(trainers), fedavg(), INIT, RunConfig(rounds=1)).run()
    # ([1,2] + [3,4] + 2*[5,6]) / 4 = [14/4, 18/4] = [3.5, 4.5]; step (1+1+2*1)/4 = 1
    assert hist.weights["w"].tolist() == [3.5, 4.5]
    assert hist.weights["w"].dtype == np.float32 and hist.weights["step"] == 1
    (rec,) = hist.rounds
    assert rec.round == 1 and rec.num_results == 3 and dict(rec.failures) == {}
    assert rec.metrics["train_loss"] == pytest.approx((1.0 + 2.0 + 2 * 3.0) / 4)


def test_rounds_chain_and_config_reaches_trainers():
    a, b = AddDelta(1.0), AddDelta(3.0)
    cfg = RunConfig(rounds=3, seed=11, fit_config={"lr": 0.5})
    hist = Driver(InProcessFleet({"a": a, "b": b}), fedavg(), INIT, cfg).run()
    assert hist.weights["w"].tolist() == [6.0, 6.0]  # +2 per round
    assert hist.weights["step"] == 3
    assert [r.round for r in hist.rounds] == [1, 2, 3]
    c = Const([0, 0], 1)
    Driver(InProcessFleet({"c": c}), fedavg(), INIT, cfg).run()
    assert c.configs[0]["lr"] == 0.5 and c.configs[0]["seed"] == 11 and len(c.configs) == 3


def test_trainer_that_raises_is_recorded_and_round_continues():
    trainers = _three()
    trainers["b"] = Raises([0, 0], 1)
    hist = Driver(InProcessFleet(trainers), fedavg(), INIT, RunConfig(rounds=1)).run()
    rec = hist.rounds[0]
    assert set(rec.failures) == {"b"} and "RuntimeError: disk on fire" in rec.failures["b"]
    assert rec.num_results == 2
    # ([1,2] + 2*[5,6]) / 3 = [11/3, 14/3]
    np.testing.assert_array_equal(hist.weights["w"], np.array([11 / 3, 14 / 3], np.float32))


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


class Slow(Const):
    def __init__(self, clock, seconds, *args, **kw):
        super().__init__(*args, **kw)
        self.clock, self.seconds = clock, seconds

    def fit(self, weights, config):
        self.clock.now += self.seconds
        return super().fit(weights, config)


def test_slow_trainer_past_round_timeout_is_a_late_failure(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(fedloom.fleet, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    trainers = {"a": Const([2, 2], 1), "b": Slow(clock, 11.0, [100, 100], 1), "c": Const([4, 4], 1)}
    hist = Driver(InProcessFleet(trainers), fedavg(), INIT, RunConfig(rounds=1, round_timeout=10.0)).run()
    rec = hist.rounds[0]
    assert rec.failures["b"].startswith("late")
    assert "deadline passed" in rec.failures["c"]
    assert rec.num_results == 1
    assert hist.weights["w"].tolist() == [2.0, 2.0]


def test_slow_trainer_within_timeout_counts(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(fedloom.fleet, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    trainers = {"a": Slow(clock, 9.0, [2, 2], 1), "b": Const([4, 4], 1)}
    hist = Driver(InProcessFleet(trainers), fedavg(), INIT, RunConfig(rounds=1, round_timeout=10.0)).run()
    assert dict(hist.rounds[0].failures) == {}
    assert hist.weights["w"].tolist() == [3.0, 3.0]


class VanishingFleet(InProcessFleet):
    """Reports ``gone`` as a failure without running it, as a transport would for a lost node."""

    def __init__(self, trainers, gone):
        super().__init__(trainers)
        self.gone = gone
        self.calls: list[tuple[str, list[str]]] = []

    def run(self, instruction: Instruction, node_ids: Sequence[str], *, timeout: float) -> Iterator[Outcome]:
        self.calls.append((instruction.kind, list(node_ids)))
        alive = [n for n in node_ids if n != self.gone]
        yield from reversed(list(super().run(instruction, alive, timeout=timeout)))  # any order
        if self.gone in node_ids:
            yield Failure(self.gone, "node vanished (heartbeat lost)")


def test_vanished_node_is_a_failure_of_one_task():
    fleet = VanishingFleet(_three(), gone="c")
    hist = Driver(fleet, fedavg(), INIT, RunConfig(rounds=2)).run()
    for rec in hist.rounds:
        assert dict(rec.failures) == {"c": "node vanished (heartbeat lost)"}
        assert rec.num_results == 2
    assert hist.weights["w"].tolist() == [2.0, 3.0]


def test_min_results_not_met_keeps_weights():
    trainers = {"a": Const([1, 1], 1), "b": Raises([0, 0], 1), "c": Raises([0, 0], 1)}
    seen: list[NamedTensors] = []
    hist = Driver(InProcessFleet(trainers), fedavg(), INIT, RunConfig(rounds=2, min_results=2),
                  evaluate=lambda w: seen.append(w) or {"central": 1.0}).run()
    assert hist.weights is INIT or hist.weights.equal(INIT)
    for rec in hist.rounds:
        assert "*" in rec.failures and "only 1 of 2" in rec.failures["*"]
        assert {"b", "c"} <= set(rec.failures)
        # no train metrics from a discarded round; only the traffic it caused and the central evaluation
        assert rec.metrics == {"central": 1.0, "bytes_down": 3 * INIT.nbytes, "bytes_up": INIT.nbytes}
    assert all(w.equal(INIT) for w in seen)


class FewNodes(InProcessFleet):
    def wait_for_nodes(self, count, timeout):
        return list(self._ids)[:1]


def test_too_few_nodes_is_a_star_failure():
    hist = Driver(FewNodes(_three()), fedavg(), INIT, RunConfig(rounds=1, min_clients=2, wait_timeout=0)).run()
    assert "only 1 of 2 required nodes" in hist.rounds[0].failures["*"]
    assert hist.rounds[0].num_results == 0 and hist.weights.equal(INIT)


def test_rejected_update_is_not_aggregated():
    trainers = {"a": Const([1, 3], 1), "n": NaNs([0, 0], 1), "b": Const([3, 5], 1)}
    hist = Driver(InProcessFleet(trainers), fedavg(), INIT, RunConfig(rounds=1)).run()
    assert hist.rounds[0].failures["n"].startswith("rejected: non-finite")
    assert hist.weights["w"].tolist() == [2.0, 4.0]


def test_wrong_structure_rejected():
    class Extra(Const):
        def fit(self, weights, config):
            return NamedTensors({"w": self.w, "step": weights["step"], "x": self.w}), 1, {}

    hist = Driver(InProcessFleet({"a": Const([1, 1], 1), "x": Extra([9, 9], 1)}), fedavg(), INIT,
                  RunConfig(rounds=1)).run()
    assert hist.rounds[0].failures["x"].startswith("rejected: wrong parameter names")
    assert hist.weights["w"].tolist() == [1.0, 1.0]


def test_on_round_called_once_per_round_with_current_weights():
    calls: list[tuple[RoundRecord, list[float]]] = []
    driver = Driver(InProcessFleet({"a": AddDelta(2.0)}), fedavg(), INIT, RunConfig(rounds=3),
                    on_round=lambda rec, w: calls.append((rec, w["w"].tolist())))
    hist = driver.run()
    assert [c[0].round for c in calls] == [1, 2, 3]
    assert [c[1] for c in calls] == [[2.0, 2.0], [4.0, 4.0], [6.0, 6.0]]
    assert [c[0] for c in calls] == list(hist.rounds)


def test_federated_and_central_evaluation_metrics():
    trainers = {"a": Const([0, 0], 1, accuracy=0.2), "b": Const([2, 2], 3, accuracy=0.6)}
    hist = Driver(InProcessFleet(trainers), fedavg(), INIT, RunConfig(rounds=1, eval_fraction=1.0),
                  evaluate=lambda w: {"central_w": float(w["w"][0])}).run()
    m = hist.rounds[0].metrics
    assert m["federated_accuracy"] == pytest.approx((0.2 + 3 * 0.6) / 4)
    assert m["central_w"] == 1.5  # (0 + 3*2)/4, evaluated on the new weights
    assert hist.metric("central_w") == [1.5]


def test_fraction_samples_the_same_nodes_for_the_same_seed():
    def picked(seed):
        fleet = VanishingFleet({f"n{i}": Const([1, 1], 1) for i in range(10)}, gone="none")
        Driver(fleet, fedavg(), INIT, RunConfig(rounds=3, fraction=0.3, seed=seed)).run()
        return [ids for kind, ids in fleet.calls]

    first = picked(5)
    assert all(len(ids) == 3 for ids in first)
    assert picked(5) == first
    assert len({tuple(ids) for ids in first}) > 1 or picked(6) != first


def test_client_training_is_seeded_from_run_seed():
    def final(seed):
        trainers = {"a": Noisy(), "b": Noisy()}
        return Driver(InProcessFleet(trainers), fedavg(), INIT, RunConfig(rounds=2, seed=seed)).run().weights

    assert final(3).equal(final(3))
    assert not final(3).equal(final(4))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rounds": 0},
        {"fraction": 0.0},
        {"fraction": 1.5},
        {"min_clients": 0},
        {"min_results": 0},
        {"round_timeout": 0},
        {"wait_timeout": -1},
        {"eval_fraction": 1.1},
        {"eval_fraction": -0.1},
    ],
)
def test_run_config_validation(kwargs):
    (key,) = kwargs
    with pytest.raises(ValueError, match=f"{key}="):
        RunConfig(**kwargs)
