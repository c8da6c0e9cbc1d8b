"""Shamir secret sharing: hand-checked small-field vectors and threshold behaviour."""

import itertools
import os

import pytest

from fedloom.secagg import shamir

P = 7919
# f(x) = 1234 + 166 x + 94 x^2 over GF(7919); values computed by hand.
COEFFS = (1234, 166, 94)
HAND = {1: 1494, 2: 1942, 3: 2578, 4: 3402, 5: 4414, 6: 5614, 10: 12294 - 7919}


@pytest.mark.parametrize("x, y", sorted(HAND.items()))
def test_evaluate_matches_hand_values(x: int, y: int) -> None:
    assert shamir.evaluate(COEFFS, x, prime=P) == y


@pytest.mark.parametrize("points", list(itertools.combinations(sorted(HAND), 3)))
def test_any_three_shares_reconstruct(points: tuple[int, ...]) -> None:
    assert shamir.reconstruct({x: HAND[x] for x in points}, prime=P) == 1234


def test_lagrange_weights_by_hand() -> None:
    # weights at 0 for x = 2, 4, 5: 10/3, -5, 8/3 -> 1942*10/3 - 3402*5 + 4414*8/3 = 1234
    assert shamir.reconstruct({2: 1942, 4: 3402, 5: 4414}, prime=P) == 1234


def test_two_shares_give_the_line_not_the_secret() -> None:
    # the line through (1, 1494) and (2, 1942) has slope 448 and meets x = 0 at 1046
    assert shamir.reconstruct({1: 1494, 2: 1942}, prime=P) == 1046


@pytest.mark.parametrize("n, t", [(5, 1), (5, 3), (7, 7), (20, 11)])
def test_split_threshold(n: int, t: int) -> None:
    secret = shamir.random_element(shamir.MERSENNE_127)
    shares = shamir.split(secret, threshold=t, xs=range(1, n + 1))
    for subset in itertools.islice(itertools.combinations(shares, t), 20):
        assert shamir.reconstruct({x: shares[x] for x in subset}) == secret
    if t > 1:
        fewer = dict(list(shares.items())[: t - 1])
        assert shamir.reconstruct(fewer) != secret


@pytest.mark.parametrize("length", [1, 15, 16, 32, 45])
def test_bytes_roundtrip(length: int) -> None:
    secret = os.urandom(length)
    shares = shamir.split_bytes(secret, threshold=3, xs=[3, 8, 9, 11])
    assert all(len(s) == shamir.share_size(length) for s in shares.values())
    for subset in itertools.combinations(shares, 3):
        assert shamir.reconstruct_bytes({x: shares[x] for x in subset}, length=length) == secret


def test_bytes_too_few_shares_do_not_give_the_secret() -> None:
    secret = os.urandom(32)
    shares = shamir.split_bytes(secret, threshold=3, xs=[1, 2, 3])
    try:
        got = shamir.reconstruct_bytes({1: shares[1], 2: shares[2]}, length=32)
    except ValueError:
        return
    assert got != secret


@pytest.mark.parametrize("xs", [[0, 1, 2], [1, 1, 2], [1, P]])
def test_bad_points_rejected(xs: list[int]) -> None:
    with pytest.raises(ValueError):
        shamir.split(5, threshold=2, xs=xs, prime=P)
