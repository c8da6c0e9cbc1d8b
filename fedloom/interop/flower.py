"""Flower interoperation: a Flower server strategy inside fedloom's round driver,
and a Flower ``NumPyClient`` as a fedloom trainer, so a Flower user moves over
without rewriting.

What carries over: aggregation (``aggregate_fit``) of any Flower strategy,
including its own server-side state (FedAdam's moments live in the Flower
object), and a NumPyClient's ``fit``/``evaluate``. What does not: Flower's
client selection and per-round configuration (fedloom's sampler and
``fit_config`` take their place), and checkpointing of state that lives inside
the Flower object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from fedloom.strategies.pipeline import Strategy, Update, check_finite, check_structure
from fedloom.tensors import NamedTensors
from fedloom.types import Config, Metrics


class _Proxy(ClientProxy):
    """A stand-in client proxy: Flower's aggregate_fit only reads ``cid``."""

    def _unsupported(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("fedloom's fleet, not Flower's proxy, talks to clients")

    get_properties = get_parameters = fit = evaluate = reconnect = _unsupported


@dataclass
class _FlowerAggregate:
    """Buffers the round's updates and hands them to Flower's ``aggregate_fit``."""

    strategy: Any
    linear: bool = False
    rounds: int = 0

    def begin(self, global_weights: NamedTensors) -> dict:
        return {"global": global_weights, "results": []}

    def fold(self, acc: dict, update: Update) -> dict:
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(update.weights.values())),
                     update.num_examples, dict(update.metrics))
        acc["results"].append((_Proxy(update.node_id), res))
        return acc

    def result(self, acc: dict) -> tuple[NamedTensors, int, float] | None:
        if not acc["results"]:
            return None
        self.rounds += 1
        params, _ = self.strategy.aggregate_fit(self.rounds, acc["results"], [])
        if params is None:
            return None
        arrays = parameters_to_ndarrays(params)
        glob: NamedTensors = acc["global"]
        if len(arrays) != len(glob):
            raise ValueError(f"Flower strategy returned {len(arrays)} arrays for a model of {len(glob)}")
        out = NamedTensors((n, np.asarray(a).astype(g.dtype, copy=False).reshape(g.shape))
                           for (n, g), a in zip(glob.items(), arrays, strict=True))
        total = float(sum(r.num_examples for _, r in acc["results"]))
        return out, len(acc["results"]), total


def from_flower(strategy: Any, *, name: str | None = None, fit_config: Config | None = None) -> Strategy:
    """Wrap a ``flwr.server.strategy.Strategy`` so fedloom's driver runs its aggregation."""
    if not hasattr(strategy, "aggregate_fit"):
        raise TypeError(f"{type(strategy).__name__} is not a Flower strategy (no aggregate_fit)")
    return Strategy(name=name or f"flower:{type(strategy).__name__}", pre=(check_structure(), check_finite()),
                    aggregate=_FlowerAggregate(strategy), fit_config=dict(fit_config or {}))


class FlowerClientTrainer:
    """A fedloom Trainer that runs a Flower ``NumPyClient``."""

    def __init__(self, client: Any):
        if not (hasattr(client, "fit") and hasattr(client, "evaluate")):
            raise TypeError(f"{type(client).__name__} is not a Flower NumPyClient (needs fit and evaluate)")
        self.client = client

    def fit(self, weights: NamedTensors, config: Config) -> tuple[NamedTensors, int, Metrics]:
        params, n, metrics = self.client.fit([np.asarray(a) for a in weights.values()], dict(config))
        if len(params) != len(weights):
            raise ValueError(f"Flower client returned {len(params)} arrays for a model of {len(weights)}")
        return NamedTensors(zip(weights, params, strict=True)), int(n), _numeric(metrics)

    def evaluate(self, weights: NamedTensors, config: Config) -> tuple[int, Metrics]:
        loss, n, metrics = self.client.evaluate([np.asarray(a) for a in weights.values()], dict(config))
        return int(n), {"loss": float(loss), **_numeric(metrics)}


def _numeric(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}
