"""Cross-site evaluation: every client's locally trained model on every client's data.

Row i, column j of the table is the metric of client j's model (or of the
global model, column "global") evaluated on client i's evaluation data, as in
NVIDIA FLARE's cross-site validation. It costs N fits and N x (N + 1)
evaluations, and holds N models at once, so it is meant for tens of clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedloom.fleet import Fleet
from fedloom.tensors import NamedTensors
from fedloom.types import Config, EvalRes, Failure, FitRes, Instruction


@dataclass(frozen=True)
class CrossSiteTable:
    """``values[data_site][model]``: None where a site failed to train or evaluate."""

    sites: tuple[str, ...]
    models: tuple[str, ...]
    values: dict[str, dict[str, float | None]]
    metric: str
    failures: dict[str, str]

    def rows(self) -> list[list[str]]:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        return [[site, *(fmt(self.values[site][m]) for m in self.models)] for site in self.sites]


def cross_site(fleet: Fleet, weights: NamedTensors, sites: Sequence[str], *, config: Config, round_: int,
               metric: str = "accuracy", timeout: float = 600.0) -> CrossSiteTable:
    """Train a local model on each site from ``weights``, then evaluate every model everywhere."""
    sites = sorted(sites)
    failures: dict[str, str] = {}
    models: dict[str, NamedTensors] = {"global": weights}
    for outcome in fleet.run(Instruction("fit", round_, weights, config), sites, timeout=timeout):
        if isinstance(outcome, FitRes):
            models[outcome.node_id] = outcome.weights
        else:
            failures[f"fit:{outcome.node_id}"] = getattr(outcome, "reason", "no fit result")
    names = ("global", *(s for s in sites if s in models))
    values: dict[str, dict[str, float | None]] = {s: dict.fromkeys(names) for s in sites}
    for name in names:
        instruction = Instruction("evaluate", round_, models[name], config)
        for outcome in fleet.run(instruction, sites, timeout=timeout):
            if isinstance(outcome, EvalRes) and metric in outcome.metrics:
                values[outcome.node_id][name] = float(outcome.metrics[metric])
            elif isinstance(outcome, Failure):
                failures[f"eval:{name}@{outcome.node_id}"] = outcome.reason
    return CrossSiteTable(tuple(sites), names, values, metric, failures)
