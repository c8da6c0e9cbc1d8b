"""The Trainer protocol and the one function every fleet uses to run it.

A trainer never sees the transport: the same object runs in a node process,
inside a Ray actor, or in the in-process fleet.
"""

from __future__ import annotations

import hashlib
import random
import sys
import traceback
from typing import Protocol, runtime_checkable

import numpy as np

from fedloom.tensors import NamedTensors
from fedloom.types import Config, EvalRes, Failure, FitRes, Instruction, Metrics, Outcome


@runtime_checkable
class Trainer(Protocol):
    """What a client brings: training and evaluation on given weights.

    ``fit`` returns (new weights, number of training examples, metrics);
    ``evaluate`` returns (number of evaluation examples, metrics).
    """

    def fit(self, weights: NamedTensors, config: Config) -> tuple[NamedTensors, int, Metrics]: ...

    def evaluate(self, weights: NamedTensors, config: Config) -> tuple[int, Metrics]: ...


def client_seed(seed: int, round_: int, node_id: str) -> int:
    """The training seed of one client in one round: a function of (seed, round, client)."""
    digest = hashlib.sha256(f"{seed}/{round_}/{node_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch = sys.modules.get("torch")
    if torch is None:  # a trainer that never imported torch needs no torch seed (and no seconds-long import)
        return
    torch.default_generator.manual_seed(seed)  # same CPU bits as torch.manual_seed, at a fraction of the cost
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def execute(trainer: Trainer, node_id: str, instruction: Instruction) -> Outcome:
    """Run one instruction on a trainer; any exception becomes a Failure."""
    seed = int(instruction.config.get("seed", 0))
    seed_everything(client_seed(seed, instruction.round, node_id))
    try:
        if instruction.kind == "fit":
            weights, n, metrics = trainer.fit(instruction.weights, instruction.config)
            if not isinstance(weights, NamedTensors):
                weights = NamedTensors(weights)
            return FitRes(node_id, weights, int(n), _floats(metrics))
        n, metrics = trainer.evaluate(instruction.weights, instruction.config)
        return EvalRes(node_id, int(n), _floats(metrics))
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return Failure(node_id, f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})")


def _floats(metrics: Metrics) -> dict[str, float]:
    return {str(k): float(v) for k, v in (metrics or {}).items()}
