"""Every strategy family trained on digits: final test accuracy side by side.

    python examples/convergence.py            # 10 clients, Dirichlet 0.5, 15 rounds (a few minutes)
    python examples/convergence.py --quick    # 5 clients, 3 rounds
"""

from __future__ import annotations

import argparse
import time

import torch

from fedloom import InProcessFleet, RunConfig
from fedloom.server.async_driver import make_driver
from fedloom.strategies import registry
from fedloom.workloads import digits

PRESETS = {
    "fedavg": {},
    "fedavgm": {"server_momentum": 0.5},
    "fedprox": {"mu": 0.01},
    "fedadam": {"eta": 0.01},
    "fedyogi": {"eta": 0.01},
    "fedadagrad": {"eta": 0.01},
    "scaffold": {},
    "fedmedian": {},
    "fedtrimmedavg": {"beta": 0.2},
    "multikrum": {"num_malicious": 1},
    "bulyan": {"num_malicious": 1},
    "dp_fedavg": {"noise_multiplier": 0.1, "clip_norm": 2.0, "clients_per_round": 10, "total_clients": 10,
                  "seed": 0},
    "fedbuff": {"buffer_size": 5, "concurrency": 10},
}


# SCAFFOLD's clients take plain SGD steps (its option II assumes them), so they get a larger step size
# in place of the default momentum of 0.9.
FIT_CONFIG = {"scaffold": {"lr": 0.2}}


def run(name: str, params: dict, *, clients: int, rounds: int, scheme: str) -> tuple[float, float]:
    work = digits(clients, scheme=scheme, seed=0)
    work.epochs = 2
    if name == "dp_fedavg":
        params = {**params, "clients_per_round": clients, "total_clients": clients}
    strategy = registry.build(name, params)
    fleet = InProcessFleet(factory=lambda nid: work.trainer(int(nid)), node_ids=[str(i) for i in range(clients)])
    start = time.monotonic()
    config = RunConfig(rounds=rounds, seed=0, fit_config=FIT_CONFIG.get(name, {}))
    history = make_driver(fleet, strategy, work.initial_weights(0), config, evaluate=work.evaluator()).run()
    return history.rounds[-1].metrics["accuracy"], time.monotonic() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="Preset names to run.")
    args = parser.parse_args(argv)
    clients, rounds, scheme = (5, 5, "iid") if args.quick else (10, 20, "dirichlet")
    torch.set_num_threads(1)
    results = {}
    print(f"{'strategy':<15} {'accuracy':>9} {'seconds':>8}   ({clients} clients, {scheme}, {rounds} rounds)")
    for name, params in PRESETS.items():
        if args.only and name not in args.only:
            continue
        acc, secs = run(name, params, clients=clients, rounds=rounds, scheme=scheme)
        results[name] = acc
        print(f"{name:<15} {acc:>9.4f} {secs:>8.1f}", flush=True)
    return results


if __name__ == "__main__":
    main()
