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

    def select(self, seed: int, round_: int, available: Sequence[str]) -> list[str]:
        """A sorted, seeded sample of node ids; the order of ``available`` does not matter."""
        pool = sorted(available)
        k = self.count(len(pool))
        if k == len(pool):
            return pool
        picks = round_rng(seed, round_).choice(len(pool), size=k, replace=False)
        return [pool[i] for i in sorted(picks)]
