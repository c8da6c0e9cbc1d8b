"""FedProx against FedAvg with stragglers on Synthetic(1,1) (Li et al., MLSys 2020, Figure 1).

The paper's setting: 30 clients holding Synthetic(1,1) data, multinomial
logistic regression, 10 clients per round, E=20 local epochs, batch size 10,
learning rate 0.01, each client's data split 80/20 into train and test. In
every round 90% of the selected clients are stragglers: each can only run a
uniformly random number of epochs in [1, E], seeded from (seed, round, client).

- ``fedavg_drop``: FedAvg drops the stragglers (they fail), keeping only full work;
- ``fedprox_mu0``: FedProx with mu=0 keeps the stragglers' partial work;
- ``fedprox_mu1``: FedProx with mu=1 keeps it and adds the proximal term.

Run from the repository root::

    python examples/fedprox_synthetic.py                 # 200 rounds x 3 methods, ~10 CPU-minutes
    python examples/fedprox_synthetic.py --quick         # 3 rounds: a smoke test
    python examples/fedprox_synthetic.py --out fedprox.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch

from fedloom.client.torch_trainer import TensorData, TorchTrainer, evaluate_model
from fedloom.client.trainer import client_seed
from fedloom.datasets import Dataset, split, synthetic
from fedloom.fleet import Fleet, InProcessFleet
from fedloom.models import logreg
from fedloom.server.driver import Driver, RunConfig
from fedloom.strategies.fedprox import fedprox
from fedloom.strategies.sampling import round_rng
from fedloom.tensors import NamedTensors
from fedloom.types import Failure, Instruction, Outcome, RoundRecord

METHODS = {"fedavg_drop": (0.0, True), "fedprox_mu0": (0.0, False), "fedprox_mu1": (1.0, False)}
NUM_CLIENTS, PER_ROUND, EPOCHS, BATCH, LR, DIM, CLASSES = 30, 10, 20, 10, 0.01, 60, 10


class Stragglers:
    """A fleet wrapper: in each round a fixed fraction of the selected clients are stragglers.

    Which clients straggle depends on (seed, round) and the round's selection,
    which no trainer sees, hence a fleet wrapper. A straggler runs a uniformly
    random number of epochs in [1, E] drawn from (seed, round, client), or is
    dropped (reported as a failure, as FedAvg does) when ``drop``.
    """

    def __init__(self, inner: Fleet, *, fraction: float, epochs: int, drop: bool, seed: int):
        self.inner, self.fraction, self.epochs, self.drop, self.seed = inner, fraction, epochs, drop, seed

    def wait_for_nodes(self, count: int, timeout: float) -> list[str]:
        return self.inner.wait_for_nodes(count, timeout)

    def close(self) -> None:
        self.inner.close()

    def stragglers(self, round_: int, node_ids: Sequence[str]) -> set[str]:
        pool = sorted(node_ids)
        count = round(self.fraction * len(pool))
        return {pool[i] for i in round_rng(self.seed, round_, 0x5354).choice(len(pool), count, replace=False)}

    def straggler_epochs(self, round_: int, node_id: str) -> int:
        return int(np.random.default_rng(client_seed(self.seed, round_, node_id)).integers(1, self.epochs + 1))

    def run(self, instruction: Instruction, node_ids: Sequence[str], *, timeout: float) -> Iterator[Outcome]:
        if instruction.kind != "fit":
            yield from self.inner.run(instruction, node_ids, timeout=timeout)
            return
        slow = self.stragglers(instruction.round, node_ids)
        for node_id in node_ids:
            if node_id in slow and self.drop:
                yield Failure(node_id, "straggler dropped")
                continue
            task = instruction
            if node_id in slow:
                epochs = self.straggler_epochs(instruction.round, node_id)
                task = replace(instruction, config={**instruction.config, "epochs": epochs})
            yield from self.inner.run(task, [node_id], timeout=timeout)


def tensors(data: Dataset) -> TensorData:
    return TensorData(torch.from_numpy(data.x), torch.from_numpy(data.y))


def federation(seed: int) -> tuple[list[Dataset], list[Dataset]]:
    """Synthetic(1,1) over 30 clients, each client's data split 80/20."""
    clients = synthetic(alpha=1.0, beta=1.0, num_clients=NUM_CLIENTS, seed=seed, dim=DIM, num_classes=CLASSES)
    parts = [split(c, test_fraction=0.2, seed=seed + k) if len(np.unique(c.y)) > 1 else (c, c.subset(np.arange(0)))
             for k, c in enumerate(clients)]
    return [p[0] for p in parts], [p[1] for p in parts]


