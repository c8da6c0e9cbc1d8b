"""Composable strategies: pre-processing, aggregation and post-processing pieces, and presets."""

from fedloom.strategies.pipeline import (
    Aggregator,
    Post,
    Pre,
    Rejected,
    RoundInfo,
    Strategy,
    Update,
    check_finite,
    check_structure,
    weighted_mean,
)
from fedloom.strategies.presets import PRESETS, fedavg
from fedloom.strategies.sampling import UniformSampler, round_rng

__all__ = [
    "PRESETS",
    "Aggregator",
    "Post",
    "Pre",
    "Rejected",
    "RoundInfo",
    "Strategy",
    "UniformSampler",
    "Update",
    "check_finite",
    "check_structure",
    "fedavg",
    "round_rng",
    "weighted_mean",
]
