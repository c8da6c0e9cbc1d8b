"""Central differential privacy for federated averaging (DP-FedAvg).

McMahan et al. 2018 ("Learning Differentially Private Recurrent Language
Models"): clip each client's delta (update - global) to L2 norm S, average the
clipped deltas with equal weights, add Gaussian noise of std z*S/m to the
average of m deltas, and account the privacy cost of each round as one step of
the sampled Gaussian mechanism with sample rate q = clients per round / total
clients. Andrew et al. 2021 ("Differentially Private Learning with Adaptive
Clipping"): S follows a target quantile of the update norms geometrically,
driven by a noisy count of unclipped updates.

Pieces: ``clip_deltas`` (Pre), ``uniform_mean`` (Aggregator),
``gaussian_noise`` (Post, holding the accountant and, when adaptive, the clip
norm); ``dp_fedavg`` composes them.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace

import numpy as np

from fedloom.strategies.accountant import DEFAULT_ORDERS, RdpAccountant, epsilon_from_rdp
from fedloom.strategies.pipeline import (
    Aggregator,
    Post,
    Pre,
    RoundInfo,
    Strategy,
    Update,
    check_finite,
    check_structure,
    stateless,
    weighted_mean,
)
from fedloom.strategies.sampling import round_rng
from fedloom.tensors import NamedTensors, is_float

_NOISE_SALT = 0x4450  # separates the DP noise streams from client sampling (same seed, same round)
_COUNT_SALT = 0x4451


def clip_delta(update: Update, global_weights: NamedTensors, clip_norm: float) -> tuple[Update, float]:
    """``update`` with its delta scaled to L2 norm at most ``clip_norm``, and the delta's original norm.

    The norm runs over all floating tensors together. Non-floating tensors
    (counters such as BatchNorm's) cannot be noised, so they keep the global values.
    """
    deltas = {name: array.astype(np.float64) - global_weights[name].astype(np.float64)
              for name, array in update.weights.items() if is_float(array.dtype)}
    norm = math.sqrt(sum(float(np.vdot(d, d)) for d in deltas.values()))
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    out = []
    for name, base in global_weights.items():
        if name in deltas:
            array = base.astype(np.float64) + deltas[name] * scale
            out.append((name, array.astype(base.dtype)))
        else:
            out.append((name, base))
    return replace(update, weights=NamedTensors(out)), norm


def clip_deltas(*, clip_norm: float) -> Pre:
    """Pre step: scale each client's delta (update - global) to L2 norm at most ``clip_norm``."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    return stateless(lambda update, global_weights: clip_delta(update, global_weights, float(clip_norm))[0])


@dataclass(frozen=True)
class _UniformMean:
    inner: Aggregator
    linear: bool = True

    def begin(self, global_weights: NamedTensors) -> object:
        return self.inner.begin(global_weights)

    def fold(self, acc: object, update: Update) -> object:
        return self.inner.fold(acc, replace(update, num_examples=1))

    def result(self, acc: object) -> tuple[NamedTensors, int, float] | None:
        return self.inner.result(acc)


def uniform_mean(*, precision: str = "float64") -> Aggregator:
    """The unweighted mean of updates: with DP each client's influence is bounded by the clip alone."""
    return _UniformMean(weighted_mean(precision=precision))


@dataclass(frozen=True)
class AdaptiveClip:
    """Geometric quantile tracking of the clip norm (Andrew et al. 2021).

    After each round, S <- S * exp(-learning_rate * (b - target_quantile)),
    where b = (unclipped count + N(0, count_stddev^2)) / m.
    ``count_stddev`` defaults to clients_per_round / 20, as in the paper.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_quantile <= 1.0:
            raise ValueError(f"target_quantile must be in [0, 1], got {self.target_quantile}")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be non-negative, got {self.learning_rate}")


@dataclass(frozen=True)
class _GaussianNoise:
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    delta: float
    seed: int | None
    adaptive: AdaptiveClip | None
    count_stddev: float
    orders: tuple[float, ...] = DEFAULT_ORDERS

    @property
    def update_noise_multiplier(self) -> float:
        """The noise on the average; with adaptive clipping part of the budget goes to the count."""
        if self.adaptive is None:
            return self.noise_multiplier
        return (self.noise_multiplier**-2 - (2 * self.count_stddev) ** -2) ** -0.5

    def init(self, weights: NamedTensors) -> dict:
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return {"seed": seed, "clip_norm": self.clip_norm, "rdp": (0.0,) * len(self.orders),
                "rounds": 0, "seen": 0, "unclipped": 0, "unclipped_fraction": math.nan}

    def preprocess(self, state: dict, update: Update, global_weights: NamedTensors) -> tuple[Update, dict]:
        """Per-update hook for adaptive clipping: clip at the current norm and count the unclipped."""
        if self.adaptive is None:
            return update, state
        clipped, norm = clip_delta(update, global_weights, state["clip_norm"])
        unclipped = state["unclipped"] + (norm <= state["clip_norm"])
        return clipped, {**state, "seen": state["seen"] + 1, "unclipped": unclipped}

    def apply(self, state: dict, global_weights: NamedTensors, aggregate: NamedTensors,
              info: RoundInfo) -> tuple[NamedTensors, dict]:
        m = info.num_updates
        if self.adaptive is not None and state["seen"] != m:
            raise RuntimeError(f"adaptive clipping saw {state['seen']} updates but {m} were aggregated: the "
                               "pipeline must call the post step's preprocess hook on every update")
        std = self.update_noise_multiplier * state["clip_norm"] / m
        rng = round_rng(state["seed"], info.round, _NOISE_SALT)
        noised = NamedTensors(
            (name, (a.astype(np.float64) + rng.normal(0.0, std, a.shape)).astype(a.dtype) if is_float(a.dtype) else a)
            for name, a in aggregate.items()
        )
        accountant = RdpAccountant(self.orders, state["rdp"]).step(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        new = {**state, "rdp": accountant.rdp, "rounds": state["rounds"] + 1, "seen": 0, "unclipped": 0}
        if self.adaptive is not None:
            new.update(self._next_clip(state, info))
        return noised, new

    def _next_clip(self, state: dict, info: RoundInfo) -> dict:
        assert self.adaptive is not None
        m = info.num_updates
        noise = round_rng(state["seed"], info.round, _COUNT_SALT).normal(0.0, self.count_stddev)
        fraction = (state["unclipped"] + noise) / m
        clip = state["clip_norm"] * math.exp(-self.adaptive.learning_rate * (fraction - self.adaptive.target_quantile))
        return {"clip_norm": clip, "unclipped_fraction": fraction}

    def metrics(self, state: dict) -> dict[str, float]:
        out = {"dp_epsilon": epsilon_from_rdp(self.orders, state["rdp"], self.delta)[0], "dp_delta": self.delta,
               "dp_clip_norm": state["clip_norm"]}
        if self.adaptive is not None:
            out["dp_unclipped_fraction"] = state["unclipped_fraction"]
        return out


def gaussian_noise(*, noise_multiplier: float, clip_norm: float, sample_rate: float, delta: float,
                   seed: int | None = None, adaptive: AdaptiveClip | None = None,
                   expected_clients: int | None = None) -> Post:
    """Post step: add N(0, (z*S/m)^2) to the average of m clipped updates and account the round.

    Reports ``dp_epsilon`` (for ``delta``) and ``dp_clip_norm`` through ``metrics``.
    ``seed`` seeds the noise from (seed, round); leave it None in a deployment
    (a secret random seed is drawn and kept in the state, so a resume replays it),
    since whoever knows the seed can subtract the noise. With ``adaptive``,
    clipping happens in this step's ``preprocess`` hook and S adapts each round.
    """
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be positive, got {noise_multiplier}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    count_stddev = 0.0
    if adaptive is not None:
        count_stddev = adaptive.count_stddev or (expected_clients or 0) / 20
        if not 2 * count_stddev > noise_multiplier:
            raise ValueError(f"adaptive clipping needs 2 * count_stddev ({2 * count_stddev:g}) > noise_multiplier "
                             f"({noise_multiplier:g}); give count_stddev or expected_clients")
    return _GaussianNoise(float(noise_multiplier), float(clip_norm), float(sample_rate), float(delta),
                          seed, adaptive, float(count_stddev))


def dp_fedavg(*, noise_multiplier: float, clip_norm: float, clients_per_round: int, total_clients: int,
              delta: float = 1e-5, seed: int | None = None, adaptive: AdaptiveClip | None = None,
              precision: str = "float64") -> Strategy:
    """DP-FedAvg with central Gaussian noise; fixed clipping, or adaptive when ``adaptive`` is given."""
    if not 0 < clients_per_round <= total_clients:
        raise ValueError(f"need 0 < clients_per_round <= total_clients, got {clients_per_round}, {total_clients}")
    noise = gaussian_noise(noise_multiplier=noise_multiplier, clip_norm=clip_norm, delta=delta, seed=seed,
                           sample_rate=clients_per_round / total_clients, adaptive=adaptive,
                           expected_clients=clients_per_round)
    clip = () if adaptive is not None else (clip_deltas(clip_norm=clip_norm),)
    return Strategy(name="dp_fedavg", pre=(check_structure(), check_finite(), *clip),
                    aggregate=uniform_mean(precision=precision), post=noise)


def dp_fedavg_adaptive(*, noise_multiplier: float, initial_clip_norm: float, clients_per_round: int,
                       total_clients: int, target_quantile: float = 0.5, clip_learning_rate: float = 0.2,
                       delta: float = 1e-5, seed: int | None = None) -> Strategy:
    """DP-FedAvg whose clip norm tracks a quantile of the update norms (Andrew et al. 2021)."""
    return dp_fedavg(noise_multiplier=noise_multiplier, clip_norm=initial_clip_norm,
                     clients_per_round=clients_per_round, total_clients=total_clients, delta=delta, seed=seed,
                     adaptive=AdaptiveClip(target_quantile=target_quantile, learning_rate=clip_learning_rate))
