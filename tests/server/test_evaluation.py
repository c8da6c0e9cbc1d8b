"""Federated evaluation from sufficient statistics, early stopping and the best model, in the driver."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from fedloom import Driver, InProcessFleet, NamedTensors, RunConfig, fedavg
from fedloom import metrics as M
from fedloom.rundir import BEST, RunDir, load_model
from fedloom.server.evaluation import Watch
from fedloom.strategies.validation import best_model, early_stopping

RNG = np.random.default_rng(0)
LABELS = [RNG.integers(0, 3, n) for n in (5, 17, 40)]
SCORES = [RNG.dirichlet(np.ones(3), len(y)) for y in LABELS]  # probabilities


class Site:
    """Reports the statistics of fixed scores on its labels, like TorchTrainer with num_classes."""

    def __init__(self, i: int):
        self.i = i

    def fit(self, weights, config):
        return weights, 1, {}

    def evaluate(self, weights, config):
        stats = M.class_stats(SCORES[self.i], LABELS[self.i], num_classes=3)
        return stats.count, {**M.compute(stats), **M.to_dict(stats)}


def test_federated_metrics_equal_the_pooled_data() -> None:
    fleet = InProcessFleet({str(i): Site(i) for i in range(3)})
    history = Driver(fleet, fedavg(), NamedTensors({"w": np.zeros(1, np.float32)}),
                     RunConfig(rounds=1, eval_fraction=1.0)).run()
    m = history.rounds[0].metrics
    y, s = np.concatenate(LABELS), np.concatenate(SCORES)
    assert m["federated_accuracy"] == pytest.approx(np.mean(s.argmax(1) == y))
    assert m["federated_f1_macro"] == pytest.approx(f1_score(y, s.argmax(1), average="macro"))
    probs = s / s.sum(1, keepdims=True)
    assert m["federated_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=3e-3)
    assert not any(k.startswith("federated_stats/") for k in m)


class Drift:
    def fit(self, weights, config):
        return NamedTensors({"w": weights["w"] + 1}), 1, {}

    def evaluate(self, weights, config):
        return 1, {}


SCRIPT = [0.5, 0.7, 0.6, 0.65, 0.69, 0.9]  # accuracy after each round


def test_early_stopping_and_best_model(tmp_path) -> None:
    seen = iter(SCRIPT)
    run_dir = RunDir(tmp_path)
    watch = Watch(early_stopping(metric="accuracy", patience=3), best_model(metric="accuracy"))
    history = Driver(InProcessFleet({"a": Drift()}), fedavg(), NamedTensors({"w": np.zeros(1, np.float32)}),
                     RunConfig(rounds=6), evaluate=lambda w: {"accuracy": next(seen)}, watch=watch,
                     on_round=run_dir.record).run()
    assert len(history.rounds) == 5  # rounds 3, 4, 5 bring no improvement over 0.7: stop after round 5
    assert [r.best for r in history.rounds] == [True, True, False, False, False]
    assert "early stop" in history.rounds[-1].stopped
    np.testing.assert_array_equal(load_model(tmp_path / BEST)["w"], [2.0])  # the weights of round 2
    assert run_dir.records()[-1]["stopped"].startswith("early stop")
