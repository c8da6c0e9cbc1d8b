"""The domain types of a round: what the driver asks for and what comes back.

Plain frozen dataclasses; every fleet (in-process, gRPC, Ray) speaks them and
nothing else, so the round logic never sees a transport.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from fedloom.tensors import NamedTensors

Scalar = bool | int | float | str
Config = Mapping[str, Scalar]
Metrics = Mapping[str, float]
TaskKind = Literal["fit", "evaluate"]


@dataclass(frozen=True)
class Instruction:
    """One piece of work, the same for every node it is sent to.

    The weights are shared by all nodes of a round, so a fleet sends (or puts
    into an object store) them once, not once per node.
    """

    kind: TaskKind
    round: int
    weights: NamedTensors
    config: Config = field(default_factory=dict)


@dataclass(frozen=True)
class FitRes:
    """A node's answer to a ``fit`` instruction.

    ``folded``: the transport already folded the weights into the round's aggregate as they arrived
    (streaming aggregation, ``fedloom.strategies.streaming``); ``weights`` is then empty.
    """

    node_id: str
    weights: NamedTensors
    num_examples: int
    metrics: Metrics = field(default_factory=dict)
    folded: bool = False


@dataclass(frozen=True)
class EvalRes:
    """A node's answer to an ``evaluate`` instruction."""

    node_id: str
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """A node that raised, vanished, sent garbage or missed the deadline."""

    node_id: str
    reason: str


Outcome = FitRes | EvalRes | Failure


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one round; one line of ``metrics.jsonl``."""

    round: int
    metrics: Metrics
    num_results: int
    failures: Mapping[str, str]
    seconds: float
    best: bool = False  # the best global model so far (by the run's best-model metric)
    stopped: str = ""  # why the run stops after this round (early stopping), or ""

    def to_json(self) -> dict:
        out = {
            "round": self.round,
            **self.metrics,
            "num_results": self.num_results,
            "num_failures": len(self.failures),
            "failures": dict(self.failures),
            "seconds": round(self.seconds, 4),
        }
        if self.best:
            out["best"] = True
        if self.stopped:
            out["stopped"] = self.stopped
        return out


@dataclass(frozen=True)
class History:
    """A finished (or stopped) run: its records and final global weights."""

    rounds: tuple[RoundRecord, ...]
    weights: NamedTensors

    def metric(self, name: str) -> list[float]:
        return [r.metrics[name] for r in self.rounds if name in r.metrics]
