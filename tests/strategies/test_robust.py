"""Robust aggregators (median, trimmed mean, Krum, Multi-Krum, Bulyan) against hand-computed numbers."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedloom.strategies import Update
from fedloom.strategies.robust import bulyan, krum, median, trimmed_mean
from fedloom.tensors import NamedTensors


def _nt(**arrays) -> NamedTensors:
    return NamedTensors(arrays)


def _scalars(values, counts=None, dtype=np.float64) -> list[Update]:
    """One update per value, tensor "x" of shape (1,), node ids a, b, c ... in order."""
    counts = counts or [1] * len(values)
    pairs = zip(values, counts, strict=True)
    return [Update(chr(ord("a") + i), _nt(x=np.array([v], dtype)), n) for i, (v, n) in enumerate(pairs)]


def _run(agg, updates, global_weights=None):
    global_weights = global_weights or updates[0].weights
    acc = agg.begin(global_weights)
    for u in updates:
        acc = agg.fold(acc, u)
    return agg.result(acc)


def _x(agg, values, **kw) -> float:
    return float(_run(agg, _scalars(values, **kw))[0]["x"][0])


@pytest.mark.parametrize(
    ("values", "expected"),
    [([1.0, 5.0, 2.0], 2.0), ([1.0, 2.0, 3.0, 10.0], 2.5), ([7.0], 7.0), ([-1e9, 0.5, 0.25, 1e9, 0.75], 0.5)],
)
def test_median_hand_computed(values, expected):
    assert _x(median(), values) == expected


def test_median_is_per_coordinate_and_unweighted():
    ups = [Update("a", _nt(w=np.array([[0.0, 9.0]], np.float32)), 100),
           Update("b", _nt(w=np.array([[1.0, -4.0]], np.float32)), 1),
           Update("c", _nt(w=np.array([[50.0, 2.0]], np.float32)), 1)]
    out = _run(median(), ups)[0]["w"]
    assert out.dtype == np.float32 and out.tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize(
    ("beta", "values", "expected"),
    [
        (0.2, [100.0, 1.0, 2.0, 3.0, -50.0], 2.0),  # k = int(0.2*5) = 1: mean(1, 2, 3)
        (0.1, [100.0, 1.0, 2.0, 3.0, -50.0], 11.2),  # k = 0: plain mean 56/5
        (0.25, [4.0, 0.0, 1.0, 2.0], 1.5),  # k = 1: mean(1, 2)
        (0.4, [9.0, 1.0, 7.0, 3.0, 5.0], 5.0),  # k = 2: the median
    ],
)
def test_trimmed_mean_hand_computed(beta, values, expected):
    assert _x(trimmed_mean(beta=beta), values) == pytest.approx(expected, abs=1e-12)


def test_trimmed_mean_trims_each_coordinate_separately():
    rows = [[0.0, 10.0], [1.0, -90.0], [2.0, 11.0], [90.0, 12.0], [3.0, 13.0]]
    ups = [Update(str(i), _nt(w=np.array(r)), 1) for i, r in enumerate(rows)]
    # column 0: drop 0 and 90 -> mean(1, 2, 3) = 2; column 1: drop -90 and 13 -> mean(10, 11, 12) = 11
    assert _run(trimmed_mean(beta=0.2), ups)[0]["w"].tolist() == [2.0, 11.0]


# Krum, f = 1, five scalar updates a..e = 0, 0.1, 0.25, 0.3, 10; each scores its n - f - 2 = 2 nearest:
#   a: 0.01 + 0.0625 = 0.0725   b: 0.01 + 0.0225 = 0.0325   c: 0.0025 + 0.0225 = 0.025
#   d: 0.0025 + 0.04 = 0.0425   e: 9.7**2 + 9.75**2 (large)
KRUM_VALUES = [0.0, 0.1, 0.25, 0.3, 10.0]


@pytest.mark.parametrize(
    ("kwargs", "counts", "expected"),
    [
        ({"num_selected": 1}, None, 0.25),  # Krum: c
        ({"num_selected": 3}, None, 0.65 / 3),  # Multi-Krum: mean of c, b, d
        ({"num_selected": None}, None, 0.65 / 4),  # m = n - f = 4: c, b, d, a
        ({"num_selected": 3, "weighted": True}, [1, 1, 2, 1, 1], 0.225),  # (0.1 + 2*0.25 + 0.3) / 4
        ({"num_selected": 99}, None, 10.65 / 5),  # clamped to n: the plain mean
    ],
)
def test_krum_and_multikrum_hand_computed(kwargs, counts, expected):
    assert _x(krum(num_malicious=1, **kwargs), KRUM_VALUES, counts=counts) == pytest.approx(expected, abs=1e-12)


def test_krum_distances_sum_over_all_tensors():
    # by "x" alone Krum picks b (scores a 1.25, b 0.25, c 0.5, d 0.25); with "y" it picks d. Squared distances
    # over (x, y): a-b 1+9=10, a-c 0.25+9=9.25, b-c 0.25+36=36.25, a-d 1+0=1, b-d 0+9=9, c-d 0.25+9=9.25
    # f = 0 -> 2 nearest: a 1+9.25=10.25, b 9+10=19, c 9.25+9.25=18.5, d 1+9=10 -> d
    xs, ys = [0.0, 1.0, 0.5, 1.0], [0.0, 3.0, -3.0, 0.0]
    ups = [Update(k, _nt(x=np.array([x]), y=np.array([y])), 1) for k, x, y in zip("abcd", xs, ys, strict=True)]
    out = _run(krum(num_malicious=0), ups)[0]
    assert out is ups[3].weights


def test_krum_returns_the_selected_update_exactly_including_ints():
    ups = [Update(k, _nt(x=np.array([v], np.float32), n=np.array([i], np.int64)), 1)
           for i, (k, v) in enumerate(zip("abcde", KRUM_VALUES, strict=True))]
    out = _run(krum(num_malicious=1), ups)[0]
    assert out.equal(ups[2].weights)


def test_bulyan_hand_computed():
    # n = 7, f = 1: theta = 5, beta = 3; a..g = 0, 0.1, 0.2, 0.35, 0.5, 20, 21. Krum over what is left:
    #   7 left (4 nearest): c .1625 (b .2425, d .23, ...)                      -> c
    #   6 left (3 nearest): a .3825, b .2325, d .0625+.0225+.1225 = .2075, e .4325 -> d
    #   5 left (2 nearest): a .26, b .17, e .41, f 381.25, g 421.25            -> b
    #   4 left (1 nearest): a .25, e .25, f 1, g 1                             -> a (first of a tie)
    #   3 left (1 nearest): e 380.25, f 1, g 1                                 -> f (first of a tie)
    # selected 0, 0.1, 0.2, 0.35, 20; median 0.2; 3 closest: 0.2, 0.1, 0.35 -> 0.65 / 3
    values = [0.0, 0.1, 0.2, 0.35, 0.5, 20.0, 21.0]
    assert _x(bulyan(num_malicious=1), values) == pytest.approx(0.65 / 3, abs=1e-12)


def test_bulyan_with_too_few_updates_warns_and_lowers_f(caplog):
    # n = 5 < 4*1 + 3: f becomes (5 - 3) // 4 = 0, theta = beta = 5: the plain mean
    with caplog.at_level(logging.WARNING, logger="fedloom.strategies"):
        assert _x(bulyan(num_malicious=1), [1.0, 2.0, 3.0, 4.0, 10.0]) == pytest.approx(4.0)
    assert "bulyan" in caplog.text and "needs 7" in caplog.text


def test_krum_with_too_few_updates_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="fedloom.strategies"):
        assert _x(krum(num_malicious=2), [1.0, 2.0, 9.0]) in (1.0, 2.0)
    assert "needs 7" in caplog.text


@pytest.mark.parametrize(("agg", "expected"), [(median(), [3, 0, 1]), (trimmed_mean(beta=0.25), [3, 0, 1])])
def test_integer_and_bool_tensors_are_rounded_and_keep_dtype(agg, expected):
    # ints per coordinate: [1, 2, 4, 9] -> median 3, trimmed (2, 4) -> 3; [0, 0, 1, -1] -> 0;
    # bool [T, T, F, T] -> median 1, trimmed mean(1, 1) = 1 -> True
    rows = [[1, 0], [2, 0], [4, 1], [9, -1]]
    flags = [True, True, False, True]
    pairs = zip(rows, flags, strict=True)
    ups = [Update(str(i), _nt(n=np.array(r, np.int32), b=np.array(f)), 1) for i, (r, f) in enumerate(pairs)]
    out = _run(agg, ups)[0]
    assert out["n"].dtype == np.int32 and out["b"].dtype == np.bool_
    assert [*out["n"].tolist(), int(out["b"])] == expected


def test_multikrum_rounds_integer_means():
    ups = [Update(k, _nt(n=np.array([v], np.int64)), 1) for k, v in zip("abc", [1, 2, 2], strict=True)]
    out = _run(krum(num_malicious=0, num_selected=3), ups)[0]["n"]  # mean 5/3 -> 2
    assert out.dtype == np.int64 and out.tolist() == [2]


AGGREGATORS = [median(), trimmed_mean(beta=0.2), krum(num_malicious=1), krum(num_malicious=1, num_selected=3),
               bulyan(num_malicious=1)]


@pytest.mark.parametrize("agg", AGGREGATORS, ids=["median", "trimmed", "krum", "multikrum", "bulyan"])
def test_result_does_not_depend_on_arrival_order(agg):
    rng = np.random.default_rng(1)
    ups = [Update(f"n{i}", _nt(w=rng.normal(size=(4, 3)).astype(np.float32), b=rng.normal(size=3)), int(i + 1))
           for i in range(7)]
    first, count, total = _run(agg, ups)
    again, _, _ = _run(agg, [ups[i] for i in rng.permutation(7)])
    assert first.equal(again)
    assert (count, total) == (7, 28)
    assert agg.linear is False


@pytest.mark.parametrize("agg", AGGREGATORS, ids=["median", "trimmed", "krum", "multikrum", "bulyan"])
def test_no_updates_gives_none(agg):
    assert agg.result(agg.begin(_nt(x=np.zeros(1)))) is None


@pytest.mark.parametrize(
    ("factory", "kwargs"),
    [(trimmed_mean, {"beta": 0.5}), (trimmed_mean, {"beta": -0.1}), (krum, {"num_malicious": -1}),
     (krum, {"num_selected": 0}), (bulyan, {"num_malicious": -2})],
)
def test_invalid_hyperparameters_are_refused(factory, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        factory(**kwargs)
