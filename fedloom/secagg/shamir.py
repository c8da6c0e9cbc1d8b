"""t-out-of-n Shamir secret sharing over a prime field.

A secret is the constant term of a random polynomial of degree t-1; share x is the polynomial's value at x
(x = 1..n, never 0). Any t shares determine the polynomial, hence the secret, by Lagrange interpolation at 0;
t-1 shares are consistent with every secret, so they reveal nothing about it.

Byte strings are cut into 15-byte chunks, each below the Mersenne prime 2^127-1, and every chunk is shared with
its own polynomial; a byte share is the concatenation of 16-byte big-endian field elements.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence

MERSENNE_127 = (1 << 127) - 1
CHUNK = 15  # bytes of secret per field element (2^120 < 2^127 - 1)
ELEMENT = 16  # bytes per encoded field element

Entropy = Callable[[int], bytes]


def evaluate(coefficients: Sequence[int], x: int, *, prime: int) -> int:
    """The polynomial sum_i coefficients[i] * x^i mod prime (Horner's rule)."""
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % prime
    return acc


def random_element(prime: int, entropy: Entropy = os.urandom) -> int:
    """A uniform field element; 64 extra random bits make the modular bias negligible."""
    size = (prime.bit_length() + 7) // 8 + 8
    return int.from_bytes(entropy(size), "big") % prime


def _check_points(xs: Iterable[int], prime: int) -> list[int]:
    points = list(xs)
    if len(set(points)) != len(points):
        raise ValueError("share points must be distinct")
    if any(not 0 < x < prime for x in points):
        raise ValueError("share points must lie in 1..prime-1")
    return points


def split(
    secret: int, *, threshold: int, xs: Iterable[int], prime: int = MERSENNE_127, entropy: Entropy = os.urandom
) -> dict[int, int]:
    """Shares {x: f(x)} of `secret` such that any `threshold` of them reconstruct it."""
    points = _check_points(xs, prime)
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold must be in 1..{len(points)}, got {threshold}")
    if not 0 <= secret < prime:
        raise ValueError("secret must be a field element")
    coefficients = [secret] + [random_element(prime, entropy) for _ in range(threshold - 1)]
    return {x: evaluate(coefficients, x, prime=prime) for x in points}


def reconstruct(shares: Mapping[int, int], *, prime: int = MERSENNE_127) -> int:
    """Lagrange interpolation at 0 of the points {x: y}: f(0) = sum_i y_i * prod_{j!=i} x_j / (x_j - x_i).

    With fewer shares than the threshold the result is a field element unrelated to the secret.
    """
    points = _check_points(shares, prime)
    if not points:
        raise ValueError("no shares to reconstruct from")
    total = 0
    for xi in points:
        num, den = 1, 1
        for xj in points:
            if xj != xi:
                num = num * xj % prime
                den = den * (xj - xi) % prime
        total = (total + shares[xi] * num * pow(den, -1, prime)) % prime
    return total


def split_bytes(
    secret: bytes, *, threshold: int, xs: Iterable[int], prime: int = MERSENNE_127, entropy: Entropy = os.urandom
) -> dict[int, bytes]:
    """Shares of a byte string: each 15-byte chunk shared separately, a share is 16 bytes per chunk."""
    if prime != MERSENNE_127:
        raise ValueError("byte sharing is defined over the Mersenne prime 2^127-1")
    points = list(xs)
    parts: dict[int, list[bytes]] = {x: [] for x in points}
    for start in range(0, len(secret), CHUNK):
        value = int.from_bytes(secret[start : start + CHUNK], "big")
        for x, y in split(value, threshold=threshold, xs=points, prime=prime, entropy=entropy).items():
            parts[x].append(y.to_bytes(ELEMENT, "big"))
    return {x: b"".join(chunks) for x, chunks in parts.items()}


def share_size(length: int) -> int:
    """Bytes in one share of a `length`-byte secret."""
    return -(-length // CHUNK) * ELEMENT


def reconstruct_bytes(shares: Mapping[int, bytes], *, length: int) -> bytes:
    """Inverse of split_bytes for a secret of `length` bytes."""
    size = share_size(length)
    if any(len(s) != size for s in shares.values()):
        raise ValueError(f"each share must be {size} bytes for a {length}-byte secret")
    out = []
    for i, start in enumerate(range(0, length, CHUNK)):
        chunk_len = min(CHUNK, length - start)
        ys = {x: int.from_bytes(s[i * ELEMENT : (i + 1) * ELEMENT], "big") for x, s in shares.items()}
        value = reconstruct(ys)
        if value >= 1 << (8 * chunk_len):
            raise ValueError("shares do not reconstruct a valid secret (too few or corrupted)")
        out.append(value.to_bytes(chunk_len, "big"))
    return b"".join(out)
