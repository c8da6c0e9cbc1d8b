"""Pieces for asynchronous aggregation, and the FedBuff preset (Nguyen et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from fedloom.strategies.pipeline import (
    Asynchronous,
    Pre,
    RoundInfo,
    Strategy,
    Update,
    check_finite,
    check_structure,
    stateless,
    weighted_mean,
)
from fedloom.tensors import NamedTensors, is_float


def _scale_stale(update: Update, global_weights: NamedTensors, *, exponent: float) -> Update:
    if update.staleness <= 0:
        return update
    s = (1.0 + update.staleness) ** -exponent
    scaled = NamedTensors(
        (n, (global_weights[n] + s * (w.astype(np.float64) - global_weights[n])).astype(w.dtype)
         if is_float(w.dtype) else w)
        for n, w in update.weights.items()
    )
    return replace(update, weights=scaled)


def staleness_scaling(*, exponent: float = 0.5) -> Pre:
    """Shrink a stale update's delta by ``(1 + staleness) ** -exponent`` (FedBuff's polynomial rule)."""
    if exponent < 0:
        raise ValueError(f"exponent must be >= 0, got {exponent}")
    return stateless(partial(_scale_stale, exponent=exponent))


@dataclass(frozen=True)
class _ServerLr:
    lr: float

    def init(self, weights: NamedTensors) -> None:
        return None

    def apply(self, state: None, global_weights: NamedTensors, aggregate: NamedTensors,
              info: RoundInfo) -> tuple[NamedTensors, None]:
        if self.lr == 1.0:
            return aggregate, None
        out = NamedTensors(
            (n, (g + self.lr * (a.astype(np.float64) - g)).astype(g.dtype) if is_float(g.dtype) else a)
            for (n, a), g in zip(aggregate.items(), global_weights.values(), strict=True)
        )
        return out, None


def server_lr(lr: float = 1.0) -> _ServerLr:
    """Move the global model ``lr`` of the way towards the aggregate."""
    if lr <= 0:
        raise ValueError(f"server learning rate must be positive, got {lr}")
    return _ServerLr(lr)


def fedbuff(*, buffer_size: int = 10, concurrency: int = 20, server_learning_rate: float = 1.0,
            staleness_exponent: float = 0.5) -> Strategy:
    """FedBuff: asynchronous, buffered, staleness-weighted FedAvg."""
    return Strategy(
        name="fedbuff",
        pre=(check_structure(), check_finite(), staleness_scaling(exponent=staleness_exponent)),
        aggregate=weighted_mean(),
        post=server_lr(server_learning_rate),
        asynchronous=Asynchronous(buffer_size=buffer_size, concurrency=concurrency),
    )
