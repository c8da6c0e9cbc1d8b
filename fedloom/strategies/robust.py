"""Byzantine-robust aggregators: coordinate-wise median, trimmed mean, Krum, Multi-Krum, Bulyan.

None of these is linear, so each one buffers the round's updates (references
to the arrays the fleet delivered, no copies) and computes the result at the
end: the coordinator holds every update of a round at once, plus one float64
stack of a single tensor across all updates while it works on that tensor.
Krum and Bulyan also hold an n x n distance matrix. This is inherent to the
rules (a median needs all values); use them with client counts the
coordinator's memory can hold.

The updates are sorted by node id before aggregation, so the result does not
depend on the order in which they arrived. Arithmetic is in float64; integer
and bool tensors are rounded to the nearest value and cast back to their dtype,
and a Krum selection of one update returns that update exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedloom.strategies.pipeline import Aggregator, State, Update
from fedloom.tensors import NamedTensors

log = logging.getLogger("fedloom.strategies")

Combine = Callable[[Sequence[Update]], NamedTensors]


@dataclass(frozen=True)
class _Buffered:
    """Keeps a round's updates; ``combine`` turns them into the aggregate."""

    combine: Combine
    linear: bool = False

    def begin(self, global_weights: NamedTensors) -> State:
        return {"updates": []}

    def fold(self, acc: State, update: Update) -> State:
        acc["updates"].append(update)
        return acc

    def result(self, acc: State) -> tuple[NamedTensors, int, float] | None:
        updates = sorted(acc["updates"], key=lambda u: u.node_id)
        if not updates:
            return None
        return self.combine(updates), len(updates), sum(u.num_examples for u in updates)


def _stack(updates: Sequence[Update], name: str) -> np.ndarray:
    """One tensor of every update as a float64 array of shape (n, *shape)."""
    first = updates[0].weights[name]
    out = np.empty((len(updates), *first.shape), dtype=np.float64)
    for i, update in enumerate(updates):
        out[i] = update.weights[name]
    return out


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Back to the model's dtype; integers and bools are rounded, not truncated."""
    if dtype.kind in "iub":
        values = np.rint(values)
    return values.astype(dtype)


def _per_tensor(updates: Sequence[Update], fn: Callable[[np.ndarray], np.ndarray]) -> NamedTensors:
    """Apply ``fn`` (n, *shape) -> shape to each tensor's stack."""
    first = updates[0].weights
    return NamedTensors((name, _cast(fn(_stack(updates, name)), a.dtype)) for name, a in first.items())


def _mean(updates: Sequence[Update], *, weighted: bool) -> NamedTensors:
    if not weighted:
        return _per_tensor(updates, lambda s: s.mean(axis=0))
    w = np.array([u.num_examples for u in updates], dtype=np.float64)
    return _per_tensor(updates, lambda s: np.tensordot(w / w.sum(), s, axes=1))


# ----------------------------------------------------------------- median / trimmed mean


def median() -> Aggregator:
    """Coordinate-wise median (Yin et al. 2018), unweighted; the mean of the middle two for even counts."""
    return _Buffered(lambda updates: _per_tensor(updates, lambda s: np.median(s, axis=0)))


def _trimmed(stack: np.ndarray, k: int) -> np.ndarray:
    n = stack.shape[0]
    if k == 0:
        return stack.mean(axis=0)
    return np.partition(stack, (k, n - k - 1), axis=0)[k : n - k].mean(axis=0)


def trimmed_mean(*, beta: float = 0.2) -> Aggregator:
    """Coordinate-wise trimmed mean (Yin et al. 2018), unweighted.

    Per coordinate, drops the ``int(beta * n)`` smallest and largest values of
    the n updates and averages the rest (scipy's ``trim_mean``).
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
    return _Buffered(lambda updates: _per_tensor(updates, lambda s: _trimmed(s, int(beta * len(updates)))))


# ----------------------------------------------------------------- Krum / Multi-Krum / Bulyan


def _distances(updates: Sequence[Update]) -> np.ndarray:
    """Squared Euclidean distances between the updates over all tensors, (n, n)."""
    n = len(updates)
    d = np.zeros((n, n))
    for name in updates[0].weights:
        flat = _stack(updates, name).reshape(n, -1)
        for i in range(n - 1):
            diff = flat[i + 1 :] - flat[i]
            d[i, i + 1 :] += np.einsum("ij,ij->i", diff, diff)
    return d + d.T


def _krum_scores(d: np.ndarray, num_malicious: int) -> np.ndarray:
    """Each update's sum of squared distances to its n - f - 2 nearest others."""
    n = len(d)
    if n == 1:
        return np.zeros(1)
    k = min(max(1, n - num_malicious - 2), n - 1)
    others = np.sort(d + np.diag(np.full(n, np.inf)), axis=1)  # self last
    return others[:, :k].sum(axis=1)


