"""The aggregation pipeline: weighted mean, update checks, and FedAvg end to end."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

from fedloom.strategies import Rejected, Update, check_finite, check_structure, fedavg, weighted_mean
from fedloom.tensors import NamedTensors

BF16 = np.dtype(ml_dtypes.bfloat16)


def _nt(**arrays) -> NamedTensors:
    return NamedTensors(arrays)


def _aggregate(agg, global_weights, updates):
    acc = agg.begin(global_weights)
    for u in updates:
        acc = agg.fold(acc, u)
    return agg.result(acc)


def test_weighted_mean_two_clients_hand_computed():
    g = _nt(w=np.zeros((2,), np.float32), b=np.zeros((), np.float32))
    a = Update("a", _nt(w=np.array([1.0, 2.0], np.float32), b=np.array(4.0, np.float32)), 1)
    c = Update("c", _nt(w=np.array([5.0, -2.0], np.float32), b=np.array(0.0, np.float32)), 3)
    out = _aggregate(weighted_mean(), g, [a, c])
    weights, total = out[0], out[-1]
    # w = (1*[1,2] + 3*[5,-2]) / 4 = [16/4, -4/4] = [4, -1];  b = (1*4 + 3*0) / 4 = 1
    assert weights["w"].tolist() == [4.0, -1.0]
    assert weights["b"] == 1.0
    assert total == 4
    assert list(weights) == ["w", "b"]
    assert weights["w"].dtype == np.float32 and weights["b"].shape == ()


def test_weighted_mean_three_clients_unequal_weights():
    g = _nt(x=np.zeros(3, np.float64))
    ups = [Update("a", _nt(x=np.array([1.0, 0.0, 3.0])), 2),
           Update("b", _nt(x=np.array([4.0, 6.0, 3.0])), 1),
           Update("c", _nt(x=np.array([0.0, 3.0, 3.0])), 5)]
    # (2*1 + 4 + 0)/8 = 0.75; (0 + 6 + 15)/8 = 2.625; 3
    assert _aggregate(weighted_mean(), g, ups)[0]["x"].tolist() == [0.75, 2.625, 3.0]


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int8, np.uint8])
def test_int_tensors_are_rounded_and_keep_dtype(dtype):
    g = _nt(n=np.zeros(3, dtype))
    ups = [Update("a", _nt(n=np.array([1, 2, 10], dtype)), 1), Update("b", _nt(n=np.array([2, 2, 13], dtype)), 2)]
    # (1+4)/3 = 1.67 -> 2; (2+4)/3 = 2; (10+26)/3 = 12
    out = _aggregate(weighted_mean(), g, ups)[0]["n"]
    assert out.dtype == np.dtype(dtype)
    assert out.tolist() == [2, 2, 12]


def test_bool_and_bfloat16_tensors():
    g = _nt(m=np.zeros(2, bool), h=np.zeros(2, BF16))
    ups = [Update("a", _nt(m=np.array([True, True]), h=np.array([1.0, 2.0], BF16)), 1),
           Update("b", _nt(m=np.array([False, True]), h=np.array([3.0, 4.0], BF16)), 3)]
    out = _aggregate(weighted_mean(), g, ups)[0]
    assert out["m"].dtype == bool and out["m"].tolist() == [False, True]  # 0.25 -> False, 1 -> True
    assert out["h"].dtype == BF16 and out["h"].astype(np.float32).tolist() == [2.5, 3.5]


@pytest.mark.parametrize("precision", ["float64", "native"])
def test_precision_gives_the_same_simple_mean(precision):
    g = _nt(w=np.zeros(2, np.float32), h=np.zeros(1, np.float16))
    ups = [Update("a", _nt(w=np.array([1.0, 3.0], np.float32), h=np.array([1.0], np.float16)), 1),
           Update("b", _nt(w=np.array([2.0, 5.0], np.float32), h=np.array([2.0], np.float16)), 1)]
    out = _aggregate(weighted_mean(precision=precision), g, ups)[0]
    assert out["w"].tolist() == [1.5, 4.0] and out["h"].tolist() == [1.5]
    assert out["w"].dtype == np.float32 and out["h"].dtype == np.float16


def test_float64_precision_is_more_accurate_than_native():
    # float32 spacing at 1e8 is 8, so a native float32 sum drops every +1; a float64 sum keeps all 16.
    g = _nt(w=np.zeros(1, np.float32))
    ups = [Update("big", _nt(w=np.array([1e8], np.float32)), 1)]
    ups += [Update(f"s{i}", _nt(w=np.array([1.0], np.float32)), 1) for i in range(16)]
    f64 = _aggregate(weighted_mean(precision="float64"), g, ups)[0]["w"][0]
    native = _aggregate(weighted_mean(precision="native"), g, ups)[0]["w"][0]
    assert f64 == np.float32((1e8 + 16) / 17)  # 5882353.88 -> float32 5882354.0
    assert native == np.float32(1e8) / np.float32(17)  # 5882352.94 -> float32 5882353.0
    assert f64 != native


def test_precision_validated():
    with pytest.raises(ValueError, match="precision"):
        weighted_mean(precision="float16")


def test_result_none_when_nothing_folded():
    agg = weighted_mean()
    assert agg.result(agg.begin(_nt(w=np.zeros(2)))) is None
    assert fedavg().finish(fedavg().init(_nt(w=np.zeros(2))), _nt(w=np.zeros(2)),
                           agg.begin(_nt(w=np.zeros(2)))) is None


def test_result_is_repeatable():
    agg = weighted_mean()
    g = _nt(w=np.zeros(2))
    acc = agg.begin(g)
    acc = agg.fold(acc, Update("a", _nt(w=np.array([2.0, 4.0])), 2))
    first = agg.result(acc)[0]["w"].tolist()
    assert agg.result(acc)[0]["w"].tolist() == first == [2.0, 4.0]


def test_fold_does_not_modify_the_update():
    agg = weighted_mean()
    w = np.array([1.0, 2.0])
    acc = agg.begin(_nt(w=np.zeros(2)))
    acc = agg.fold(acc, Update("a", _nt(w=w), 3))
    acc = agg.fold(acc, Update("b", _nt(w=w), 1))
    assert w.tolist() == [1.0, 2.0]
    assert agg.result(acc)[0]["w"].tolist() == [1.0, 2.0]


def test_fold_order_does_not_change_the_bits():
    rng = np.random.default_rng(7)
    g = _nt(w=np.zeros((4, 5), np.float32), b=np.zeros(5, np.float32))
    ups = [Update(f"n{i}", _nt(w=rng.standard_normal((4, 5)).astype(np.float32),
                               b=rng.standard_normal(5).astype(np.float32)), n)
           for i, n in enumerate([1, 3, 7, 2])]
    results = [_aggregate(weighted_mean(), g, list(p))[0] for p in itertools.permutations(ups)]
    assert all(r.equal(results[0]) for r in results[1:])
    # and the value is the hand formula
    ref = sum(u.weights["w"].astype(np.float64) * u.num_examples for u in ups) / 13
    np.testing.assert_array_equal(results[0]["w"], ref.astype(np.float32))


# ------------------------------------------------------------------ checks

G = _nt(w=np.zeros((2, 2), np.float32), b=np.zeros(2, np.float32))


@pytest.mark.parametrize(
    "weights, n, match",
    [
        (_nt(w=np.zeros((2, 2), np.float32)), 1, "missing \\['b'\\]"),
        (_nt(w=np.zeros((2, 2), np.float32), b=np.zeros(2, np.float32), c=np.zeros(1, np.float32)), 1,
         "unexpected \\['c'\\]"),
        (_nt(b=np.zeros(2, np.float32), w=np.zeros((2, 2), np.float32)), 1, "wrong parameter names"),
        (_nt(w=np.zeros((4,), np.float32), b=np.zeros(2, np.float32)), 1, "w: got float32\\[4\\]"),
        (_nt(w=np.zeros((2, 2), np.float64), b=np.zeros(2, np.float32)), 1, "w: got float64"),
        (_nt(w=np.zeros((2, 2), np.float32), b=np.zeros(2, np.float32)), 0, "num_examples must be positive"),
        (_nt(w=np.zeros((2, 2), np.float32), b=np.zeros(2, np.float32)), -3, "num_examples must be positive"),
    ],
)
def test_check_structure_rejects_with_reason(weights, n, match):
    step = check_structure()
    with pytest.raises(Rejected, match=match) as info:
        step.apply(step.init(G), Update("x", weights, n), G)
    assert info.value.reason == str(info.value)


def test_check_structure_accepts_matching_update():
    step = check_structure()
    u = Update("x", _nt(w=np.ones((2, 2), np.float32), b=np.ones(2, np.float32)), 5)
    assert step.apply(step.init(G), u, G)[0] is u


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, BF16])
def test_check_finite_rejects(bad, dtype):
    step = check_finite()
    w = np.array([1.0, bad]).astype(dtype)
    with pytest.raises(Rejected, match="non-finite values in b"):
        step.apply(None, Update("x", _nt(a=np.ones(2, dtype), b=w), 1), _nt(a=np.zeros(2), b=np.zeros(2)))


def test_check_finite_accepts_large_finite_float64_and_ints():
    step = check_finite()
    u = Update("x", _nt(big=np.array([1e300, -1e300]), i=np.array([2**62], np.int64)), 1)
    assert step.apply(None, u, u.weights)[0] is u


# ------------------------------------------------------------------ fedavg


def test_fedavg_end_to_end_with_a_rejected_update():
    s = fedavg()
    g = _nt(w=np.zeros(2, np.float32))
    state = s.init(g)
    acc = s.aggregate.begin(g)
    updates = [Update("a", _nt(w=np.array([2.0, 0.0], np.float32)), 1),
               Update("nan", _nt(w=np.array([np.nan, 0.0], np.float32)), 100),
               Update("wrong", _nt(w=np.zeros(3, np.float32)), 100),
               Update("b", _nt(w=np.array([6.0, 4.0], np.float32)), 3)]
    rejected = []
    for u in updates:
        try:
            acc = s.aggregate.fold(acc, s.preprocess(state, u, g))
        except Rejected as exc:
            rejected.append((u.node_id, exc.reason))
    new = s.finish(state, g, acc)
    assert [r[0] for r in rejected] == ["nan", "wrong"]
    # (1*[2,0] + 3*[6,4]) / 4 = [5, 3]
    assert new["w"].tolist() == [5.0, 3.0] and new["w"].dtype == np.float32
    assert s.name == "fedavg" and s.aggregate.linear
