"""``fedloom simulate``: options (flags over a TOML file over defaults), the run, and its console output."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SCHEMES = ("iid", "dirichlet", "shards", "quantity")
FLEETS = ("ray", "inprocess")
DATASETS = ("digits", "synthetic", "npz")


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

    def __post_init__(self) -> None:
        choices = {"partition": SCHEMES, "fleet": FLEETS, "dataset": DATASETS}
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
    unknown = sorted(set(flags) - names)
    if unknown:
        raise ValueError(f"unknown options {', '.join(unknown)}")
    values.update({k: v for k, v in flags.items() if v is not None})
    for key in ("run_dir", "data"):
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
    from fedloom.simulations import workloads
    from fedloom.simulations.simulate import make_fleet, simulate

    console = console or Console(stderr=True)
    workload = workloads.make(options.dataset, options.num_clients, scheme=options.partition, seed=options.seed,
                              alpha=options.alpha, classes_per_client=options.classes_per_client,
                              data=options.data, synthetic_alpha=options.synthetic_alpha,
                              synthetic_beta=options.synthetic_beta)
    console.print(partition_table(workload))
    start = time.monotonic()
    fleet = make_fleet(workload.trainer, num_clients=workload.num_clients, fleet=options.fleet,
                       ray_address=options.ray_address, num_cpus=options.num_cpus, num_gpus=options.num_gpus)
    try:
        fleet.wait_for_nodes(workload.num_clients, 600.0)
        console.print(f"{options.fleet} fleet ready in {time.monotonic() - start:.1f}s")
        with RoundProgress(options.rounds, console=console) as progress:
            history = simulate(workload.trainer, num_clients=workload.num_clients, rounds=options.rounds,
                               initial_weights=workload.initial_weights(options.seed), fraction=options.fraction,
                               seed=options.seed, evaluate=workload.evaluator(), fit_config=options.fit_config(),
                               fleet=fleet, run_dir=options.run_dir, on_round=progress)
    finally:
        fleet.close()
    console.print(summary_table(history.rounds, title=f"fedloom simulate ({options.dataset})"))
    console.print(f"run directory: {Path(options.run_dir).resolve()}")
    return history
