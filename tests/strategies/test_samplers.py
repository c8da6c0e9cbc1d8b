"""Weighted and availability-aware client selection."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom import Driver, InProcessFleet, NamedTensors, RunConfig, fedavg
from fedloom.strategies.sampling import AvailabilitySampler, UniformSampler, WeightedSampler, observe

NODES = [f"n{i}" for i in range(10)]


def _frequency(sampler, stats, rounds: int = 400) -> dict[str, int]:
    counts = dict.fromkeys(NODES, 0)
    for r in range(rounds):
        for node in sampler.select(7, r, NODES, stats):
            counts[node] += 1
    return counts


def test_weighted_sampler_prefers_large_nodes() -> None:
    stats: dict = {}
    for i, node in enumerate(NODES):
        observe(stats, node, ok=True, num_examples=1 if i < 9 else 100)
    counts = _frequency(WeightedSampler(fraction=0.1), stats)
    assert counts["n9"] > 300  # p = 100 / 109 per round
    assert sum(counts.values()) == 400


def test_availability_sampler_avoids_nodes_that_keep_failing() -> None:
    stats: dict = {}
    for _ in range(20):
        observe(stats, "n0", ok=False)
        observe(stats, "n1", ok=True, num_examples=5)
    counts = _frequency(AvailabilitySampler(fraction=0.2), stats)
    assert counts["n0"] < counts["n1"] / 5


@pytest.mark.parametrize("cls", [UniformSampler, WeightedSampler, AvailabilitySampler])
def test_samplers_are_seeded_and_sorted(cls) -> None:
    sampler = cls(fraction=0.3, min_nodes=2)
    a = sampler.select(3, 5, list(reversed(NODES)), sampler.init())
    assert a == sampler.select(3, 5, NODES, sampler.init()) == sorted(a)
    assert len(a) == 3


def test_observe_counts_attempts_and_successes() -> None:
    stats: dict = {}
    observe(stats, "a", ok=True, num_examples=12)
    observe(stats, "a", ok=False)
    assert stats["a"] == {"examples": 12.0, "successes": 1.0, "attempts": 2.0}


class _Const:
    def __init__(self, n: int):
        self.n = n

    def fit(self, weights, config):
        return weights, self.n, {}

    def evaluate(self, weights, config):
        return self.n, {}


def test_driver_feeds_the_sampler_its_outcomes() -> None:
    fleet = InProcessFleet({"a": _Const(3), "b": _Const(5)})
    driver = Driver(fleet, fedavg(), NamedTensors({"w": np.zeros(1, np.float32)}), RunConfig(rounds=2),
                    sampler=WeightedSampler())
    driver.run()
    assert driver.sampler_state["a"]["examples"] == 3 and driver.sampler_state["b"]["attempts"] == 2
