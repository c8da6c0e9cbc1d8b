"""Flower interoperation: a Flower strategy in fedloom's driver, a NumPyClient as a trainer."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.client import NumPyClient
from flwr.server.strategy import FedAvg, FedMedian

from fedloom import Driver, InProcessFleet, NamedTensors, RunConfig, fedavg
from fedloom.interop.flower import FlowerClientTrainer, from_flower


class ShiftClient(NumPyClient):
    """Adds a fixed shift to every parameter; reports a fixed example count."""

    def __init__(self, shift: float, n: int):
        self.shift, self.n = shift, n

    def fit(self, parameters, config):
        return [p + self.shift for p in parameters], self.n, {"shift": self.shift, "note": "ignored"}

    def evaluate(self, parameters, config):
        return float(sum(p.sum() for p in parameters)), self.n, {"accuracy": 0.5}


INITIAL = NamedTensors({"w": np.zeros((2, 2), np.float32), "b": np.ones(3, np.float32)})
CLIENTS = {"a": (1.0, 1), "b": (2.0, 1), "c": (9.0, 2)}


def _run(strategy, rounds: int = 2):
    fleet = InProcessFleet({k: FlowerClientTrainer(ShiftClient(s, n)) for k, (s, n) in CLIENTS.items()})
    return Driver(fleet, strategy, INITIAL, RunConfig(rounds=rounds, min_clients=3)).run()


def test_flower_fedavg_in_fedloom_driver_equals_fedloom_fedavg() -> None:
    ours = _run(fedavg())
    theirs = _run(from_flower(FedAvg()))
    # hand-computed: each round shifts by (1 + 2 + 2*9) / 4 = 5.25
    np.testing.assert_allclose(ours.weights["w"], np.full((2, 2), 10.5))
    for name in INITIAL:
        np.testing.assert_allclose(theirs.weights[name], ours.weights[name], rtol=1e-6)
        assert theirs.weights[name].dtype == INITIAL[name].dtype


def test_flower_median_through_adapter() -> None:
    history = _run(from_flower(FedMedian()), rounds=1)
    np.testing.assert_allclose(history.weights["b"], np.full(3, 3.0))  # median of shifts 1, 2, 9


def test_numpy_client_trainer_keeps_names_and_numeric_metrics() -> None:
    trainer = FlowerClientTrainer(ShiftClient(0.5, 7))
    weights, n, metrics = trainer.fit(INITIAL, {})
    assert list(weights) == ["w", "b"] and n == 7 and metrics == {"shift": 0.5}
    n, metrics = trainer.evaluate(INITIAL, {})
    assert n == 7 and metrics == {"loss": 3.0, "accuracy": 0.5}


def test_adapters_refuse_non_flower_objects() -> None:
    with pytest.raises(TypeError, match="not a Flower strategy"):
        from_flower(object())
    with pytest.raises(TypeError, match="not a Flower NumPyClient"):
        FlowerClientTrainer(object())
