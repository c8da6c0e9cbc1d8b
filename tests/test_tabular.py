"""The tabular workload: embedded data, TabularTrainer, and federated normalization end to end."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fedloom import Driver, InProcessFleet, RunConfig, fedavg
from fedloom.preprocessing import TASK, collect_feature_stats, feature_stats
from fedloom.tabular import TabularTrainer, load, tabular


@pytest.mark.parametrize("name, rows, features, classes", [("breast_cancer", 569, 30, 2), ("wine", 178, 13, 3)])
def test_embedded_data(name: str, rows: int, features: int, classes: int) -> None:
    data = load(name)
    assert data.x.shape == (rows, features) and data.num_classes == classes and data.x.dtype == np.float32
    w = tabular(name, 4, seed=0)
    assert w.num_clients == 4 and sum(len(p) for p in w.parts) + len(w.test) == rows


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="breast_cancer, wine"):
        tabular("iris", 2)


def _fleet(w) -> InProcessFleet:
    return InProcessFleet(factory=lambda n: w.trainer(int(n), device="cpu"), node_ids=[str(i) for i in range(
        w.num_clients)])


@pytest.mark.parametrize("val_fraction", [0.0, 0.25])
def test_stats_cover_exactly_the_training_rows(val_fraction: float) -> None:
    w = tabular("wine", 3, seed=1, val_fraction=val_fraction)
    stats = collect_feature_stats(_fleet(w), ["0", "1", "2"], timeout=60)
    rows = np.concatenate([w.trainer(i, device="cpu").inner.train_data.x.numpy() for i in range(3)])
    pooled = feature_stats(rows)
    assert stats.count == len(rows) < len(w.train) if val_fraction else stats.count == len(w.train)
    np.testing.assert_allclose(stats.mean, pooled.mean, rtol=1e-12)
    np.testing.assert_allclose(stats.std(), pooled.std(), rtol=1e-10)
    assert stats.class_counts.sum() == stats.count


def test_trainer_normalizes_what_the_config_says_and_keeps_raw_rows() -> None:
    w = tabular("wine", 2, seed=0, val_fraction=0.2)
    trainer = w.trainer(0, device="cpu")
    assert isinstance(trainer, TabularTrainer)
    raw_train, raw_test = trainer.inner.train_data.x.clone(), trainer.inner.test_data.x.clone()
    norm = feature_stats(raw_train).to_config("minmax")
    n, metrics = trainer.evaluate(w.initial_weights(0), {"seed": 0, **norm})
    assert n == len(raw_test) and "accuracy" in metrics
    x = trainer.inner.train_data.x
    assert float(x.min()) == pytest.approx(0.0, abs=1e-6) and float(x.max()) == pytest.approx(1.0, abs=1e-6)
    # the stats task always answers from the raw rows, and a config without norm keys restores them
    n, stats = trainer.evaluate(w.initial_weights(0), {"task": TASK})
    assert n == len(raw_train) and stats["fstats/max/0"] == pytest.approx(float(raw_train[:, 0].max()))
    trainer.fit(w.initial_weights(0), {"epochs": 1})
    assert torch.equal(trainer.inner.train_data.x, raw_train) and torch.equal(trainer.inner.test_data.x, raw_test)


def _run(w, norm: dict, rounds: int) -> float:
    fleet = _fleet(w)
    history = Driver(fleet, fedavg(), w.initial_weights(0), RunConfig(rounds=rounds, seed=0, fit_config=norm),
                     evaluate=w.evaluator(norm)).run()
    return history.metric("accuracy")[-1]


@pytest.mark.parametrize("name", ["breast_cancer", "wine"])
def test_federated_normalization_matches_central_and_beats_none(name: str) -> None:
    logging.getLogger("fedloom.driver").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    w = tabular(name, 5, scheme="dirichlet", seed=0)
    federated = collect_feature_stats(_fleet(w), [str(i) for i in range(5)], timeout=60).to_config()
    central = feature_stats(w.train.x).to_config()
    for key, value in central.items():  # the same numbers, up to rounding in the merge
        assert federated[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-9, abs=1e-12))
    acc = {"none": _run(w, {}, 3), "central": _run(w, central, 3), "federated": _run(w, federated, 3)}
    assert acc["federated"] == pytest.approx(acc["central"], abs=0.03)
    assert acc["federated"] > 0.85 and acc["federated"] > acc["none"] + 0.2, acc
