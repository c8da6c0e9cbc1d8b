"""The aggregation pipeline: pre (per update) -> aggregate (streaming) -> post.

Every piece is a small object with explicit state, created by a factory
(optax's shape): ``init`` builds the state, the other methods take the state
and return the new one. Nothing here knows about transports or protos.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedloom.buffers import Recycler, add_scaled, all_finite
from fedloom.tensors import NamedTensors, is_float
from fedloom.types import Config

State = Any


@dataclass(frozen=True)
class Update:
    """One client's contribution to a round, as the pipeline sees it."""

    node_id: str
    weights: NamedTensors
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    staleness: int = 0  # server versions since the client got its weights (asynchronous mode)


@dataclass(frozen=True)
class Asynchronous:
    """Asynchronous buffered aggregation (FedBuff): keep ``concurrency`` clients
    training, and update the global model each time ``buffer_size`` results are in."""

    buffer_size: int = 10
    concurrency: int = 20

    def __post_init__(self) -> None:
        if self.buffer_size < 1 or self.concurrency < 1:
            raise ValueError(f"buffer_size and concurrency must be >= 1, got {self.buffer_size}, {self.concurrency}")


@dataclass(frozen=True)
class SecureAggregation:
    """Secure aggregation (SecAgg+): the coordinator learns only the sum of the clients' updates.

    Each neighbourhood (a client and its ``neighbours`` peers; 0 picks 2*ceil(log2 n), n-1 or more is classic
    SecAgg's complete graph) must keep more than ``threshold_fraction`` of its members to the end of the round
    (the Shamir threshold is floor(threshold_fraction * (k + 1)) + 1).
    Deltas (client weights - global) are clipped per coordinate to ``clip`` and summed in a ring of ``bits`` bits;
    example counts above ``max_examples`` count as ``max_examples``. See fedloom.server.secure.
    """

    threshold_fraction: float = 0.5
    neighbours: int = 0
    bits: int = 32
    clip: float = 1.0
    max_examples: int = 10_000

    def __post_init__(self) -> None:
        if not 0.5 <= self.threshold_fraction < 1.0:  # a minority of a neighbourhood must not unmask a member
            raise ValueError(f"threshold_fraction must be in [0.5, 1), got {self.threshold_fraction}")
        if self.neighbours < 0 or not 2 <= self.bits <= 48 or self.max_examples < 1:
            raise ValueError(f"need neighbours >= 0, bits in 2..48, max_examples >= 1; got {self}")
        if not (self.clip > 0 and np.isfinite(self.clip)):
            raise ValueError(f"clip must be positive and finite, got {self.clip}")


@dataclass(frozen=True)
class RoundInfo:
    """What the post step may need to know about the aggregate it receives."""

    round: int
    num_updates: int
    total_weight: float
    num_available: int = 0  # nodes the round could sample from


