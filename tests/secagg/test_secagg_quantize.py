"""Fixed-point quantization mod 2^bits and dequantization of sums."""

import numpy as np
import pytest

from fedloom.secagg.quantize import QuantSpec, dequantize_sum, error_bound, quantize


def test_quantize_by_hand() -> None:
    spec = QuantSpec(bits=8, clip=1.0, max_summands=1)  # levels 127, scale 127
    q = quantize(np.array([0.5, -1.0, 2.0, 0.0]), spec)
    # rint(63.5) = 64 (half to even); -127 mod 256 = 129; 2.0 clips to 127
    assert q.tolist() == [64, 129, 127, 0]
    assert q.dtype == np.dtype("<u4")


def test_sum_by_hand() -> None:
    spec = QuantSpec(bits=8, clip=1.0, max_summands=2)  # levels 63, scale 63
    q1 = quantize(np.array([1.0, -1.0, 0.5]), spec)  # 63, 193, rint(31.5) = 32
    q2 = quantize(np.array([1.0, -1.0, -0.25]), spec)  # 63, 193, rint(-15.75) = -16 -> 240
    assert q1.tolist() == [63, 193, 32] and q2.tolist() == [63, 193, 240]
    total = (q1 + q2) & spec.mask  # 126, 130, 16
    assert total.tolist() == [126, 130, 16]
    np.testing.assert_allclose(dequantize_sum(total, count=2, spec=spec), [2.0, -2.0, 16 / 63])
    assert abs(16 / 63 - 0.25) <= error_bound(spec, 2) == pytest.approx(1 / 63)


@pytest.mark.parametrize("bits, n", [(16, 3), (32, 20), (40, 100)])
def test_sum_within_error_bound(bits: int, n: int) -> None:
    rng = np.random.default_rng(bits)
    spec = QuantSpec(bits=bits, clip=2.0, max_summands=n)
    xs = rng.uniform(-2, 2, size=(n, 500))
    xs[0, :5] = [2.0, -2.0, 2.0, -2.0, 2.0]  # extremes must not wrap
    total = np.zeros(500, dtype=spec.dtype)
    for x in xs:
        total += quantize(x, spec)
    got = dequantize_sum(total, count=n, spec=spec)
    assert np.max(np.abs(got - xs.sum(axis=0))) <= error_bound(spec, n)


def test_all_at_clip_does_not_wrap() -> None:
    spec = QuantSpec(bits=16, clip=1.0, max_summands=7)
    total = sum(quantize(np.full(3, -1.0), spec).astype(np.int64) for _ in range(7))
    np.testing.assert_allclose(dequantize_sum(np.asarray(total), count=7, spec=spec), -7.0)


def test_count_beyond_headroom_rejected() -> None:
    spec = QuantSpec(bits=32, max_summands=4)
    with pytest.raises(ValueError, match="headroom"):
        dequantize_sum(np.zeros(2, dtype=spec.dtype), count=5, spec=spec)


@pytest.mark.parametrize("kwargs", [{"bits": 1}, {"bits": 64}, {"clip": 0.0}, {"bits": 4, "max_summands": 9}])
def test_bad_spec(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        QuantSpec(**kwargs)


def test_non_finite_rejected() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.array([0.0, np.nan]), QuantSpec())
