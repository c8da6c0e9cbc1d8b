"""Ready-made strategies, each a few lines built from the public pieces."""

from __future__ import annotations

from fedloom.strategies.pipeline import Strategy, check_finite, check_structure, weighted_mean


def fedavg(*, precision: str = "float64") -> Strategy:
    """FedAvg (McMahan et al. 2017): the example-weighted mean of client weights."""
    return Strategy(
        name="fedavg",
        pre=(check_structure(), check_finite()),
        aggregate=weighted_mean(precision=precision),
    )


PRESETS = {"fedavg": fedavg}
