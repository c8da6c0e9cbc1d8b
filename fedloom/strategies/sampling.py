"""Client selection, seeded from (seed, round) so a run replays exactly."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def round_rng(seed: int, round_: int, *salt: int) -> np.random.Generator:
    """The random generator for one round of one run (and an optional salt)."""
    # SeedSequence ignores trailing zero words, so [s, r, 0] would equal [s, r]: end a salt with its length.
    words = [seed, round_, *salt, len(salt)] if salt else [seed, round_]
    return np.random.default_rng(np.random.SeedSequence(words))


@dataclass(frozen=True)
class UniformSampler:
    """Sample ``fraction`` of the available nodes, at least ``min_nodes``."""

    fraction: float = 1.0
    min_nodes: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_nodes < 1:
            raise ValueError(f"min_nodes must be at least 1, got {self.min_nodes}")

    def count(self, available: int) -> int:
        # round first: 0.07 * 100 is 7.000000000000001 in floating point, and its ceil is not 8
        return min(available, max(self.min_nodes, math.ceil(round(self.fraction * available, 9))))

    def select(self, seed: int, round_: int, available: Sequence[str], stats: dict | None = None) -> list[str]:
        """A sorted, seeded sample of node ids; the order of ``available`` does not matter."""
        pool = sorted(available)
        k = self.count(len(pool))
        if k == len(pool):
            return pool
        picks = round_rng(seed, round_).choice(len(pool), size=k, replace=False)
        return [pool[i] for i in sorted(picks)]

    def init(self) -> dict:
        return {}


# Node statistics a sampler may use: node id -> {"examples", "successes", "attempts"}.
NodeStats = dict[str, dict[str, float]]


def observe(stats: NodeStats, node_id: str, *, ok: bool, num_examples: int = 0) -> NodeStats:
    """Record one outcome of a node (the driver calls this for every fit outcome)."""
    entry = stats.setdefault(node_id, {"examples": 0.0, "successes": 0.0, "attempts": 0.0})
    entry["attempts"] += 1
    if ok:
        entry["successes"] += 1
        entry["examples"] = float(num_examples)
    return stats


def _pick(seed: int, round_: int, pool: list[str], k: int, weights: np.ndarray) -> list[str]:
    if k >= len(pool):
        return pool
    p = weights / weights.sum()
    picks = round_rng(seed, round_).choice(len(pool), size=k, replace=False, p=p)
    return [pool[i] for i in sorted(picks)]


@dataclass(frozen=True)
class WeightedSampler:
    """Sample nodes with probability proportional to their data size (last reported
    example count; nodes not yet seen count as the mean of those seen)."""

    fraction: float = 1.0
    min_nodes: int = 1

    def __post_init__(self) -> None:
        UniformSampler(self.fraction, self.min_nodes)  # same validation

    def init(self) -> NodeStats:
        return {}

    def select(self, seed: int, round_: int, available: Sequence[str], stats: NodeStats | None = None) -> list[str]:
        pool = sorted(available)
        stats = stats or {}
        known = [stats[n]["examples"] for n in pool if stats.get(n, {}).get("examples", 0) > 0]
        default = float(np.mean(known)) if known else 1.0
        sizes = np.array([stats.get(n, {}).get("examples", 0) or default for n in pool], dtype=np.float64)
        return _pick(seed, round_, pool, UniformSampler(self.fraction, self.min_nodes).count(len(pool)), sizes)


@dataclass(frozen=True)
class AvailabilitySampler:
    """Prefer nodes that tend to return results: weight = (successes + 1) / (attempts + 2),
    the posterior mean of a node's success rate, so new nodes still get picked."""

    fraction: float = 1.0
    min_nodes: int = 1

    def __post_init__(self) -> None:
        UniformSampler(self.fraction, self.min_nodes)

    def init(self) -> NodeStats:
        return {}

    def select(self, seed: int, round_: int, available: Sequence[str], stats: NodeStats | None = None) -> list[str]:
        pool = sorted(available)
        stats = stats or {}
        rate = np.array([(stats.get(n, {}).get("successes", 0) + 1) / (stats.get(n, {}).get("attempts", 0) + 2)
                         for n in pool])
        return _pick(seed, round_, pool, UniformSampler(self.fraction, self.min_nodes).count(len(pool)), rate)


SAMPLERS = {"uniform": UniformSampler, "weighted": WeightedSampler, "availability": AvailabilitySampler}
