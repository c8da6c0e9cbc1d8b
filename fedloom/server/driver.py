"""The round driver: sample, instruct, fold results as they arrive, evaluate.

It talks only to a Fleet and a Strategy, and imports neither grpc nor ray;
the same driver runs a deployment, a Ray simulation and an in-process test.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fedloom.fleet import Fleet
from fedloom.server import runstate, secure
from fedloom.server.evaluation import Watch, WeightedMetrics, federated_evaluation
from fedloom.strategies.pipeline import Rejected, Strategy, Update
from fedloom.strategies.sampling import UniformSampler, observe
from fedloom.strategies.streaming import StreamingFold, streamable
from fedloom.tensors import NamedTensors
from fedloom.types import Config, FitRes, History, Instruction, Metrics, Outcome, RoundRecord

log = logging.getLogger("fedloom.driver")

EvaluateFn = Callable[[NamedTensors], Metrics]


class Sampler(Protocol):
    """Client selection: ``init() -> stats``; ``select(seed, round, available, stats) -> ids``."""

    def init(self) -> dict: ...

    def select(self, seed: int, round_: int, available: Sequence[str], stats: dict | None = None) -> list[str]: ...
RoundCallback = Callable[[RoundRecord, NamedTensors], None]


@dataclass(frozen=True)
class RunConfig:
    """How rounds are run. Hyperparameters of training go in ``fit_config``."""

    rounds: int = 10
    fraction: float = 1.0
    min_clients: int = 1
    min_results: int = 1
    round_timeout: float = 600.0
    wait_timeout: float = 600.0
    seed: int = 0
    fit_config: Config = field(default_factory=dict)
    eval_fraction: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "rounds": self.rounds >= 1,
            "fraction": 0.0 < self.fraction <= 1.0,
            "min_clients": self.min_clients >= 1,
            "min_results": self.min_results >= 1,
            "round_timeout": self.round_timeout > 0,
            "wait_timeout": self.wait_timeout >= 0,
            "eval_fraction": 0.0 <= self.eval_fraction <= 1.0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid run config: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")


class Driver:
    """Runs rounds of a federation over any fleet."""

    def __init__(
        self,
        fleet: Fleet,
        strategy: Strategy,
        initial: NamedTensors,
        config: RunConfig,
        *,
        evaluate: EvaluateFn | None = None,
        on_round: RoundCallback | None = None,
        sampler: Sampler | None = None,
        checkpoint_dir: str | Path | None = None,
        watch: Watch | None = None,
    ):
        if strategy.secure is not None:
            secure.check_strategy(strategy, fleet)
        self.fleet = fleet
        self.strategy = strategy
        self.config = config
        self.weights = freeze(initial)
        self.state = strategy.init(initial)
        self.round = 0
        self.records: list[RoundRecord] = []
        self._evaluate = evaluate
        self._on_round = on_round
        self._sampler = sampler or UniformSampler(config.fraction, config.min_clients)
        self.sampler_state = self._sampler.init()
        self._checkpoint_dir = checkpoint_dir
        self._watch = watch or Watch()
        self.watch_state = self._watch.init()

    def run(self) -> History:
        while self.round < self.config.rounds and not self.watch_state["stopped"]:
            self.run_round()
        return History(tuple(self.records), self.weights)

    def run_round(self) -> RoundRecord:
        rnd = self.round + 1
        start = time.monotonic()
        failures: dict[str, str] = {}
        nodes = self.fleet.wait_for_nodes(self.config.min_clients, self.config.wait_timeout)
        metrics: dict[str, float] = {}
        results = 0
        if len(nodes) < self.config.min_clients:
            failures["*"] = f"only {len(nodes)} of {self.config.min_clients} required nodes available"
        else:
            selected = self._sampler.select(self.config.seed, rnd, nodes, self.sampler_state)
            results, metrics = self._fit(rnd, selected, failures, len(nodes))
        if self.config.eval_fraction > 0 and nodes:
            chosen = UniformSampler(self.config.eval_fraction, 1).select(self.config.seed + 1, rnd, nodes)
            metrics.update(federated_evaluation(self.fleet, self._instruction("evaluate", rnd), chosen,
                                                timeout=self.config.round_timeout, failures=failures))
        if self._evaluate is not None:
            metrics.update(self._evaluate(self.weights))
        self.watch_state, best, stopped = self._watch.update(self.watch_state, metrics, rnd)
        record = RoundRecord(rnd, metrics, results, failures, time.monotonic() - start, best, stopped)
        self.records.append(record)
        self.round = rnd
        if self._checkpoint_dir is not None:
            runstate.save(self._checkpoint_dir, self.snapshot())
        if self._on_round is not None:
            self._on_round(record, self.weights)
        return record

    def fingerprint(self) -> str:
        """What must not change across a resume: strategy, seed and the model's structure."""
        spec = {n: [d, list(shape)] for n, (d, shape) in self.weights.spec().items()}
        return json.dumps({"strategy": self.strategy.name, "seed": self.config.seed, "model": spec}, sort_keys=True)

    def snapshot(self) -> runstate.RunState:
        return runstate.RunState(self.round, self.weights, self.state, self.sampler_state, tuple(self.records),
                                 self.fingerprint(), self.watch_state)

    def restore(self, saved: runstate.RunState) -> None:
        """Continue from a saved state; with the same seed the run ends bit-identical to an uninterrupted one."""
        if saved.fingerprint and saved.fingerprint != self.fingerprint():
            raise runstate.StateError("the saved run used another strategy, seed or model; refusing to resume")
        self.weights = freeze(saved.weights)
        self.state, self.sampler_state = saved.strategy, saved.sampler
        self.round, self.records = saved.round, list(saved.records)
        if saved.watch is not None:
            self.watch_state = saved.watch

    def _instruction(self, kind: str, rnd: int) -> Instruction:
        return make_instruction(self.strategy, self.state, self.config, kind, rnd, self.weights)

    def _fit(self, rnd: int, selected: list[str], failures: dict[str, str],
             available: int) -> tuple[int, dict[str, float]]:
        if self.strategy.secure is not None:
            return self._fit_secure(rnd, selected, failures, available)
        acc = self.strategy.aggregate.begin(self.weights)
        stream = StreamingFold(self.strategy, acc) if self._streams else None
        fit_metrics = WeightedMetrics()
        pending = set(selected)
        results, bytes_up = 0, 0
        instruction = self._instruction("fit", rnd)
        for outcome in self._outcomes(instruction, selected, failures, stream):
            if outcome.node_id not in pending:
                log.warning("round %d: ignored an outcome from %s (not pending)", rnd, outcome.node_id)
                continue
            pending.discard(outcome.node_id)
            ok = isinstance(outcome, FitRes)
            observe(self.sampler_state, outcome.node_id, ok=ok, num_examples=outcome.num_examples if ok else 0)
            if not ok:
                failures[outcome.node_id] = getattr(outcome, "reason", "expected a fit result")
                continue
            if outcome.folded and stream is not None:  # already in the aggregate, checked tensor by tensor
                stream.commit(outcome.node_id, outcome.num_examples)
                fit_metrics.add(outcome.num_examples, outcome.metrics, prefix="train_")
                results += 1
                bytes_up += self.weights.nbytes
                continue
            bytes_up += outcome.weights.nbytes
            update = Update(outcome.node_id, outcome.weights, outcome.num_examples, outcome.metrics)
            try:
                update = self.strategy.preprocess(self.state, update, self.weights)
            except Rejected as exc:
                failures[outcome.node_id] = f"rejected: {exc.reason}"
                del update, outcome
                continue
            acc = self.strategy.aggregate.fold(acc, update)
            fit_metrics.add(update.num_examples, update.metrics, prefix="train_")
            results += 1
            del update, outcome  # hold no update while waiting for the next one: memory stays at one model
        for node_id in pending:
            failures[node_id] = "no outcome from the fleet"
        if stream is not None:
            acc = stream.close()
            for node_id, count in stream.partial().items():
                failures[node_id] = (f"{failures.get(node_id, 'upload not accepted')}; {count} of "
                                     f"{len(self.weights)} tensors were already folded into the aggregate")
        for node_id, reason in failures.items():
            log.warning("round %d: node %s failed: %s", rnd, node_id, reason)
        traffic = {"bytes_down": float(instruction.weights.nbytes * len(selected)), "bytes_up": float(bytes_up)}
        if results < self.config.min_results:
            failures["*"] = f"only {results} of {self.config.min_results} required results; global model kept"
            return results, traffic
        new = self.strategy.finish(self.state, self.weights, acc, round=rnd, available=available)
        if new is not None:
            self.weights = freeze(new)
        return results, {**fit_metrics.mean(), **self.strategy.metrics(self.state), **traffic}

    def _fit_secure(self, rnd: int, selected: list[str], failures: dict[str, str],
                    available: int) -> tuple[int, dict[str, float]]:
        """A round under secure aggregation: only the survivors' weighted mean reaches the strategy's post step."""
        assert self.strategy.secure is not None
        out = secure.secure_fit(self.fleet, self._instruction("fit", rnd), selected, settings=self.strategy.secure,
                                timeout=self.config.round_timeout, min_clients=self.config.min_results)
        failures.update(out.failures)
        for node_id in selected:
            observe(self.sampler_state, node_id, ok=node_id not in out.failures)
        traffic = {"bytes_down": float(out.bytes_down), "bytes_up": float(out.bytes_up),
                   **{f"secure_seconds_{stage}": t for stage, t in out.seconds.items()}}
        if out.weights is None or out.count < self.config.min_results:
            failures["*"] = f"only {out.count} of {self.config.min_results} required results; global model kept"
            return out.count, traffic
        self.weights = freeze(self.strategy.apply_post(self.state, self.weights, out.weights, out.count,
                                                       out.total_weight, round=rnd, available=available))
        return out.count, {**self.strategy.metrics(self.state), **traffic}

    @property
    def _streams(self) -> bool:
        return bool(getattr(self.fleet, "streams_uploads", False)) and streamable(self.strategy)

    def _outcomes(self, instruction: Instruction, selected: list[str], failures: dict[str, str],
                  stream: StreamingFold | None = None) -> Iterator[Outcome]:
        """The fleet's outcomes; a fleet that breaks down mid-round ends the round, not the run."""
        extra = {} if stream is None else {"fold": stream}
        try:
            yield from self.fleet.run(instruction, selected, timeout=self.config.round_timeout, **extra)
        except Exception as exc:  # the transport's failure is this round's failure
            log.exception("round %d: the fleet failed", instruction.round)
            failures["*fleet"] = f"{type(exc).__name__}: {exc}"

def freeze(weights: NamedTensors) -> NamedTensors:
    """Read-only views of the global weights, so no trainer or callback changes them in place."""
    views = []
    for name, array in weights.items():
        view = array.view()
        view.setflags(write=False)
        views.append((name, view))
    return NamedTensors(views)


def make_instruction(strategy: Strategy, state: dict, config: RunConfig, kind: str, rnd: int,
                     weights: NamedTensors) -> Instruction:
    """The instruction of a round: the model, any extras the strategy broadcasts, and the config."""
    cfg = {**strategy.fit_config, **config.fit_config, "seed": config.seed}
    extra = strategy.broadcast(state) if kind == "fit" else {}
    return Instruction(kind, rnd, NamedTensors({**weights, **extra}) if extra else weights, cfg)