def evaluator(train: list[Dataset], test: list[Dataset]):
    """Global training loss over all clients' training data, and test accuracy over all test data."""
    model = logreg(DIM, CLASSES)
    all_train = TensorData(torch.from_numpy(np.concatenate([d.x for d in train])),
                           torch.from_numpy(np.concatenate([d.y for d in train])))
    all_test = TensorData(torch.from_numpy(np.concatenate([d.x for d in test])),
                          torch.from_numpy(np.concatenate([d.y for d in test])))

    def evaluate(weights: NamedTensors) -> dict[str, float]:
        model.load_state_dict(weights.to_torch())
        _, tr = evaluate_model(model, [(all_train.x, all_train.y)])
        _, te = evaluate_model(model, [(all_test.x, all_test.y)])
        return {"global_train_loss": tr["loss"], "test_accuracy": te["accuracy"]}

    return evaluate


def run(method: str, *, rounds: int, seed: int, stragglers: float = 0.9, epochs: int = EPOCHS,
        verbose: bool = False) -> list[dict[str, float]]:
    mu, drop = METHODS[method]
    train, test = federation(seed)
    trainers = {f"c{k:02d}": TorchTrainer(logreg(DIM, CLASSES), tensors(d), lr=LR, epochs=epochs,
                                          batch_size=BATCH, device="cpu") for k, d in enumerate(train)}
    fleet = Stragglers(InProcessFleet(trainers), fraction=stragglers, epochs=epochs, drop=drop, seed=seed)
    initial = NamedTensors({k: np.zeros_like(v) for k, v in
                            NamedTensors.from_torch(logreg(DIM, CLASSES).state_dict()).items()})
    config = RunConfig(rounds=rounds, fraction=PER_ROUND / NUM_CLIENTS, min_clients=PER_ROUND, min_results=1,
                       seed=seed)
    def show(record: RoundRecord, weights: NamedTensors) -> None:
        if verbose and (record.round % 10 == 0 or record.round == 1):
            print(f"{method} round {record.round}: loss {record.metrics['global_train_loss']:.4f} "
                  f"accuracy {record.metrics['test_accuracy']:.3f}", flush=True)

    history = Driver(fleet, fedprox(mu=mu), initial, config, evaluate=evaluator(train, test), on_round=show).run()
    return [{"round": r.round, "results": r.num_results, **{k: r.metrics[k] for k in
            ("global_train_loss", "test_accuracy")}} for r in history.rounds]


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stragglers", type=float, default=0.9)
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--quick", action="store_true", help="3 rounds: a smoke test")
    parser.add_argument("--out", help="write the per-round numbers here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("fedloom.driver").setLevel(logging.ERROR)  # dropped stragglers are expected
    rounds = 3 if args.quick else args.rounds
    methods = args.methods.split(",") if args.methods else list(METHODS)
    results = {m: run(m, rounds=rounds, seed=args.seed, stragglers=args.stragglers, verbose=not args.quick)
               for m in methods}
    every = max(1, rounds // 10)
    print(f"{'round':>5} " + " ".join(f"{m + ' loss':>18} {'acc':>6}" for m in methods))
    for i in range(rounds):
        if (i + 1) % every == 0 or i == 0:
            cells = [f"{results[m][i]['global_train_loss']:>18.4f} {results[m][i]['test_accuracy']:>6.3f}"
                     for m in methods]
            print(f"{i + 1:>5} " + " ".join(cells))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    return results


if __name__ == "__main__":
    main()
