"""Streaming aggregation: fold an upload into the round's aggregate tensor by tensor, as it is decoded.

A transport that decodes uploads (the gRPC fleet) can hand each complete
tensor to a ``StreamingFold`` instead of building the whole update first. The
coordinator then holds the global weights, the accumulator and one tensor per
upload in progress: about 2x the model instead of 3x and more.

The price is atomicity. Each tensor is checked (finite, when the strategy
checks that) and folded on its own, so an upload that breaks off midway, or
whose later tensor is refused, leaves its earlier tensors in the aggregate:
each tensor's mean is over the copies folded into it, and the node is still
recorded as failed (``partial()`` names such uploads). Only strategies whose
whole per-update work is per tensor can stream: a linear aggregator with
``fold_pieces`` (FedAvg's weighted mean), pre steps that are only the
structure and finiteness checks, and no per-update post hook.
"""

from __future__ import annotations

import threading

import numpy as np

from fedloom.strategies.pipeline import Rejected, State, Strategy, _check_finite, is_check, reject_non_finite


def streamable(strategy: Strategy) -> bool:
    """Whether ``strategy`` may aggregate uploads tensor by tensor (see the module's docstring)."""
    return (hasattr(strategy.aggregate, "fold_pieces") and all(is_check(p) for p in strategy.pre)
            and not hasattr(strategy.post, "preprocess") and strategy.asynchronous is None
            and strategy.secure is None)


class StreamingFold:
    """The round's accumulator, fed by transport threads; thread-safe. The driver ``close``s it before reading."""

    def __init__(self, strategy: Strategy, acc: State):
        self._aggregate = strategy.aggregate
        self._check_finite = any(is_check(p) and p.fn is _check_finite for p in strategy.pre)
        self.acc = acc
        self._names = set(acc["dtypes"])
        self._locks = {name: threading.Lock() for name in acc["dtypes"]}
        self._lock = threading.Lock()  # guards _closed and the counters below
        self._closed = False
        self._folded: dict[str, int] = {}  # node id -> tensors folded so far
        self._committed: set[str] = set()

    def open(self, node_id: str, num_examples: int) -> Upload:
        if num_examples <= 0:
            raise Rejected(f"num_examples must be positive, got {num_examples}")
        with self._lock:
            if self._closed:
                raise Rejected("the round is over")
            if node_id in self._folded:
                raise Rejected(f"node {node_id!r} already uploaded in this round")
            self._folded[node_id] = 0
        return Upload(self, node_id, num_examples)

    def _fold(self, upload: Upload, name: str, pieces: list[np.ndarray]) -> None:
        if name not in self._names:
            raise Rejected(f"unexpected tensor {name!r}")
        if self._check_finite:
            reject_non_finite(name, pieces)
        with self._locks[name]:  # folds of different tensors run in parallel (numpy releases the GIL)
            with self._lock:
                if self._closed:  # close() waits for this tensor's lock: no fold starts or runs after it
                    raise Rejected("the round is over")
            self._aggregate.fold_pieces(self.acc, name, pieces, upload.num_examples)
            with self._lock:
                self._folded[upload.node_id] += 1

    def commit(self, node_id: str, num_examples: int) -> None:
        """Count ``node_id``'s update (called by the driver for the outcome it accepts)."""
        with self._lock:
            if self._folded.get(node_id) != len(self._names) or node_id in self._committed:
                raise RuntimeError(f"node {node_id!r} has no complete, uncommitted upload")
            self._committed.add(node_id)
        self.acc = self._aggregate.commit(self.acc, num_examples)

    def close(self) -> State:
        """Refuse further folds (waiting for any in progress) and return the accumulator."""
        with self._lock:
            self._closed = True
        for lock in self._locks.values():
            with lock:
                pass
        acc, self.acc = self.acc, None  # a settled task may still reach this object: it must not hold the sums
        return acc

    def partial(self) -> dict[str, int]:
        """Uncommitted uploads that folded some tensors: node id -> tensors folded (and kept)."""
        with self._lock:
            return {n: k for n, k in self._folded.items() if k and n not in self._committed}


class Upload:
    """One node's upload in progress: ``add`` each tensor as it completes."""

    def __init__(self, fold: StreamingFold, node_id: str, num_examples: int):
        self._fold = fold
        self.node_id = node_id
        self.num_examples = num_examples

    def add(self, name: str, pieces: list[np.ndarray]) -> None:
        """Check and fold one tensor, given as flat pieces in element order (``Decoder``'s ``on_tensor``);
        raises Rejected. The pieces may be reused by the caller afterwards."""
        self._fold._fold(self, name, pieces)
