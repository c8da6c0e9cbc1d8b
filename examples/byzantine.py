"""Byzantine clients against FedAvg and the robust presets, on the digits workload.

A fifth of the clients are Byzantine: they train honestly, then corrupt their
update ``delta = trained - global`` before sending it. Three attacks:

- ``signflip``: send ``-delta`` (push the model the wrong way);
- ``scale``:    send ``100 * delta`` (one client outweighs everyone);
- ``noise``:    send ``N(0, 1)`` per coordinate instead of ``delta``.

Each strategy runs once clean and once per attack; the table shows the final
test accuracy. Run from the repository root::

    python examples/byzantine.py           # 15 clients (3 Byzantine), 10 rounds, 24 runs: ~4 min of CPU
    python examples/byzantine.py --quick   # 7 clients (1 Byzantine), 3 rounds, x100 only, FedAvg and median
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedloom.client.trainer import Trainer
from fedloom.fleet import InProcessFleet
from fedloom.server.driver import Driver, RunConfig
from fedloom.strategies import PRESETS, Strategy
from fedloom.tensors import NamedTensors
from fedloom.types import Config, Metrics
from fedloom.workloads import digits

Attack = Callable[[np.ndarray], np.ndarray]

ATTACKS: dict[str, Attack] = {
    "signflip": lambda delta: -delta,
    "scale": lambda delta: 100.0 * delta,
    # execute() seeds numpy from (seed, round, node), so the noise is reproducible
    "noise": lambda delta: np.random.normal(size=delta.shape).astype(delta.dtype),
}
STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


class Byzantine:
    """Wraps an honest trainer and corrupts the float part of its update."""

    def __init__(self, inner: Trainer, attack: Attack):
        self.inner = inner
        self.attack = attack

    def fit(self, weights: NamedTensors, config: Config) -> tuple[NamedTensors, int, Metrics]:
        trained, n, metrics = self.inner.fit(weights, config)
        out = []
        for name, g in weights.items():
            w = trained[name]
            if w.dtype.kind == "f":
                w = (g + self.attack(w - g)).astype(w.dtype)
            out.append((name, w))
        return NamedTensors(out), n, metrics

    def evaluate(self, weights: NamedTensors, config: Config) -> tuple[int, Metrics]:
        return self.inner.evaluate(weights, config)


@dataclass(frozen=True)
class Setup:
    clients: int
    byzantine: int
    rounds: int
    epochs: int
    batch_size: int = 8
    seed: int = 0


def strategy_for(name: str, setup: Setup) -> Strategy:
    """The preset, told how many Byzantine clients to tolerate."""
    f = setup.byzantine
    if name in ("krum", "multikrum", "bulyan"):
        return PRESETS[name](num_malicious=f)
    if name == "fedtrimmedavg":  # trim at least f from each end: int(beta * n) >= f
        return PRESETS[name](beta=min(0.49, (f + 0.5) / setup.clients))
    return PRESETS[name]()


def run(name: str, attack: str | None, setup: Setup) -> float:
    """Final test accuracy of one federation; ``attack=None`` is the clean run."""
    work = digits(setup.clients, scheme="iid", seed=setup.seed)
    ids = [f"client{i:02d}" for i in range(setup.clients)]
    bad = set(np.random.default_rng(setup.seed).choice(ids, size=setup.byzantine, replace=False).tolist())

    def make(node_id: str) -> Trainer:
        honest = work.trainer(ids.index(node_id), device="cpu")
        return Byzantine(honest, ATTACKS[attack]) if attack is not None and node_id in bad else honest

    fleet = InProcessFleet(factory=make, node_ids=ids)
    config = RunConfig(rounds=setup.rounds, min_clients=setup.clients, seed=setup.seed,
                       fit_config={"epochs": setup.epochs, "batch_size": setup.batch_size})
    history = Driver(fleet, strategy_for(name, setup), work.initial_weights(setup.seed), config).run()
    return float(work.evaluator()(history.weights)["accuracy"])


def table(results: dict[str, dict[str, float]], clean_fedavg: float) -> str:
    columns = list(next(iter(results.values())))
    lines = ["| strategy | " + " | ".join(columns) + " | worst vs clean FedAvg |",
             "| --- |" + " ---: |" * (len(columns) + 1)]
    for name, row in results.items():
        cells = " | ".join(f"{100 * row[c]:.1f}" for c in columns)
        worst = 100 * (min(row.values()) - clean_fedavg)
        lines.append(f"| {name} | {cells} | {worst:+.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small models: threads cost more than they give
    try:
        return _experiment(args.quick, args.seed)
    finally:
        torch.set_num_threads(threads)


def _experiment(quick: bool, seed: int) -> dict[str, dict[str, float]]:
    if quick:
        setup, attacks, names = Setup(7, 1, 3, 1, seed=seed), ["scale"], ("fedavg", "fedmedian")
    else:
        setup, attacks, names = Setup(15, 3, 10, 2, seed=seed), list(ATTACKS), STRATEGIES
    start = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    for name in names:
        results[name] = {"clean": run(name, None, setup)}
        for attack in attacks:
            results[name][attack] = run(name, attack, setup)
    print(f"digits, iid, {setup.clients} clients ({setup.byzantine} Byzantine), {setup.rounds} rounds, "
          f"{setup.epochs} local epoch(s) of batch {setup.batch_size}, seed {setup.seed}: final test accuracy (%)\n")
    print(table(results, results["fedavg"]["clean"]))
    print(f"\n{time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
