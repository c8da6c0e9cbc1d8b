"""Personalization on skewed digits: FedAvg vs FedPer vs FedBN, judged on each client's own data.

Ten clients hold digits split by shards (two classes each by default), and
each keeps 20% of its data as a held-out validation split
(``Workload.val_fraction``). Every round all clients evaluate the model they
would use on their own validation split (``RunConfig(eval_fraction=1.0)``),
and the coordinator merges their sufficient statistics into
``federated_accuracy``:

- ``fedavg``: one global model (``digits_cnn``);
- ``fedper``: FedPer, the last layer stays on each client (``Split(local=("9.*",))``);
- ``fedavg_bn`` / ``fedbn``: the same CNN with BatchNorm (``digits_cnn_bn``), all
  federated / normalization layers local (``Split(local=FEDBN_PATTERNS)``).

Then a cross-site table (``fedloom.server.crosssite``) of FedAvg's global
model and of models fine-tuned locally by a few clients, each evaluated on
every one of those clients' data, and an early-stopping run
(``Watch(early_stopping(...), best_model(...))``) showing where it fired.

Run from the repository root::

    python examples/personalization.py              # ~1.5 CPU-minutes in all
    python examples/personalization.py --quick      # a smoke test
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from fedloom import models
from fedloom.fleet import InProcessFleet
from fedloom.server.crosssite import CrossSiteTable, cross_site
from fedloom.server.driver import Driver, RunConfig
from fedloom.server.evaluation import Watch
from fedloom.strategies import fedavg
from fedloom.strategies.validation import best_model, early_stopping
from fedloom.transfer import FEDBN_PATTERNS, Split
from fedloom.types import History
from fedloom.workloads import Workload, digits

METHODS: dict[str, tuple[Callable[[], nn.Module], Split]] = {
    "fedavg": (models.digits_cnn, Split()),
    "fedper": (models.digits_cnn, Split(local=("9.*",))),
    "fedavg_bn": (models.digits_cnn_bn, Split()),
    "fedbn": (models.digits_cnn_bn, Split(local=FEDBN_PATTERNS)),
}
METRIC = "federated_accuracy"


def workload(model_fn: Callable[[], nn.Module], *, clients: int, scheme: str, seed: int, alpha: float,
             classes_per_client: int, val_fraction: float) -> Workload:
    base = digits(clients, scheme=scheme, seed=seed, alpha=alpha, classes_per_client=classes_per_client)
    return replace(base, model_fn=model_fn, val_fraction=val_fraction)


def fleet_for(w: Workload, split: Split, seed: int) -> InProcessFleet:
    """Every client starts from the same full initial model, local parameters included."""
    initial = w.initial_weights(seed)
    ids = [f"c{i:02d}" for i in range(w.num_clients)]
    return InProcessFleet(factory=lambda n: w.trainer(int(n[1:]), device="cpu", split=split, initial=initial),
                          node_ids=ids)


def run_method(method: str, *, rounds: int, seed: int, watch: Watch | None = None,
               **data) -> tuple[History, InProcessFleet]:
    model_fn, split = METHODS[method]
    w = workload(model_fn, seed=seed, **data)
    fleet = fleet_for(w, split, seed)
    config = RunConfig(rounds=rounds, seed=seed, eval_fraction=1.0)
    return Driver(fleet, fedavg(), split.federated(w.initial_weights(seed)), config, watch=watch).run(), fleet


def summary(history: History) -> dict[str, float]:
    accuracy = history.metric(METRIC)
    sent = sum(r.metrics.get("bytes_down", 0.0) + r.metrics.get("bytes_up", 0.0) for r in history.rounds)
    return {"final": accuracy[-1], "best": max(accuracy), "bytes": sent, "curve": accuracy}


def crosssite(history: History, fleet: InProcessFleet, *, sites: int, seed: int) -> CrossSiteTable:
    ids = fleet.wait_for_nodes(1, 0.0)[:sites]
    return cross_site(fleet, history.weights, ids, config={"seed": seed}, round_=len(history.rounds) + 1,
                      metric="accuracy")


def print_table(table: CrossSiteTable) -> None:
    print(f"cross-site {table.metric}: rows = data of a site, columns = model "
          "(global FedAvg model, or fine-tuned one round on that site)")
    print(f"{'data':>6} " + " ".join(f"{m:>7}" for m in table.models))
    for row in table.rows():
        print(f"{row[0]:>6} " + " ".join(f"{v:>7}" for v in row[1:]))
    if table.failures:
        print(f"failures: {table.failures}")


def print_early_stopping(history: History) -> None:
    print(f"early stopping on {METRIC} (patience 3): ran {len(history.rounds)} rounds")
    for r in history.rounds:
        marks = (" best" if r.best else "") + (f"  <- {r.stopped}" if r.stopped else "")
        print(f"  round {r.round:>2}  {METRIC} {r.metrics[METRIC]:.3f}{marks}")
    best = [r.round for r in history.rounds if r.best][-1]
    print(f"best round: {best}")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--scheme", default="shards", help="shards, dirichlet, ...")
    parser.add_argument("--classes-per-client", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.1, help="for --scheme dirichlet")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--cross-site", type=int, default=4, help="clients in the cross-site table")
    parser.add_argument("--max-rounds", type=int, default=40, help="cap of the early-stopping run")
    parser.add_argument("--quick", action="store_true", help="2 rounds: a smoke test")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("fedloom.driver").setLevel(logging.ERROR)
    rounds, cap = (2, 6) if args.quick else (args.rounds, args.max_rounds)
    data = {"clients": args.clients, "scheme": args.scheme, "alpha": args.alpha,
            "classes_per_client": args.classes_per_client, "val_fraction": args.val_fraction}
    results: dict = {}
    runs = {m: run_method(m, rounds=rounds, seed=args.seed, **data) for m in args.methods.split(",")}
    print(f"{args.clients} clients, {args.scheme} split, {rounds} rounds; {METRIC} on the clients' own held-out data")
    print(f"{'method':>10} {'final':>7} {'best':>7} {'bytes sent':>12}")
    for method, (history, _) in runs.items():
        results[method] = summary(history)
        r = results[method]
        print(f"{method:>10} {r['final']:>7.3f} {r['best']:>7.3f} {int(r['bytes']):>12,}")
    if "fedavg" in runs and args.cross_site > 0:
        results["cross_site"] = crosssite(*runs["fedavg"], sites=args.cross_site, seed=args.seed)
        print_table(results["cross_site"])
    watch = Watch(early_stopping(metric=METRIC, patience=3), best_model(metric=METRIC))
    history, _ = run_method("fedavg", rounds=cap, seed=args.seed, watch=watch, **data)
    results["early_stopping"] = history
    print_early_stopping(history)
    return results


if __name__ == "__main__":
    main()
