"""Secure aggregation benchmark: a FedAvg round with and without SecAgg+ for 10, 50 and 100 clients.

    python benchmarks/secagg.py            # a 105k-parameter MLP, 10 / 50 / 100 clients, in-process fleet
    python benchmarks/secagg.py --quick    # a small model and few clients, to check the benchmark still runs

Every client trains the same MLP (64 -> hidden -> 10) for one epoch on its own 128 synthetic examples
(batches of 32). The plain round is ``fedavg()``; the secure round is ``secagg_fedavg()`` (SecAgg+, degree
2*ceil(log2 n), threshold a majority of each neighbourhood, 32-bit ring) with every trainer wrapped in
``SecureTrainer``. Both run over ``InProcessFleet`` in this one process, so the secure time includes every
client's cryptography and the coordinator's; they start from the same weights with the same seeds, so their
global models differ only by SecAgg's quantization. Reported per round (the best of ``--rounds``): wall time,
bytes down + up as the driver counts them, their ratios, and the largest difference between the two models.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedloom.client.secure_trainer import SecureTrainer
from fedloom.client.torch_trainer import TensorData, TorchTrainer
from fedloom.fleet import InProcessFleet
from fedloom.models import mlp
from fedloom.server.driver import Driver, RunConfig
from fedloom.server.secure import secagg_fedavg
from fedloom.strategies import fedavg
from fedloom.tensors import NamedTensors

FEATURES, CLASSES, EXAMPLES = 64, 10, 128


def client_data(client: int) -> TensorData:
    rng = np.random.default_rng(1000 + client)
    x = rng.standard_normal((EXAMPLES, FEATURES)).astype(np.float32)
    labels = np.argmax(x @ np.random.default_rng(0).standard_normal((FEATURES, CLASSES)), axis=1)
    return TensorData(torch.from_numpy(x), torch.from_numpy(labels))


def trainers(n: int, hidden: int, *, secure: bool) -> dict[str, object]:
    out = {}
    for i in range(n):
        inner = TorchTrainer(lambda: mlp(FEATURES, CLASSES, hidden), client_data(i), lr=0.05, epochs=1,
                             batch_size=32)
        out[f"client-{i:03d}"] = SecureTrainer(inner) if secure else inner
    return out


def one(n: int, hidden: int, *, secure: bool, rounds: int) -> tuple[float, float, NamedTensors]:
    """Best round time, bytes of that round, and the global weights after the first round."""
    torch.manual_seed(0)
    initial = NamedTensors.from_torch(mlp(FEATURES, CLASSES, hidden).state_dict())
    strategy = secagg_fedavg() if secure else fedavg()
    fleet = InProcessFleet(trainers(n, hidden, secure=secure))
    driver = Driver(fleet, strategy, initial, RunConfig(rounds=1, seed=0))
    driver.run_round()
    after_one = driver.weights
    best, traffic = float("inf"), 0.0
    for _ in range(rounds):
        driver.weights = initial  # every measured round does the same work
        start = time.perf_counter()
        record = driver.run_round()
        seconds = time.perf_counter() - start
        assert record.num_results == n, record.failures
        if seconds < best:
            best, traffic = seconds, record.metrics["bytes_down"] + record.metrics["bytes_up"]
    return best, traffic, after_one


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--hidden", type=int, default=1400, help="hidden width; 1400 gives 105k parameters")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per setting (the best is kept)")
    parser.add_argument("--quick", action="store_true", help="4 and 8 clients, hidden 32, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.hidden, args.rounds = [4, 8], 32, 1
    torch.set_num_threads(1)
    params = sum(p.numel() for p in mlp(FEATURES, CLASSES, args.hidden).parameters())
    print(f"MLP {FEATURES}-{args.hidden}-{CLASSES}: {params} parameters; {EXAMPLES} examples per client, 1 epoch")
    print(f"{'clients':>7} | {'plain s':>8} | {'secure s':>8} | {'time x':>6} | {'plain MB':>8} | {'secure MB':>9} |"
          f" {'bytes x':>7} | {'max |diff|':>10}")
    rows = []
    for n in args.clients:
        plain_s, plain_b, plain_w = one(n, args.hidden, secure=False, rounds=args.rounds)
        secure_s, secure_b, secure_w = one(n, args.hidden, secure=True, rounds=args.rounds)
        diff = max(float(np.max(np.abs(plain_w[k].astype(np.float64) - secure_w[k]))) for k in plain_w)
        row = {"clients": n, "plain_s": plain_s, "secure_s": secure_s, "time_ratio": secure_s / plain_s,
               "plain_mb": plain_b / 1e6, "secure_mb": secure_b / 1e6, "bytes_ratio": secure_b / plain_b,
               "max_diff": diff}
        rows.append(row)
        print(f"{n:>7} | {plain_s:>8.3f} | {secure_s:>8.3f} | {row['time_ratio']:>6.2f} | {row['plain_mb']:>8.2f} |"
              f" {row['secure_mb']:>9.2f} | {row['bytes_ratio']:>7.2f} | {diff:>10.2e}", flush=True)
    return rows


if __name__ == "__main__":
    main()
