"""``fedloom simulate``: options (flags over a TOML file over defaults), the run, and its console output."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedloom.partition import SCHEMES
from fedloom.simulations.simulate import FLEETS
from fedloom.strategies.sampling import SAMPLERS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DATASETS = ("digits", "synthetic", "npz", "breast_cancer", "wine")
NORMALIZE = ("standard", "minmax", "none")


@dataclass(frozen=True)
class SimulationOptions:
    """Everything ``fedloom simulate`` can be told; field names are the flags with underscores."""

    num_clients: int = 100
    rounds: int = 50
    fraction: float = 0.1
    partition: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    seed: int = 0
    run_dir: str = "runs/simulate"
    epochs: int | None = None  # None: the workload's default
    lr: float | None = None
    batch_size: int | None = None
    fleet: str = "ray"
    ray_address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    dataset: str = "digits"
    data: str | None = None
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    normalize: str = "standard"  # tabular data: federated feature statistics -> standard or min-max scaling
    strategy: str = "fedavg"
    params: dict = field(default_factory=dict)  # the strategy's hyperparameters
    sampler: str = "uniform"
    eval_fraction: float = 0.0  # federated evaluation on this fraction of clients' held-out data
    val_fraction: float = 0.0  # of each client's data held out for it (0.2 when evaluation needs it)
    early_stopping: str | None = None  # a metric name, e.g. accuracy or loss
    patience: int = 5
    min_delta: float = 0.0
    best_metric: str = "accuracy"
    pretrained: str | None = None
    freeze: str = ""  # comma-separated parameter name patterns
    local: str = ""
    cross_site: int = 0  # clients in a cross-site table after the run
    validate_norms: float = 0.0  # > 0: reject updates whose norm's robust z-score exceeds this

    def __post_init__(self) -> None:
        choices = {"partition": SCHEMES, "fleet": FLEETS, "dataset": DATASETS, "normalize": NORMALIZE,
                   "sampler": tuple(SAMPLERS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        positive = ("num_clients", "rounds", "epochs", "batch_size", "num_cpus", "alpha", "classes_per_client")
        bad = [n for n in positive if getattr(self, n) is not None and getattr(self, n) <= 0]
        if not 0.0 < self.fraction <= 1.0:
            bad.append("fraction")
        if self.num_gpus < 0 or (self.lr is not None and self.lr < 0):
            bad.append("num_gpus/lr")
        if bad:
            raise ValueError(f"invalid values: {', '.join(f'{n}={getattr(self, n, None)!r}' for n in bad)}")
        if not 0.0 <= self.eval_fraction <= 1.0 or not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1] and val_fraction in [0, 1)")
        if self.patience < 1 or self.cross_site < 0:
            raise ValueError("patience must be >= 1 and cross_site >= 0")
        if self.dataset == "npz" and not self.data:
            raise ValueError("dataset 'npz' needs data = PATH (an .npz file with arrays x and y)")

    def fit_config(self) -> dict[str, float]:
        """Training hyperparameters sent to clients; unset ones keep the workload's defaults."""
        given = {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size}
        return {k: v for k, v in given.items() if v is not None}


def load_options(config: str | Path | None = None, **flags: Any) -> SimulationOptions:
    """Defaults, overridden by a TOML file's keys, overridden by flags that are not None."""
    names = {f.name for f in fields(SimulationOptions)}
    values: dict[str, Any] = {}
    if config is not None:
        path = Path(config)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read config {path}: {exc}") from exc
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{path}: unknown keys {', '.join(unknown)}; known keys: {', '.join(sorted(names))}")
    unknown = sorted(set(flags) - names - {"param"})
    if unknown:
        raise ValueError(f"unknown options {', '.join(unknown)}")
    pairs = flags.pop("param", None) or []
    values.update({k: v for k, v in flags.items() if v is not None})
    if pairs:
        from fedloom.strategies.registry import parse_params

        values["params"] = {**values.get("params", {}), **parse_params(list(pairs))}
    if not isinstance(values.get("params", {}), dict):
        raise ValueError("params must be a table of the strategy's hyperparameters")
    for key in ("run_dir", "data", "pretrained"):
        if values.get(key) is not None:
            values[key] = str(values[key])
    return SimulationOptions(**values)


def partition_table(workload) -> Table:
    """Samples and classes per client: min, median, max."""
    from fedloom.partition import stats

    table = Table(title=f"{workload.name}: {workload.num_clients} clients, {len(workload.train)} training samples")
    for col in ("per client", "min", "median", "max"):
        table.add_column(col, justify="right")
    for row, (lo, mid, hi) in stats(workload.train.y, workload.parts).items():
        table.add_row(row, f"{lo:g}", f"{mid:g}", f"{hi:g}")
    return table


def run_simulation(options: SimulationOptions, *, console: Console | None = None):
    """Run the simulation the options describe; print partition statistics, progress and a summary."""
    from fedloom.progress import RoundProgress, summary_table
    from fedloom.simulations.setup import build

    console = console or Console(stderr=True)
    plan = build(options)
    console.print(partition_table(plan.workload))
    console.print(f"strategy: {plan.strategy.name}  sampler: {options.sampler}  "
                  f"federated parameters: {len(plan.initial)} tensors, {plan.initial.nbytes:,} bytes")
    start = time.monotonic()
    fleet = plan.fleet()
    try:
        nodes = fleet.wait_for_nodes(plan.workload.num_clients, 600.0)
        console.print(f"{options.fleet} fleet ready in {time.monotonic() - start:.1f}s")
        fit_config = {**options.fit_config(), **plan.normalization(fleet, nodes)}
        with RoundProgress(options.rounds, console=console) as progress:
            history = plan.run(fleet, fit_config, on_round=progress)
        if options.cross_site:
            table = plan.cross_site(fleet, history.weights, nodes, fit_config)
            console.print(cross_site_table(table))
    finally:
        fleet.close()
    console.print(summary_table(history.rounds, title=f"fedloom simulate ({options.dataset})"))
    stopped = [r for r in history.rounds if r.stopped]
    if stopped:
        console.print(f"early stopping fired after round {stopped[0].round}: {stopped[0].stopped}")
    best = [r.round for r in history.rounds if r.best]
    if best:
        console.print(f"best global model: round {best[-1]} (saved as best.safetensors)")
    console.print(f"run directory: {Path(options.run_dir).resolve()}")
    return history


def cross_site_table(table) -> Table:
    out = Table(title=f"cross-site {table.metric}: rows = data of site, columns = model")
    for col in ("site", *table.models):
        out.add_column(col, justify="right")
    for row in table.rows():
        out.add_row(*row)
    return out
