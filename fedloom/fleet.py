"""The fleet protocol, and the in-process fleet.

The round driver talks only to a fleet: "run this instruction on these nodes
before this deadline; give me outcomes as they arrive, failures as failures".
Fleets: in-process (here; tests and debugging), gRPC (``fedloom.server``)
and Ray (``fedloom.simulations``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Protocol

from fedloom.client.trainer import Trainer, execute
from fedloom.types import Failure, Instruction, Outcome


class FleetError(RuntimeError):
    """The fleet cannot serve a round at all (e.g. too few nodes in time)."""


class Fleet(Protocol):
    def wait_for_nodes(self, count: int, timeout: float) -> list[str]:
        """The ids of available nodes once at least ``count`` are there (or on timeout)."""
        ...

    def run(self, instruction: Instruction, node_ids: Sequence[str], *, timeout: float) -> Iterator[Outcome]:
        """One outcome per node id, in any order, all within ``timeout`` seconds.

        A fleet whose ``streams_uploads`` is True also takes ``fold=`` a ``StreamingFold``
        (``fedloom.strategies.streaming``) and folds fit results into it tensor by tensor as they
        arrive, yielding them as ``FitRes(folded=True)``.
        """
        ...

    def close(self) -> None: ...


class InProcessFleet:
    """Runs every node's trainer in this process: one after the other, or in
    ``workers`` threads (for trainers that wait on I/O or release the GIL;
    training seeds are process-global, so threads trade away determinism).

    A trainer that overruns the deadline cannot be interrupted here; its result
    is turned into a late Failure and the nodes not yet started are not run.
    """

    def __init__(self, trainers: Mapping[str, Trainer] | None = None, *,
                 factory: Callable[[str], Trainer] | None = None, node_ids: Sequence[str] = (),
                 workers: int = 1):
        if (trainers is None) == (factory is None):
            raise ValueError("give either trainers or a factory with node_ids")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._workers = workers
        self._lock = threading.Lock()
        self._trainers: dict[str, Trainer] = dict(trainers or {})
        self._factory = factory
        self._ids = list(self._trainers) if trainers is not None else list(node_ids)

    def _trainer(self, node_id: str) -> Trainer:
        with self._lock:
            if node_id not in self._trainers:
                assert self._factory is not None
                self._trainers[node_id] = self._factory(node_id)
            return self._trainers[node_id]

    def wait_for_nodes(self, count: int, timeout: float) -> list[str]:
        return list(self._ids)

    def run(self, instruction: Instruction, node_ids: Sequence[str], *, timeout: float) -> Iterator[Outcome]:
        if self._workers > 1:
            yield from self._run_threaded(instruction, node_ids, timeout)
            return
        deadline = time.monotonic() + timeout
        for node_id in node_ids:
            if node_id not in self._ids:
                yield Failure(node_id, "unknown node")
                continue
            if time.monotonic() > deadline:
                yield Failure(node_id, "deadline passed before the node could start")
                continue
            outcome = execute(self._trainer(node_id), node_id, instruction)
            if time.monotonic() > deadline and not isinstance(outcome, Failure):
                yield Failure(node_id, f"late: finished after the {timeout:g}s deadline")
            else:
                yield outcome

    def _run_threaded(self, instruction: Instruction, node_ids: Sequence[str], timeout: float) -> Iterator[Outcome]:
        pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="fedloom-node")
        futures = {}
        for node_id in node_ids:
            if node_id not in self._ids:
                yield Failure(node_id, "unknown node")
            else:
                futures[pool.submit(lambda n: execute(self._trainer(n), n, instruction), node_id)] = node_id
        pending = set(futures)
        try:
            for future in as_completed(futures, timeout=timeout):
                pending.discard(future)
                yield future.result()
        except FuturesTimeout:
            for future in pending:
                yield Failure(futures[future], f"late: no result within the {timeout:g}s deadline")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._trainers.clear()
