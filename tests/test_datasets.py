"""Data sets that need no download: digits, the split, Synthetic(alpha, beta), npz files."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.datasets import Dataset, digits, from_npz, split, synthetic


@pytest.fixture(scope="module")
def dig() -> Dataset:
    return digits()


def test_digits_shapes_and_dtypes(dig):
    assert dig.x.shape == (1797, 1, 8, 8) and dig.x.dtype == np.float32
    assert dig.y.shape == (1797,) and dig.y.dtype == np.int64
    assert dig.num_classes == 10 and len(dig) == 1797
    assert dig.x.min() == 0.0 and dig.x.max() == 1.0
    assert sorted(np.unique(dig.y)) == list(range(10))


def test_split_is_stratified_disjoint_and_seeded(dig):
    train, test = split(dig, test_fraction=0.2, seed=0)
    assert len(train) + len(test) == len(dig)
    for label in range(10):
        total = int((dig.y == label).sum())
        assert int((test.y == label).sum()) == round(total * 0.2)
    # disjoint and covering: each image row (with its label) appears exactly once
    rows = lambda d: {(r.tobytes(), int(c)) for r, c in zip(d.x, d.y, strict=True)}  # noqa: E731
    assert len(rows(train) & rows(test)) <= 1  # digits contains a few exact duplicate images
    _, again_test = split(dig, test_fraction=0.2, seed=0)
    assert np.array_equal(again_test.y, test.y) and np.array_equal(again_test.x, test.x)
    other = split(dig, test_fraction=0.2, seed=1)[1]
    assert not np.array_equal(other.x, test.x)


def test_split_indices_disjoint_on_unique_rows():
    data = Dataset(np.arange(40, dtype=np.float32).reshape(20, 2), np.array([0] * 10 + [1] * 6 + [2] * 4), 3)
    train, test = split(data, test_fraction=0.5, seed=3)
    tr, te = set(train.x[:, 0].tolist()), set(test.x[:, 0].tolist())
    assert not tr & te and len(tr | te) == 20
    assert np.bincount(test.y, minlength=3).tolist() == [5, 3, 2]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_split_validates_fraction(dig, fraction):
    with pytest.raises(ValueError):
        split(dig, test_fraction=fraction, seed=0)


def test_synthetic_shapes_and_seeding():
    a = synthetic(alpha=1.0, beta=1.0, num_clients=5, seed=0)
    assert len(a) == 5
    for d in a:
        assert d.x.ndim == 2 and d.x.shape[1] == 60 and d.x.dtype == np.float32
        assert d.y.dtype == np.int64 and len(d) >= 50 and d.num_classes == 10
        assert d.y.min() >= 0 and d.y.max() < 10
    b = synthetic(alpha=1.0, beta=1.0, num_clients=5, seed=0)
    assert all(np.array_equal(p.x, q.x) and np.array_equal(p.y, q.y) for p, q in zip(a, b, strict=True))
    c = synthetic(alpha=1.0, beta=1.0, num_clients=5, seed=1)
    assert not np.array_equal(a[0].x[:50], c[0].x[:50])
    small = synthetic(alpha=0.0, beta=0.0, num_clients=2, seed=0, dim=7, num_classes=3)
    assert small[0].x.shape[1] == 7 and small[0].y.max() < 3


def test_synthetic_beta_controls_feature_heterogeneity():
    def spread(beta):
        clients = synthetic(alpha=0.0, beta=beta, num_clients=40, seed=2)
        return np.std([d.x.mean() for d in clients])

    assert spread(10.0) > 2 * spread(0.0)


def test_from_npz_round_trip(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.arange(6, dtype=np.int32).reshape(3, 2), y=np.array([0, 2, 1]))
    d = from_npz(p)
    assert d.x.dtype == np.float32 and d.x.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert d.y.dtype == np.int64 and d.num_classes == 3
    np.savez(tmp_path / "k.npz", feats=np.zeros((2, 1)), labels=np.array([0, 1]))
    assert len(from_npz(tmp_path / "k.npz", x_key="feats", y_key="labels")) == 2


def test_from_npz_refuses_pickled_objects(tmp_path):
    p = tmp_path / "evil.npz"
    np.savez(p, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(ValueError, match="pickle"):
        from_npz(p)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x": np.zeros((2, 1))}, "missing arrays \\['y'\\]"),
        ({"y": np.zeros(2, np.int64)}, "missing arrays \\['x'\\]"),
        ({"x": np.zeros((2, 1)), "y": np.zeros(2)}, "labels must be a 1-D integer"),
        ({"x": np.zeros((2, 1)), "y": np.zeros((2, 1), np.int64)}, "labels must be a 1-D integer"),
        ({"x": np.zeros((3, 1)), "y": np.zeros(2, np.int64)}, "3 inputs but 2 labels"),
        ({"x": np.zeros((2, 1)), "y": np.array([0, -1])}, "negative"),
    ],
)
def test_from_npz_refuses_bad_files(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(ValueError, match=match):
        from_npz(p)
