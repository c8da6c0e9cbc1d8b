"""FedBuff vs synchronous FedAvg when clients run at very different speeds.

Ten digits clients train in threads; two of them take ``--slow`` extra seconds
per task (a phone on a bad network, say). Synchronous FedAvg waits for the
slowest client every round; FedBuff folds results in as they come. The script
reports the wall time each needs to reach the accuracy the synchronous run
ends with.

    python examples/fedbuff_speed.py            # about a minute on 2 cores
    python examples/fedbuff_speed.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from fedloom import Driver, InProcessFleet, RunConfig, fedavg
from fedloom.server.async_driver import AsyncDriver
from fedloom.strategies.asynchronous import fedbuff
from fedloom.workloads import digits


class Delayed:
    """Wraps a trainer and waits ``delay`` seconds per fit (simulated slow device or link)."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def fit(self, weights, config):
        threading.Event().wait(self.delay)
        return self.inner.fit(weights, config)

    def evaluate(self, weights, config):
        return self.inner.evaluate(weights, config)


def _fleet(workload, slow: float, fast: float) -> InProcessFleet:
    trainers = {f"c{i}": Delayed(workload.trainer(i), slow if i < 2 else fast) for i in range(workload.num_clients)}
    return InProcessFleet(trainers, workers=len(trainers))


def time_to(history, target: float) -> float | None:
    """Seconds until the first round whose accuracy reaches ``target``."""
    elapsed = 0.0
    for record in history.rounds:
        elapsed += record.seconds
        if record.metrics.get("accuracy", 0.0) >= target:
            return elapsed
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--slow", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rounds, slow = (3, 0.5) if args.quick else (args.rounds, args.slow)
    torch.set_num_threads(1)
    workload = digits(10, seed=0)
    workload.epochs = 2
    evaluate = workload.evaluator()
    start = time.monotonic()
    sync = Driver(_fleet(workload, slow, 0.05), fedavg(), workload.initial_weights(0),
                  RunConfig(rounds=rounds, seed=0), evaluate=evaluate).run()
    sync_time = time.monotonic() - start
    target = sync.rounds[-1].metrics["accuracy"]
    start = time.monotonic()
    buff = AsyncDriver(_fleet(workload, slow, 0.05), fedbuff(buffer_size=4, concurrency=10),
                       workload.initial_weights(0), RunConfig(rounds=rounds * 4, seed=0), evaluate=evaluate).run()
    buff_time = time.monotonic() - start
    result = {"target_accuracy": target, "sync_seconds": time_to(sync, target), "sync_total": sync_time,
              "fedbuff_seconds": time_to(buff, target), "fedbuff_total": buff_time,
              "fedbuff_best": max(buff.metric("accuracy"))}
    print(f"synchronous FedAvg: {rounds} rounds, accuracy {target:.4f} after {result['sync_seconds']:.1f} s")
    reached = result["fedbuff_seconds"]
    print(f"FedBuff (buffer 4, concurrency 10): best accuracy {result['fedbuff_best']:.4f}; "
          + (f"reached {target:.4f} after {reached:.1f} s" if reached is not None else "did not reach the target"))
    return result


if __name__ == "__main__":
    main()