class Rejected(Exception):
    """A pre-processing step refused an update; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Pre(Protocol):
    """Per-update step: validate, clip, decompress. Raises Rejected to drop."""

    def init(self, weights: NamedTensors) -> State: ...

    def apply(self, state: State, update: Update, global_weights: NamedTensors) -> tuple[Update, State]: ...


class Aggregator(Protocol):
    """Folds updates in as they arrive; memory grows with the model only."""

    linear: bool  # True when partial aggregates may be folded like updates

    def begin(self, global_weights: NamedTensors) -> State: ...

    def fold(self, acc: State, update: Update) -> State: ...

    def result(self, acc: State) -> tuple[NamedTensors, int, float] | None:
        """(aggregate, number of updates folded, their total weight), or None if none were."""
        ...


class Post(Protocol):
    """Server-side step from the aggregate to the next global weights.

    Pre and Post pieces may also define ``metrics(state) -> dict[str, float]``;
    what it returns goes into the round's record (DP's epsilon, a clip norm).
    """

    def init(self, weights: NamedTensors) -> State: ...

    def apply(
        self, state: State, global_weights: NamedTensors, aggregate: NamedTensors, info: RoundInfo
    ) -> tuple[NamedTensors, State]: ...


@dataclass(frozen=True)
class Strategy:
    """A composed strategy; presets such as ``fedavg()`` build one of these."""

    name: str
    aggregate: Aggregator
    pre: Sequence[Pre] = ()
    post: Post | None = None
    fit_config: Config = field(default_factory=dict)
    asynchronous: Asynchronous | None = None
    secure: SecureAggregation | None = None

    def __post_init__(self) -> None:
        if self.secure is not None and self.asynchronous is not None:
            raise ValueError(f"strategy {self.name!r}: secure aggregation needs synchronous rounds")

    def init(self, weights: NamedTensors) -> dict[str, State]:
        return {
            "pre": [p.init(weights) for p in self.pre],
            "post": None if self.post is None else self.post.init(weights),
        }

    def preprocess(self, state: dict, update: Update, global_weights: NamedTensors) -> Update:
        """Run the pre steps; raises Rejected. Updates ``state['pre']`` in place."""
        for i, step in enumerate(self.pre):
            update, state["pre"][i] = step.apply(state["pre"][i], update, global_weights)
        hook = getattr(self.post, "preprocess", None)
        if hook is not None:  # a post step that also acts per update (adaptive DP clipping shares its norm)
            update, state["post"] = hook(state["post"], update, global_weights)
        return update

    def _hooks(self, state: dict, name: str) -> list[tuple[Any, Any]]:
        """(method, piece state) for every pre/post piece that defines ``name``."""
        pieces = [*zip(self.pre, state["pre"], strict=True), (self.post, state["post"])]
        return [(getattr(p, name), s) for p, s in pieces if hasattr(p, name)]

    def metrics(self, state: dict) -> dict[str, float]:
        """Metrics reported by pieces that have a ``metrics(state)`` method (e.g. DP's epsilon)."""
        out: dict[str, float] = {}
        for report, piece_state in self._hooks(state, "metrics"):
            out.update(report(piece_state))
        return out

    def broadcast(self, state: dict) -> dict[str, np.ndarray]:
        """Extra tensors sent to clients beside the model (e.g. SCAFFOLD's server control variate)."""
        out: dict[str, np.ndarray] = {}
        for extra, piece_state in self._hooks(state, "broadcast"):
            out.update(extra(piece_state))
        return out

    def finish(self, state: dict, global_weights: NamedTensors, acc: State, *, round: int = 0,
               available: int = 0) -> NamedTensors | None:
        """The next global weights, or None when nothing was aggregated.

        Pre pieces with an ``end_round(state, info) -> state`` method see the
        round's totals here, before the post step (adaptive clipping, SCAFFOLD).
        """
        take = getattr(self.aggregate, "take", None)  # a result that may reuse the spent accumulator's memory
        out = self.aggregate.result(acc) if take is None else take(acc)
        if out is None:
            return None
        return self.apply_post(state, global_weights, *out, round=round, available=available)

    def apply_post(self, state: dict, global_weights: NamedTensors, aggregate: NamedTensors, count: int,
                   total: float, *, round: int = 0, available: int = 0) -> NamedTensors:
        """The end of ``finish`` for an aggregate computed elsewhere (secure aggregation)."""
        info = RoundInfo(round, count, total, available)
        for i, step in enumerate(self.pre):
            if hasattr(step, "end_round"):
                state["pre"][i] = step.end_round(state["pre"][i], info)
        if self.post is None:
            return aggregate
        new, state["post"] = self.post.apply(state["post"], global_weights, aggregate, info)
        return new


# ----------------------------------------------------------------- pieces


@dataclass(frozen=True)
class _Stateless:
    """Adapts ``fn(update, global_weights) -> update`` to the Pre protocol."""

    fn: Any

    def init(self, weights: NamedTensors) -> None:
        return None

    def apply(self, state: None, update: Update, global_weights: NamedTensors) -> tuple[Update, None]:
        return self.fn(update, global_weights), None


def _check_structure(update: Update, global_weights: NamedTensors) -> Update:
    if list(update.weights) != list(global_weights):
        extra = sorted(set(update.weights) - set(global_weights))
        missing = sorted(set(global_weights) - set(update.weights))
        raise Rejected(f"wrong parameter names (unexpected {extra[:3]}, missing {missing[:3]})")
    for name, array in update.weights.items():
        want = global_weights[name]
        if array.shape != want.shape or array.dtype != want.dtype:
            raise Rejected(
                f"{name}: got {array.dtype}{list(array.shape)}, expected {want.dtype}{list(want.shape)}"
            )
    if update.num_examples <= 0:
        raise Rejected(f"num_examples must be positive, got {update.num_examples}")
    return update


def reject_non_finite(name: str, arrays: Sequence[np.ndarray]) -> None:
    """Rejected if a float array among ``arrays`` (one tensor, whole or in pieces) holds NaN or Inf."""
    # checked in the array's own dtype: a float32 cast would turn finite float64 > 3.4e38 into inf
    if any(is_float(a.dtype) and not all_finite(a) for a in arrays):
        raise Rejected(f"non-finite values in {name}")


def _check_finite(update: Update, global_weights: NamedTensors) -> Update:
    for name, array in update.weights.items():
        reject_non_finite(name, [array])
    return update


def is_check(step: Pre) -> bool:
    """True for ``check_structure()`` and ``check_finite()``, which a client can run on its own update."""
    return isinstance(step, _Stateless) and step.fn in (_check_structure, _check_finite)


def stateless(fn: Callable[[Update, NamedTensors], Update]) -> Pre:
    """A Pre step without state from ``fn(update, global_weights) -> update`` (which may raise Rejected)."""
    return _Stateless(fn)


def check_structure() -> Pre:
    """Reject updates whose names, order, shapes or dtypes differ from the model's."""
    return _Stateless(_check_structure)


def check_finite() -> Pre:
    """Reject updates carrying NaN or Inf."""
    return _Stateless(_check_finite)


@dataclass(frozen=True)
class _WeightedMean:
    """Per-tensor sums and weights: a tensor's mean is over the copies folded into it.

    ``fold`` folds a whole update. A transport that decodes an upload tensor by
    tensor may instead ``fold_pieces`` each one as it arrives and ``commit`` the
    update at its end; see ``fedloom.strategies.streaming``.
    """

    precision: str
    linear: bool = True
    # the sums' memory, reused two rounds later (after serving as the global weights in between)
    buffers: Recycler = field(default_factory=lambda: Recycler(generations=2), compare=False, repr=False)

    def begin(self, global_weights: NamedTensors) -> dict:
        self.buffers.next_round()
        return {"sums": {}, "weights": {}, "total": 0, "count": 0,
                "dtypes": {n: a.dtype for n, a in global_weights.items()},
                "shapes": {n: a.shape for n, a in global_weights.items()}}

    def fold(self, acc: dict, update: Update) -> dict:
        for name, array in update.weights.items():
            self._fold(acc, name, [array.reshape(-1)], update.num_examples, array.shape, array.dtype)
        return self.commit(acc, update.num_examples)

    def fold_pieces(self, acc: dict, name: str, pieces: Sequence[np.ndarray], w: int) -> None:
        """Fold one tensor of the global weights' shape, given as flat pieces in element order, with weight
        ``w`` (not thread-safe for the same ``name``)."""
        self._fold(acc, name, pieces, w, acc["shapes"][name], acc["dtypes"][name])

    def _fold(self, acc: dict, name: str, pieces: Sequence[np.ndarray], w: int, shape: tuple[int, ...],
              dtype: np.dtype) -> None:
        sums = acc["sums"].get(name)
        first = sums is None
        if first:  # the sum starts as the first copy times its weight
            sums = self.buffers.array(shape, self._sum_dtype(dtype))
        flat, offset = sums.reshape(-1), 0
        for piece in pieces:
            part = flat[offset : offset + piece.size]
            if first:
                np.copyto(part, piece, casting="unsafe")
                if w != 1:
                    part *= w
            else:
                add_scaled(part, piece, w)
            offset += piece.size
        if offset != flat.size:
            raise ValueError(f"{name}: pieces hold {offset} elements, expected {flat.size}")
        acc["sums"][name] = sums
        acc["weights"][name] = acc["weights"].get(name, 0) + w

    def commit(self, acc: dict, w: int) -> dict:
        """Count an update whose tensors have all been folded."""
        acc["total"] += w
        acc["count"] += 1
        return acc

    def _sum_dtype(self, dtype: np.dtype) -> np.dtype:
        native = self.precision == "native" and dtype.kind == "f"
        return _float_like(dtype) if native else np.dtype(np.float64)  # integers are always summed in float64

    def result(self, acc: dict) -> tuple[NamedTensors, int, float] | None:
        return self._mean(acc, in_place=False)

    def take(self, acc: dict) -> tuple[NamedTensors, int, float] | None:
        """``result``, dividing the sums in place: no second model-sized allocation; ``acc`` is spent."""
        return self._mean(acc, in_place=True)

    def _mean(self, acc: dict, in_place: bool) -> tuple[NamedTensors, int, float] | None:
        if acc["count"] == 0:
            return None
        out = []
        sums = acc["sums"]
        for name in [n for n in acc["dtypes"] if n in sums] + [n for n in sums if n not in acc["dtypes"]]:
            s = sums[name]
            s = np.divide(s, acc["weights"][name], out=s if in_place else None)
            dtype = acc["dtypes"][name]
            if dtype.kind in "iub":
                s = np.rint(s)
            out.append((name, s.astype(dtype, copy=False)))
        return NamedTensors(out), acc["count"], acc["total"]


def _float_like(dtype: np.dtype) -> np.dtype:
    return dtype if dtype.kind == "f" and dtype.itemsize >= 4 else np.dtype(np.float32)


def weighted_mean(*, precision: str = "float64") -> Aggregator:
    """Streaming mean weighted by ``num_examples`` (FedAvg's aggregate).

    ``precision="float64"`` accumulates in float64, which makes the result
    independent of arrival order in practice; ``"native"`` accumulates in the
    model's own float dtype and halves the coordinator's memory for float32.
    """
    if precision not in ("float64", "native"):
        raise ValueError(f"precision must be 'float64' or 'native', got {precision!r}")
    return _WeightedMean(precision)
