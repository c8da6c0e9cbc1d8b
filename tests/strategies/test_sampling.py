"""Client selection: counts, seeding, reproducibility and validation."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.strategies import UniformSampler, round_rng

IDS = [f"node-{i:03d}" for i in range(100)]


@pytest.mark.parametrize(
    "fraction, min_nodes, available, expected",
    [
        (1.0, 1, 10, 10),
        (0.5, 1, 10, 5),
        (0.5, 1, 5, 3),  # ceil(2.5)
        (0.1, 1, 30, 3),
        (0.1, 4, 10, 4),  # min_nodes wins
        (0.1, 4, 2, 2),  # never more than available
        (0.01, 1, 10, 1),
        (0.3, 1, 10, 3),
        (0.7, 1, 10, 7),
        (1.0, 1, 0, 0),
    ],
)
def test_count(fraction, min_nodes, available, expected):
    assert UniformSampler(fraction, min_nodes).count(available) == expected


@pytest.mark.parametrize("fraction", [0.07, 0.1, 0.3, 0.55, 0.7, 0.9])
def test_count_has_no_float_rounding_surprises(fraction):
    # ceil(fraction * n) must not round 7.000000000000001 up to 8
    for n in range(1, 201):
        exact = -((-round(fraction * 100) * n) // 100)  # integer ceil of fraction*n for 2-decimal fractions
        assert UniformSampler(fraction).count(n) == exact, n


def test_select_is_sorted_sized_and_a_subset():
    picks = UniformSampler(0.2).select(3, 1, IDS)
    assert len(picks) == 20
    assert picks == sorted(picks)
    assert len(set(picks)) == 20 and set(picks) <= set(IDS)


def test_select_reproducible_and_independent_of_input_order():
    s = UniformSampler(0.1)
    a = s.select(42, 5, IDS)
    shuffled = list(np.random.default_rng(0).permutation(IDS))
    assert s.select(42, 5, shuffled) == a
    assert UniformSampler(0.1).select(42, 5, IDS) == a


def test_select_differs_across_rounds_and_seeds():
    s = UniformSampler(0.1)
    by_round = {tuple(s.select(1, r, IDS)) for r in range(1, 11)}
    by_seed = {tuple(s.select(seed, 1, IDS)) for seed in range(10)}
    assert len(by_round) == 10
    assert len(by_seed) == 10


def test_select_all_when_fraction_covers_everyone():
    assert UniformSampler(1.0).select(0, 1, ["b", "a", "c"]) == ["a", "b", "c"]
    assert UniformSampler(0.5, 3).select(0, 1, ["b", "a", "c"]) == ["a", "b", "c"]
    assert UniformSampler(0.5).select(0, 1, []) == []


def test_select_is_roughly_uniform():
    s = UniformSampler(0.1)
    counts = dict.fromkeys(IDS, 0)
    for r in range(1, 1001):
        for n in s.select(9, r, IDS):
            counts[n] += 1
    # each node expected 100 times; binomial sd ~9.5, so 55..145 is > 4.5 sd
    assert 55 <= min(counts.values()) and max(counts.values()) <= 145


@pytest.mark.parametrize("fraction, min_nodes", [(0.0, 1), (-0.1, 1), (1.01, 1), (float("nan"), 1), (0.5, 0)])
def test_validation(fraction, min_nodes):
    with pytest.raises(ValueError):
        UniformSampler(fraction, min_nodes)


def test_round_rng_reproducible_and_salted():
    assert round_rng(1, 2).integers(0, 2**62) == round_rng(1, 2).integers(0, 2**62)
    draws = {int(round_rng(1, 2, *salt).integers(0, 2**62)) for salt in [(), (0,), (1,)]}
    draws |= {int(round_rng(2, 1).integers(0, 2**62)), int(round_rng(1, 3).integers(0, 2**62))}
    assert len(draws) == 5
