"""Rich progress and summaries shared by ``fedloom server`` and ``fedloom simulate``."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedloom.tensors import NamedTensors
from fedloom.types import RoundRecord

SHOWN = ("accuracy", "loss", "train_loss", "federated_accuracy", "dp_epsilon")


def _fmt(metrics: dict, keys: Sequence[str] = SHOWN) -> str:
    return "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


class RoundProgress:
    """A progress bar over rounds whose description shows the latest metrics.

    Use as a context manager; call it as the driver's ``on_round`` callback
    (after an optional inner callback, e.g. the run directory writer).
    """

    def __init__(self, rounds: int, *, console: Console | None = None, inner=None):
        self.console = console or Console(stderr=True)
        self._inner = inner
        self._progress = Progress(
            TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), console=self.console, transient=False,
        )
        self._task = self._progress.add_task("", total=rounds)

    def __enter__(self) -> RoundProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def __call__(self, record: RoundRecord, weights: NamedTensors) -> None:
        if self._inner is not None:
            self._inner(record, weights)
        failed = f"  [yellow]{len(record.failures)} failed[/]" if record.failures else ""
        self._progress.update(self._task, completed=record.round,
                              description=f"{_fmt(dict(record.metrics))}  results={record.num_results}{failed}")


def summary_table(records: Sequence[RoundRecord], *, title: str = "fedloom run") -> Table:
    """Rounds with their metrics; long runs show the first, the best and the last rounds."""
    keys = [k for k in SHOWN if any(k in r.metrics for r in records)]
    table = Table(title=title)
    for col in ("round", *keys, "results", "failures", "seconds"):
        table.add_column(col, justify="right")
    shown = list(records)
    if len(shown) > 12:
        shown = shown[:3] + shown[-9:]
    for r in shown:
        table.add_row(str(r.round), *(f"{r.metrics[k]:.4f}" if k in r.metrics else "-" for k in keys),
                      str(r.num_results), str(len(r.failures)), f"{r.seconds:.2f}")
    return table
