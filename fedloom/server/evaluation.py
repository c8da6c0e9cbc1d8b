"""How the global model is judged each round: federated evaluation aggregated from
sufficient statistics, and the watch over early stopping and the best model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedloom import metrics as stats_metrics
from fedloom.fleet import Fleet
from fedloom.strategies.validation import BestModel, EarlyStopping
from fedloom.types import EvalRes, Failure, Instruction


class WeightedMetrics:
    """Example-weighted means of the scalar metrics clients report."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, n: int, metrics: Mapping[str, float], *, prefix: str) -> None:
        for k, v in metrics.items():
            self._sums[prefix + k] = self._sums.get(prefix + k, 0.0) + n * float(v)
            self._weights[prefix + k] = self._weights.get(prefix + k, 0.0) + n

    def mean(self) -> dict[str, float]:
        return {k: s / self._weights[k] for k, s in self._sums.items() if self._weights[k] > 0}


def federated_evaluation(fleet: Fleet, instruction: Instruction, selected: Sequence[str], *, timeout: float,
                         failures: dict[str, str]) -> dict[str, float]:
    """``federated_*`` metrics of the sampled clients' evaluations.

    Clients that report sufficient statistics (``fedloom.metrics``) are merged
    exactly, so precision, recall, F1 and AUC equal those of the pooled data;
    other scalar metrics are example-weighted means.
    """
    means = WeightedMetrics()
    pooled: stats_metrics.ClassStats | None = None
    for outcome in fleet.run(instruction, selected, timeout=timeout):
        if isinstance(outcome, Failure):
            failures[f"eval:{outcome.node_id}"] = outcome.reason
            continue
        if not isinstance(outcome, EvalRes):
            continue
        try:
            stats, rest = stats_metrics.split_stats(outcome.metrics)
            if stats is not None:
                pooled = stats if pooled is None else stats_metrics.merge(pooled, stats)
        except ValueError as exc:
            failures[f"eval:{outcome.node_id}"] = f"bad evaluation statistics: {exc}"
            continue
        means.add(outcome.num_examples, rest, prefix="federated_")
    out = means.mean()
    if pooled is not None and pooled.count:
        out.update({f"federated_{k}": v for k, v in stats_metrics.compute(pooled).items()})
    return out


@dataclass(frozen=True)
class Watch:
    """Early stopping and best-model tracking over the round metrics (either may be None)."""

    early_stopping: EarlyStopping | None = None
    best: BestModel | None = None

    @classmethod
    def create(cls, *, early_stopping: str | None = None, patience: int = 5, min_delta: float = 0.0,
               best_metric: str | None = "accuracy") -> Watch:
        """From command-line words: metrics ending in ``loss`` are minimized, the others maximized."""
        from fedloom.strategies.validation import best_model
        from fedloom.strategies.validation import early_stopping as stopping

        mode = lambda metric: "min" if metric.endswith("loss") else "max"  # noqa: E731
        stop = None if not early_stopping else stopping(metric=early_stopping, mode=mode(early_stopping),
                                                        patience=patience, min_delta=min_delta, missing="skip")
        best = None if not best_metric else best_model(metric=best_metric, mode=mode(best_metric), missing="skip")
        return cls(stop, best)

    def init(self) -> dict:
        return {"stop": self.early_stopping.init() if self.early_stopping else None,
                "best": self.best.init() if self.best else None, "stopped": ""}

    def update(self, state: dict, metrics: Mapping[str, float], round_: int) -> tuple[dict, bool, str]:
        """(state, this round is the best so far, why the run stops now or "")."""
        improved, reason = False, ""
        if self.best is not None:
            state["best"], improved = self.best.update(state["best"], metrics, round=round_)
        if self.early_stopping is not None:
            state["stop"], stop, _ = self.early_stopping.update(state["stop"], metrics, round=round_)
            if stop:
                es = self.early_stopping
                reason = f"early stop: no {es.metric} improvement over {es.patience} rounds"
                state["stopped"] = reason
        return state, improved, reason
