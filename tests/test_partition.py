"""Properties of the partitioners: coverage, reproducibility, and skew that follows its knob."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom import partition

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 100 per class
np.random.default_rng(0).shuffle(LABELS)

SCHEMES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.1}),
    ("dirichlet", {"alpha": 10.0}),
    ("shards", {"classes_per_client": 2}),
    ("quantity", {}),
]


def mean_classes(parts: list[np.ndarray]) -> float:
    return float(np.mean([len(np.unique(LABELS[p])) for p in parts]))


def label_distance(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one."""
    glob = np.bincount(LABELS, minlength=10) / len(LABELS)
    dists = [0.5 * np.abs(np.bincount(LABELS[p], minlength=10) / len(p) - glob).sum() for p in parts]
    return float(np.mean(dists))


@pytest.mark.parametrize(("scheme", "kw"), SCHEMES)
@pytest.mark.parametrize("num_clients", [1, 7, 20])
def test_every_sample_assigned_exactly_once(scheme, kw, num_clients):
    parts = partition.partition(LABELS, num_clients, scheme, seed=3, **kw)
    assert len(parts) == num_clients
    merged = np.concatenate(parts)
    assert len(merged) == len(LABELS)
    np.testing.assert_array_equal(np.sort(merged), np.arange(len(LABELS)))
    assert all(len(p) >= 1 and np.all(np.diff(p) > 0) for p in parts)  # non-empty, sorted, no repeats


@pytest.mark.parametrize(("scheme", "kw"), SCHEMES)
def test_seed_reproduces_and_differs(scheme, kw):
    a = partition.partition(LABELS, 10, scheme, seed=5, **kw)
    b = partition.partition(LABELS, 10, scheme, seed=5, **kw)
    c = partition.partition(LABELS, 10, scheme, seed=6, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_skew_grows_as_alpha_falls():
    alphas = [100.0, 1.0, 0.3, 0.05]
    classes = [np.mean([mean_classes(partition.dirichlet(LABELS, 20, alpha=a, seed=s)) for s in range(3)])
               for a in alphas]
    distance = [np.mean([label_distance(partition.dirichlet(LABELS, 20, alpha=a, seed=s)) for s in range(3)])
                for a in alphas]
    assert classes == sorted(classes, reverse=True), classes
    assert distance == sorted(distance), distance
    assert classes[0] == pytest.approx(10.0, abs=0.2)  # near-IID: every client sees every class
    assert classes[-1] < 4.0


@pytest.mark.parametrize(("num_clients", "k"), [(10, 1), (10, 2), (5, 4), (20, 5)])
def test_shards_give_exactly_k_classes_when_divisible(num_clients, k):
    # 10 classes of 100 samples, num_clients * k shards dividing 1000: each shard is one class
    parts = partition.shards(LABELS, num_clients, classes_per_client=k, seed=1)
    sizes = {len(p) for p in parts}
    assert sizes == {len(LABELS) // num_clients}
    for p in parts:
        assert len(np.unique(LABELS[p])) <= k
    assert mean_classes(parts) > k - 1  # repeats of one class on a client are rare, not the rule


def test_shards_with_one_class_per_shard_and_distinct_deal():
    # 10 clients x 1 shard = 10 shards of 100 = exactly one class each, each class once
    parts = partition.shards(LABELS, 10, classes_per_client=1, seed=0)
    assert sorted(int(np.unique(LABELS[p])[0]) for p in parts) == list(range(10))
    assert all(len(np.unique(LABELS[p])) == 1 for p in parts)


def test_quantity_skew_is_skewed_but_label_balanced():
    parts = partition.quantity_skew(LABELS, 20, seed=2)
    sizes = np.array(sorted(len(p) for p in parts))
    assert sizes[-1] > 4 * np.median(sizes)  # a heavy tail
    assert sizes.std() > np.array([len(p) for p in partition.iid(LABELS, 20, seed=2)]).std() + 10
    big = max(parts, key=len)
    assert len(np.unique(LABELS[big])) == 10


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition.iid(LABELS, 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1000  # 1000 = 6 * 143 + 142


def test_stats_hand_computed():
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4]), np.array([5])]
    assert partition.stats(labels, parts) == {"samples": (1.0, 2.0, 3.0), "classes": (1.0, 1.0, 2.0)}


@pytest.mark.parametrize(("call", "message"), [
    (lambda: partition.partition(LABELS, 3, "nope", seed=0), "unknown partition scheme"),
    (lambda: partition.dirichlet(LABELS, 3, alpha=0.0, seed=0), "alpha must be positive"),
    (lambda: partition.iid(LABELS[:2], 3, seed=0), "cannot split"),
    (lambda: partition.iid(LABELS, 0, seed=0), "at least 1"),
])
def test_invalid_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