def _warn_small(rule: str, n: int, need: int, num_malicious: int) -> None:
    if n < need:
        log.warning("%s: %d updates cannot tolerate %d malicious ones (needs %d); guarantee void",
                    rule, n, num_malicious, need)


@dataclass(frozen=True)
class _Krum:
    num_malicious: int
    num_selected: int | None
    weighted: bool

    def __call__(self, updates: Sequence[Update]) -> NamedTensors:
        n = len(updates)
        _warn_small("krum", n, 2 * self.num_malicious + 3, self.num_malicious)
        scores = _krum_scores(_distances(updates), self.num_malicious)
        m = n - self.num_malicious if self.num_selected is None else self.num_selected
        m = min(max(m, 1), n)
        if m == 1:
            return updates[int(np.argmin(scores))].weights
        best = np.argsort(scores, kind="stable")[:m]
        return _mean([updates[i] for i in sorted(best)], weighted=self.weighted)


def krum(*, num_malicious: int = 0, num_selected: int | None = 1, weighted: bool = False) -> Aggregator:
    """Krum and Multi-Krum (Blanchard et al. 2017).

    Scores each update by the sum of squared distances to its ``n - f - 2``
    nearest others (f = ``num_malicious``) and returns the best-scoring update
    (``num_selected=1``, Krum) or the mean of the ``num_selected`` best
    (Multi-Krum; ``None`` means ``n - f``). The mean is unweighted as in the
    paper; ``weighted=True`` weights by ``num_examples`` as Flower does, which
    lets a selected client inflate its weight by lying about its data size.
    Needs ``n >= 2f + 3`` for its guarantee; with fewer it still runs and warns.
    """
    if num_malicious < 0:
        raise ValueError(f"num_malicious must be >= 0, got {num_malicious}")
    if num_selected is not None and num_selected < 1:
        raise ValueError(f"num_selected must be >= 1 or None, got {num_selected}")
    return _Buffered(_Krum(num_malicious, num_selected, weighted))


def _closest_to_median(stack: np.ndarray, beta: int) -> np.ndarray:
    """Per coordinate, the mean of the ``beta`` values closest to the median."""
    gap = np.abs(stack - np.median(stack, axis=0))
    nearest = np.argsort(gap, axis=0, kind="stable")[:beta]
    return np.take_along_axis(stack, nearest, axis=0).mean(axis=0)


@dataclass(frozen=True)
class _Bulyan:
    num_malicious: int

    def __call__(self, updates: Sequence[Update]) -> NamedTensors:
        n, f = len(updates), self.num_malicious
        if n < 4 * f + 3:
            _warn_small("bulyan", n, 4 * f + 3, f)
            f = max(0, (n - 3) // 4)
        theta, d = n - 2 * f, _distances(updates)
        remaining, selected = list(range(n)), []
        for _ in range(theta):  # Krum, again and again, over what is left
            scores = _krum_scores(d[np.ix_(remaining, remaining)], f)
            selected.append(remaining.pop(int(np.argmin(scores))))
        chosen = [updates[i] for i in sorted(selected)]
        beta = theta - 2 * f
        return _per_tensor(chosen, lambda s: _closest_to_median(s, beta))


def bulyan(*, num_malicious: int = 0) -> Aggregator:
    """Bulyan (El Mhamdi et al. 2018) over Krum.

    Selects ``theta = n - 2f`` updates by applying Krum repeatedly to the ones
    not yet selected, then per coordinate averages the ``beta = theta - 2f``
    selected values closest to their median. Needs ``n >= 4f + 3``; with fewer
    updates it warns and uses the largest f the count supports.
    """
    if num_malicious < 0:
        raise ValueError(f"num_malicious must be >= 0, got {num_malicious}")
    return _Buffered(_Bulyan(num_malicious))
