"""Federated feature statistics: Chan's merge, the wire encoding, normalization configs, the fleet task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedloom import InProcessFleet
from fedloom.preprocessing import (
    FeatureStats,
    Normalizer,
    answer,
    collect_feature_stats,
    feature_stats,
    is_stats_task,
    merge,
    merge_all,
)


def test_merge_matches_hand_computed_numbers() -> None:
    # a = [1, 2, 3]: n 3, mean 2, M2 2; b = [4, 5]: n 2, mean 4.5, M2 0.5
    # delta 2.5: mean 2 + 2.5 * 2/5 = 3; M2 = 2 + 0.5 + 2.5^2 * 3*2/5 = 10 (= 4+1+0+1+4)
    a = feature_stats(np.array([[1.0], [2.0], [3.0]]), np.array([0, 1, 1]), num_classes=2)
    b = feature_stats(np.array([[4.0], [5.0]]), np.array([1, 1]), num_classes=2)
    assert (a.count, a.mean[0], a.m2[0], b.mean[0], b.m2[0]) == (3, 2.0, 2.0, 4.5, 0.5)
    m = merge(a, b)
    assert (m.count, m.mean[0], m.m2[0], m.min[0], m.max[0]) == (5, 3.0, 10.0, 1.0, 5.0)
    assert m.class_counts.tolist() == [1, 4]
    assert m.std()[0] == pytest.approx(np.sqrt(2.0)) and m.std(ddof=1)[0] == pytest.approx(np.sqrt(2.5))


@pytest.mark.parametrize("offset", [0.0, 1e9])
@pytest.mark.parametrize("parts", [2, 7])
def test_merged_stats_equal_pooled_ones_even_far_from_zero(offset: float, parts: int) -> None:
    rng = np.random.default_rng(parts)
    x = offset + rng.normal(0.0, [1.0, 0.001, 50.0], size=(500, 3))
    cuts = np.sort(rng.choice(np.arange(1, 500), parts - 1, replace=False))
    merged = merge_all(feature_stats(p) for p in np.split(x, cuts))
    np.testing.assert_allclose(merged.mean, x.mean(axis=0), rtol=1e-12)
    # x itself holds only ~1e-7 absolute precision at 1e9, so the 0.001-wide feature keeps ~4 digits
    np.testing.assert_allclose(merged.std(), (x - offset).std(axis=0), rtol=1e-4)
    # ... which the textbook sum-of-squares formula loses entirely (x^2 ~ 1e18, its ulp ~ 1e2)
    naive = np.sqrt(np.maximum((x**2).mean(axis=0) - x.mean(axis=0) ** 2, 0.0))
    assert offset == 0.0 or not np.allclose(naive, (x - offset).std(axis=0), rtol=0.1)
    np.testing.assert_array_equal(merged.min, x.min(axis=0))
    np.testing.assert_array_equal(merged.max, x.max(axis=0))


def test_empty_client_is_the_identity_and_encodes_without_values() -> None:
    full = feature_stats(np.arange(6.0).reshape(3, 2))
    none = feature_stats(np.zeros((0, 2)))
    assert none.to_metrics() == {"fstats/count": 0.0, "fstats/features": 2.0, "fstats/classes": 0.0}
    for m in (merge(none, full), merge(full, none)):
        np.testing.assert_array_equal(m.mean, full.mean)
        assert m.count == 3


def test_metrics_round_trip() -> None:
    s = feature_stats(np.array([[1.0, -2.0], [3.0, 5.0]]), np.array([2, 0]), num_classes=3)
    back = FeatureStats.from_metrics({**s.to_metrics(), "accuracy": 0.5})
    for field in ("mean", "m2", "min", "max", "class_counts"):
        np.testing.assert_array_equal(getattr(back, field), getattr(s, field))
    assert back.count == 2 and s.to_metrics()["fstats/mean/1"] == 1.5 and s.to_metrics()["fstats/class/2"] == 1.0


GOOD = feature_stats(np.array([[1.0], [3.0]]), np.array([0, 1]), num_classes=2).to_metrics()


@pytest.mark.parametrize("change, message", [
    ({"fstats/count": -1.0}, "count"),
    ({"fstats/count": 2.5}, "count"),
    ({"fstats/features": 0.0}, "features"),
    ({"fstats/class/0": -1.0}, "class/0"),
    ({"fstats/class/0": 5.0}, "sum to"),
    ({"fstats/mean/1": 0.0}, "unexpected"),
    ({"fstats/weird/0": 0.0}, "unexpected"),
    ({"fstats/mean/x": 0.0}, "unexpected"),
    ({"fstats/m2/0": -1.0}, "non-negative"),
    ({"fstats/m2/0": 100.0}, "m2 exceeds"),
    ({"fstats/min/0": 4.0}, "min <= mean"),
    ({"fstats/mean/0": float("nan")}, "lack mean"),
    ({"fstats/max/0": float("inf")}, "not finite"),
])
def test_untrusted_stats_are_rejected_with_a_reason(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureStats.from_metrics({**GOOD, **change})


@pytest.mark.parametrize("missing", ["fstats/count", "fstats/min/0", "fstats/class/1"])
def test_incomplete_stats_are_rejected(missing: str) -> None:
    with pytest.raises(ValueError):
        FeatureStats.from_metrics({k: v for k, v in GOOD.items() if k != missing})


@pytest.mark.parametrize("method, expected", [
    # x = [[0, 5], [2, 5], [4, 5]]: mean [2, 5], population std [sqrt(8/3), 0 -> 1]; min [0, 5], range [4, 0 -> 1]
    ("standard", [[-np.sqrt(1.5), 0.0], [0.0, 0.0], [np.sqrt(1.5), 0.0]]),
    ("minmax", [[0.0, 0.0], [0.5, 0.0], [1.0, 0.0]]),
])
def test_normalization_through_config(method: str, expected: list) -> None:
    x = np.array([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]], np.float32)
    config = {"lr": 0.1, **feature_stats(x).to_config(method)}
    norm = Normalizer.from_config(config)
    assert norm is not None and norm.method == method
    out = norm.apply(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    torch_out = norm.apply(torch.from_numpy(x).reshape(3, 1, 2))  # features are flattened per row
    np.testing.assert_allclose(torch_out.reshape(3, 2).numpy(), expected, rtol=1e-6, atol=1e-7)
    assert Normalizer.from_config({"lr": 0.1}) is None


@pytest.mark.parametrize("change, message", [
    ({"norm/method": "zscore"}, "method"),
    ({"norm/std/0": 0.0}, "positive"),
    ({"norm/std/5": 1.0}, "unexpected"),
    ({"norm/features": 3}, "lacks values"),
    ({"norm/mean/0": float("nan")}, "non-finite"),
])
def test_bad_normalization_configs_are_rejected(change: dict, message: str) -> None:
    config = feature_stats(np.array([[0.0, 1.0], [2.0, 3.0]])).to_config()
    with pytest.raises(ValueError, match=message):
        Normalizer.from_config({**config, **change})


def test_normalizer_checks_the_width() -> None:
    norm = Normalizer.from_config(feature_stats(np.ones((2, 3))).to_config())
    with pytest.raises(ValueError, match="3 features, data has 2"):
        norm.apply(np.ones((4, 2)))


class Rows:
    """A node that answers the stats task from its rows, or misbehaves."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, forged: dict | None = None):
        self.x, self.y, self.forged = x, y, forged

    def fit(self, weights, config):
        raise NotImplementedError

    def evaluate(self, weights, config):
        assert is_stats_task(config) and len(weights) == 0
        n, m = answer(self.x, self.y, num_classes=3)
        return n, {**m, **(self.forged or {})}


def test_collect_over_a_fleet_merges_and_skips_bad_nodes() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(3.0, 2.0, (90, 4)), rng.integers(0, 3, 90)
    fleet = InProcessFleet({"a": Rows(x[:10], y[:10]), "b": Rows(x[10:], y[10:]),
                            "bad": Rows(x[:5], y[:5], forged={"fstats/count": -3.0})})
    failures: dict[str, str] = {}
    stats = collect_feature_stats(fleet, ["bad", "b", "a", "ghost"], timeout=30, failures=failures)
    assert stats.count == 90 and stats.class_counts.tolist() == np.bincount(y, minlength=3).tolist()
    np.testing.assert_allclose(stats.std(), x.std(axis=0), rtol=1e-12)
    assert set(failures) == {"bad", "ghost"} and "bad feature stats" in failures["bad"]
    with pytest.raises(ValueError, match="no node sent"):
        collect_feature_stats(fleet, ["bad"], timeout=30)
