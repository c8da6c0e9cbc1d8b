"""Server optimizers: Post pieces that step from the global weights along the pseudo-gradient.

The pseudo-gradient of a round is ``delta = aggregate - global`` (Reddi et al.
2021, "Adaptive Federated Optimization"). Each factory returns a piece with
``init(weights) -> state`` and ``apply(state, global, aggregate, info) ->
(new weights, state)``. States are plain dicts of numpy arrays and Python
scalars, so a checkpoint can hold them and a resumed run continues bit for bit.

Only floating-point tensors are optimized; integer and bool tensors (e.g. a
BatchNorm's ``num_batches_tracked``) pass through from the aggregate. The state
of a float64 tensor is float64; that of any narrower float (float32, float16,
bfloat16) is float32, and the result is cast back to the tensor's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedloom.strategies.pipeline import Post, RoundInfo, State
from fedloom.tensors import NamedTensors, is_float

Arrays = dict[str, np.ndarray]


def _state_dtype(dtype: np.dtype) -> np.dtype | None:
    """The dtype the optimizer keeps for a tensor, or None if it is not optimized."""
    if dtype == np.float64:
        return np.dtype(np.float64)
    if is_float(dtype):
        return np.dtype(np.float32)
    return None


def _zeros(weights: NamedTensors, value: float = 0.0) -> Arrays:
    out = {}
    for name, array in weights.items():
        dtype = _state_dtype(array.dtype)
        if dtype is not None:
            out[name] = np.full(array.shape, value, dtype=dtype)
    return out


def _deltas(global_weights: NamedTensors, aggregate: NamedTensors, names: Arrays) -> Arrays:
    """``aggregate - global`` in the state dtype, for the optimized tensors."""
    out = {}
    for name, slot in names.items():
        out[name] = aggregate[name].astype(slot.dtype) - global_weights[name].astype(slot.dtype)
    return out


def _step(global_weights: NamedTensors, aggregate: NamedTensors, steps: Arrays) -> NamedTensors:
    """``global + step`` for optimized tensors, the aggregate for the others."""
    out = []
    for name, array in global_weights.items():
        if name in steps:
            step = steps[name]
            out.append((name, (array.astype(step.dtype) + step).astype(array.dtype, copy=False)))
        else:
            out.append((name, aggregate[name]))
    return NamedTensors(out)


@dataclass(frozen=True)
class _Momentum:
    lr: float
    momentum: float

    def init(self, weights: NamedTensors) -> State:
        return {"velocity": _zeros(weights)}

    def apply(
        self, state: State, global_weights: NamedTensors, aggregate: NamedTensors, info: RoundInfo
    ) -> tuple[NamedTensors, State]:
        deltas = _deltas(global_weights, aggregate, state["velocity"])
        velocity = {n: self.momentum * state["velocity"][n] + d for n, d in deltas.items()}
        steps = {n: self.lr * v for n, v in velocity.items()}
        return _step(global_weights, aggregate, steps), {"velocity": velocity}


def server_momentum(*, lr: float = 1.0, momentum: float = 0.9) -> Post:
    """Server SGD with heavy-ball momentum (FedAvgM, Hsu et al. 2019).

    ``v <- momentum * v + delta``; ``x <- x + lr * v``. With ``lr=1, momentum=0``
    the result is the aggregate itself (up to rounding).
    """
    _check(lr=lr, momentum=momentum)
    return _Momentum(float(lr), float(momentum))


SecondMoment = Callable[[np.ndarray, np.ndarray, float], np.ndarray]  # (v, delta**2, beta2) -> new v


def _adam_moment(v: np.ndarray, d2: np.ndarray, beta2: float) -> np.ndarray:
    return beta2 * v + (1.0 - beta2) * d2


def _yogi_moment(v: np.ndarray, d2: np.ndarray, beta2: float) -> np.ndarray:
    return v - (1.0 - beta2) * d2 * np.sign(v - d2)


def _adagrad_moment(v: np.ndarray, d2: np.ndarray, beta2: float) -> np.ndarray:
    return v + d2


@dataclass(frozen=True)
class _Adaptive:
    """FedAdam / FedYogi / FedAdagrad: they differ only in the second-moment rule."""

    lr: float
    beta1: float
    beta2: float
    tau: float
    second_moment: SecondMoment
    initial_accumulator: float
    bias_correction: bool

    def init(self, weights: NamedTensors) -> State:
        return {"m": _zeros(weights), "v": _zeros(weights, self.initial_accumulator), "step": 0}

    def apply(
        self, state: State, global_weights: NamedTensors, aggregate: NamedTensors, info: RoundInfo
    ) -> tuple[NamedTensors, State]:
        step = state["step"] + 1
        lr = self.lr
        if self.bias_correction:  # Kingma & Ba's efficient form (before their section 2.1)
            lr *= math.sqrt(1.0 - self.beta2**step) / (1.0 - self.beta1**step)
        deltas = _deltas(global_weights, aggregate, state["m"])
        m = {n: self.beta1 * state["m"][n] + (1.0 - self.beta1) * d for n, d in deltas.items()}
        v = {n: self.second_moment(state["v"][n], d * d, self.beta2) for n, d in deltas.items()}
        steps = {n: lr * m[n] / (np.sqrt(v[n]) + self.tau) for n in deltas}
        return _step(global_weights, aggregate, steps), {"m": m, "v": v, "step": step}


def adam(
    *, lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-9,
    initial_accumulator: float = 0.0, bias_correction: bool = False,
) -> Post:
    """Server Adam (FedAdam): ``v <- beta2 v + (1 - beta2) delta**2``.

    ``m <- beta1 m + (1 - beta1) delta``; ``x <- x + lr m / (sqrt(v) + tau)``.
    As in Reddi et al. there is no bias correction unless ``bias_correction``.
    """
    _check(lr=lr, beta1=beta1, beta2=beta2, tau=tau, initial_accumulator=initial_accumulator)
    return _Adaptive(*_floats(lr, beta1, beta2, tau), _adam_moment, float(initial_accumulator), bias_correction)


def yogi(
    *, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
    initial_accumulator: float = 0.0, bias_correction: bool = False,
) -> Post:
    """Server Yogi (FedYogi): ``v <- v - (1 - beta2) delta**2 sign(v - delta**2)``; otherwise as ``adam``."""
    _check(lr=lr, beta1=beta1, beta2=beta2, tau=tau, initial_accumulator=initial_accumulator)
    return _Adaptive(*_floats(lr, beta1, beta2, tau), _yogi_moment, float(initial_accumulator), bias_correction)


def adagrad(
    *, lr: float = 0.1, beta1: float = 0.0, tau: float = 1e-9, initial_accumulator: float = 0.0,
) -> Post:
    """Server Adagrad (FedAdagrad): ``v <- v + delta**2``; otherwise as ``adam`` (no bias correction)."""
    _check(lr=lr, beta1=beta1, tau=tau, initial_accumulator=initial_accumulator)
    return _Adaptive(*_floats(lr, beta1, 0.0, tau), _adagrad_moment, float(initial_accumulator), False)


def _floats(*values: float) -> tuple[float, ...]:
    """Python floats, so a numpy scalar hyperparameter cannot widen a float32 state."""
    return tuple(float(v) for v in values)


def _check(**values: float) -> None:
    """lr > 0; momentum and betas in [0, 1); tau and the initial accumulator >= 0."""
    for name, value in values.items():
        if name == "lr":
            ok, want = value > 0.0, "positive"
        elif name in ("momentum", "beta1", "beta2"):
            ok, want = 0.0 <= value < 1.0, "in [0, 1)"
        else:
            ok, want = value >= 0.0, "non-negative"
        if not ok:
            raise ValueError(f"{name} must be {want}, got {value!r}")


@dataclass(frozen=True)
class _Chain:
    posts: tuple[Post, ...]

    def init(self, weights: NamedTensors) -> State:
        return [post.init(weights) for post in self.posts]

    def apply(
        self, state: State, global_weights: NamedTensors, aggregate: NamedTensors, info: RoundInfo
    ) -> tuple[NamedTensors, State]:
        new_state = []
        for post, piece_state in zip(self.posts, state, strict=True):
            aggregate, piece_state = post.apply(piece_state, global_weights, aggregate, info)
            new_state.append(piece_state)
        return aggregate, new_state

    def metrics(self, state: State) -> dict[str, float]:
        out: dict[str, float] = {}
        for post, piece_state in zip(self.posts, state, strict=True):
            report = getattr(post, "metrics", None)
            if report is not None:
                out.update(report(piece_state))
        return out


def chain_post(*posts: Post) -> Post:
    """Run post pieces in order: each one's output is the next one's aggregate.

    Every piece sees the same global weights; the state is the list of the
    pieces' states. E.g. ``chain_post(dp_noise(...), adam(...))`` adds noise to
    the aggregate, then takes an Adam step towards the noisy aggregate.
    """
    return _Chain(tuple(posts))
