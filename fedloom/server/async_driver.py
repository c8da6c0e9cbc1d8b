"""The asynchronous driver (FedBuff, Nguyen et al. 2022).

``concurrency`` clients train at all times. Each result is rebased onto the
current global model (its delta against the version it started from), goes
through the strategy's pre steps (which may down-weight it by staleness), and
is folded into a buffer; every ``buffer_size`` results the buffer becomes a
new global version. A "round" here is one such server update. Like the
synchronous driver it talks only to a Fleet; the fleet must accept concurrent
``run`` calls from several threads.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import numpy as np

from fedloom.fleet import Fleet
from fedloom.server.driver import Driver, EvaluateFn, RoundCallback, RunConfig, freeze, make_instruction
from fedloom.server.evaluation import WeightedMetrics
from fedloom.strategies.pipeline import Rejected, Strategy, Update
from fedloom.strategies.sampling import round_rng
from fedloom.tensors import NamedTensors
from fedloom.types import Failure, FitRes, History, Instruction, Outcome, RoundRecord


def rebase(current: NamedTensors, start: NamedTensors, update: NamedTensors) -> NamedTensors:
    """``current + (update - start)``: a stale client's delta applied to today's model."""
    out = []
    for name, new in update.items():
        base, cur = start[name], current[name]
        if new.shape != base.shape or new.dtype != base.dtype:
            return update  # the structure check rejects it with a clear reason
        wide = np.float64 if cur.dtype.kind in "fV" else np.int64
        out.append((name, (cur.astype(wide) + (new.astype(wide) - base.astype(wide))).astype(cur.dtype)))
    return NamedTensors(out)


class AsyncDriver:
    """Runs ``config.rounds`` asynchronous server updates over any fleet."""

    def __init__(self, fleet: Fleet, strategy: Strategy, initial: NamedTensors, config: RunConfig, *,
                 evaluate: EvaluateFn | None = None, on_round: RoundCallback | None = None):
        if strategy.asynchronous is None:
            raise ValueError(f"strategy {strategy.name!r} is synchronous; use Driver")
        self.fleet, self.strategy, self.config = fleet, strategy, config
        self.weights = freeze(initial)
        self.state = strategy.init(initial)
        self.round = 0
        self.records: list[RoundRecord] = []
        self._evaluate, self._on_round = evaluate, on_round
        self._versions: dict[int, NamedTensors] = {0: self.weights}
        self._rng = round_rng(config.seed, 0, 0xA5)
        self._started = 0

    def run(self) -> History:
        opts = self.strategy.asynchronous
        assert opts is not None
        pool = ThreadPoolExecutor(max_workers=opts.concurrency, thread_name_prefix="fedloom-async")
        in_flight: dict[Future, tuple[str, int]] = {}
        acc = self.strategy.aggregate.begin(self.weights)
        buffered, fit_metrics, failures, since = 0, WeightedMetrics(), {}, time.monotonic()
        try:
            while self.round < self.config.rounds:
                self._fill(pool, in_flight, opts.concurrency)
                if not in_flight:
                    failures["*"] = "no node available to train"
                    self._record(0, {}, failures, since)
                    break
                done, _ = wait(list(in_flight), timeout=self.config.round_timeout, return_when=FIRST_COMPLETED)
                for future in done:
                    _, version = in_flight.pop(future)
                    update = self._accept(future.result(), version, failures)
                    if update is None:
                        continue
                    acc = self.strategy.aggregate.fold(acc, update)
                    fit_metrics.add(update.num_examples, update.metrics, prefix="train_")
                    buffered += 1
                    if buffered >= opts.buffer_size:
                        self._advance(acc, buffered, fit_metrics, failures, since)
                        acc = self.strategy.aggregate.begin(self.weights)
                        buffered, fit_metrics, failures, since = 0, WeightedMetrics(), {}, time.monotonic()
                        self._prune(in_flight)
                        if self.round >= self.config.rounds:
                            break
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return History(tuple(self.records), self.weights)

    def _fill(self, pool: ThreadPoolExecutor, in_flight: dict, concurrency: int) -> None:
        busy = {node for node, _ in in_flight.values()}
        idle = sorted(set(self.fleet.wait_for_nodes(1, 0.0 if in_flight else self.config.wait_timeout)) - busy)
        while idle and len(in_flight) < concurrency:
            node = idle.pop(int(self._rng.integers(len(idle))))
            self._started += 1
            instruction = make_instruction(self.strategy, self.state, self.config, "fit", self.round + 1,
                                           self.weights)
            in_flight[pool.submit(self._one, instruction, node)] = (node, self.round)

    def _one(self, instruction: Instruction, node_id: str) -> Outcome:
        try:
            for outcome in self.fleet.run(instruction, [node_id], timeout=self.config.round_timeout):
                return outcome
            return Failure(node_id, "the fleet returned no outcome")
        except Exception as exc:  # a transport error is that node's failure
            return Failure(node_id, f"{type(exc).__name__}: {exc}")

    def _accept(self, outcome: Outcome, version: int, failures: dict[str, str]) -> Update | None:
        if isinstance(outcome, Failure) or not isinstance(outcome, FitRes):
            failures[outcome.node_id] = getattr(outcome, "reason", "not a fit result")
            return None
        start = self._versions[version]
        weights = outcome.weights if version == self.round else rebase(self.weights, start, outcome.weights)
        update = Update(outcome.node_id, weights, outcome.num_examples, outcome.metrics, self.round - version)
        try:
            return self.strategy.preprocess(self.state, update, self.weights)
        except Rejected as exc:
            failures[outcome.node_id] = f"rejected: {exc.reason}"
            return None

    def _advance(self, acc: object, count: int, fit_metrics: WeightedMetrics, failures: dict, since: float) -> None:
        available = len(self.fleet.wait_for_nodes(0, 0.0))
        new = self.strategy.finish(self.state, self.weights, acc, round=self.round + 1, available=available)
        if new is not None:
            self.weights = freeze(new)
        self._versions[self.round + 1] = self.weights
        metrics = {**fit_metrics.mean(), **self.strategy.metrics(self.state)}
        self._record(count, metrics, failures, since)

    def _record(self, count: int, metrics: dict, failures: dict, since: float) -> None:
        if self._evaluate is not None:
            metrics.update(self._evaluate(self.weights))
        self.round += 1
        record = RoundRecord(self.round, metrics, count, dict(failures), time.monotonic() - since)
        self.records.append(record)
        if self._on_round is not None:
            self._on_round(record, self.weights)

    def _prune(self, in_flight: dict) -> None:
        """Forget global versions no running client started from."""
        keep = {v for _, v in in_flight.values()} | {self.round}
        for v in list(self._versions):
            if v not in keep:
                del self._versions[v]


def make_driver(fleet: Fleet, strategy: Strategy, initial: NamedTensors, config: RunConfig,
                **options: object) -> Driver | AsyncDriver:
    """The driver a strategy needs: AsyncDriver for asynchronous ones (FedBuff), Driver otherwise.

    ``options`` are Driver's keywords; the asynchronous driver takes ``evaluate``
    and ``on_round`` and refuses the others (checkpointing, samplers and
    early stopping are synchronous-only for now).
    """
    if strategy.asynchronous is None:
        return Driver(fleet, strategy, initial, config, **options)  # type: ignore[arg-type]
    unsupported = sorted(k for k, v in options.items() if v is not None and k not in ("evaluate", "on_round"))
    if unsupported:
        raise ValueError(f"asynchronous strategy {strategy.name!r} does not support {', '.join(unsupported)} yet")
    return AsyncDriver(fleet, strategy, initial, config, evaluate=options.get("evaluate"),  # type: ignore[arg-type]
                       on_round=options.get("on_round"))  # type: ignore[arg-type]
