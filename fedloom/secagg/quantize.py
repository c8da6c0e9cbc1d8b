"""Fixed-point quantization of float vectors into integers mod 2^bits, for masking and summing.

A value x is clipped to [-clip, clip] and mapped to round(x * scale) taken mod 2^bits (two's complement), with

    scale = floor((2^(bits-1) - 1) / max_summands) / clip,

so the sum of up to `max_summands` quantized vectors stays inside the signed range and never wraps: the sum
mod 2^bits, read back as a signed integer and divided by scale, is the sum of the clipped inputs up to rounding.

Error bound: for inputs inside [-clip, clip], each coordinate of the dequantized sum of `count` vectors differs
from the exact sum by at most count / (2 * scale) (half a quantization step per summand; see `error_bound`).
Inputs outside the range are clipped first, which adds their clipping error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_BITS = 48  # products x * scale stay exact enough in float64 and sums fit int64


@dataclass(frozen=True)
class QuantSpec:
    """How floats become ring elements: `bits` of the ring Z_{2^bits}, `clip` range, headroom for summands."""

    bits: int = 32
    clip: float = 1.0
    max_summands: int = 1

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in 2..{MAX_BITS}, got {self.bits}")
        if not (self.clip > 0 and np.isfinite(self.clip)):
            raise ValueError(f"clip must be positive and finite, got {self.clip}")
        if self.max_summands < 1 or self.levels < 1:
            raise ValueError(f"{self.bits} bits leave no room for {self.max_summands} summands")

    @property
    def levels(self) -> int:
        """Largest quantized magnitude of one vector's coordinate."""
        return ((1 << (self.bits - 1)) - 1) // self.max_summands

    @property
    def scale(self) -> float:
        return self.levels / self.clip

    @property
    def dtype(self) -> np.dtype:
        """Little-endian unsigned storage; arithmetic wraps mod 2^32 or 2^64, a multiple of 2^bits."""
        return np.dtype("<u4") if self.bits <= 32 else np.dtype("<u8")

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1


def quantize(x: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Clip, scale, round to nearest, reduce mod 2^bits; returns a 1-D array of `spec.dtype`."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise ValueError("cannot quantize non-finite values")
    q = np.rint(np.clip(flat, -spec.clip, spec.clip) * spec.scale).astype(np.int64)
    return (q & spec.mask).astype(spec.dtype)


def dequantize_sum(total: np.ndarray, *, count: int, spec: QuantSpec) -> np.ndarray:
    """Float sum of `count` vectors from their quantized sum mod 2^bits.

    `count` must not exceed the headroom the spec was built for, otherwise the sum may have wrapped.
    """
    if not 0 <= count <= spec.max_summands:
        raise ValueError(f"sum of {count} vectors exceeds the headroom of {spec.max_summands} summands")
    signed = (np.asarray(total).astype(np.int64)) & spec.mask
    signed[signed >= 1 << (spec.bits - 1)] -= 1 << spec.bits
    return signed / spec.scale


def error_bound(spec: QuantSpec, count: int) -> float:
    """Largest per-coordinate error of a dequantized sum of `count` in-range vectors."""
    return count * 0.5 / spec.scale
