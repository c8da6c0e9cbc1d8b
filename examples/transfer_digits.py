"""Transfer learning on digits: pretrain on 0-4 centrally, federate fine-tuning on 5-9.

1. The digits CNN (``fedloom.models.digits_cnn``) is trained centrally on
   digits 0-4 with a plain torch loop and saved as safetensors.
2. Clients holding only digits 5-9 (split IID) fine-tune it with FedAvg,
   for the same rounds and hyperparameters, in three ways:

- ``scratch``: random start, every parameter federated;
- ``frozen_backbone``: pretrained start, convolutions frozen (``Split(frozen=("0.*", "3.*"))``),
  the two dense layers federated;
- ``head_only``: pretrained start, all but the last layer frozen (a federated linear probe).

Frozen parameters never travel, so the bytes on the wire shrink with them.
Reported: test accuracy on digits 5-9, the bytes sent (sum of the rounds'
``bytes_down`` + ``bytes_up``), and the bytes sent until the accuracy first
reached ``--target``.

Run from the repository root::

    python examples/transfer_digits.py              # 10 rounds x 2 local epochs, ~20 CPU-seconds
    python examples/transfer_digits.py --quick      # a smoke test
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedloom import metrics, models
from fedloom.client.torch_trainer import TensorData, TorchTrainer
from fedloom.datasets import Dataset, digits, split
from fedloom.fleet import InProcessFleet
from fedloom.partition import iid
from fedloom.rundir import save_model
from fedloom.server.driver import Driver, RunConfig
from fedloom.strategies import fedavg
from fedloom.tensors import NamedTensors
from fedloom.transfer import Split, load_pretrained
from fedloom.workloads import DATA_SEED

CONV = ("0.*", "3.*")  # digits_cnn: 0 and 3 are the convolutions, 7 and 9 the dense layers
METHODS = {"scratch": (False, Split()), "frozen_backbone": (True, Split(frozen=CONV)),
           "head_only": (True, Split(frozen=(*CONV, "7.*")))}
LR, MOMENTUM, BATCH = 0.05, 0.9, 32


def data() -> tuple[Dataset, Dataset]:
    """The fixed 80/20 train/test split of the digits (the one ``fedloom.workloads.digits`` uses)."""
    return split(digits(), test_fraction=0.2, seed=DATA_SEED)


def subset(d: Dataset, classes: Sequence[int]) -> Dataset:
    return d.subset(np.flatnonzero(np.isin(d.y, classes)))


def tensors(d: Dataset) -> TensorData:
    return TensorData(torch.from_numpy(d.x), torch.from_numpy(d.y))


def pretrain(train: Dataset, path: Path, *, epochs: int, seed: int) -> NamedTensors:
    """Central training on ``train`` with a plain torch loop; saved to ``path`` (safetensors) and read back."""
    torch.manual_seed(seed)
    model = models.digits_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for start in range(0, len(y), BATCH):
            idx = order[start:start + BATCH]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, NamedTensors.from_torch(model.state_dict()))
    return load_pretrained(path)


def evaluator(start: NamedTensors, test: Dataset):
    """Accuracy on ``test`` of ``start`` overlaid with the federated weights of a round."""
    model = models.digits_cnn()
    model.load_state_dict(start.to_torch())
    x, y = torch.from_numpy(test.x), torch.from_numpy(test.y)

    def evaluate(weights: NamedTensors) -> dict[str, float]:
        model.load_state_dict(weights.to_torch(), strict=False)
        return metrics.compute(metrics.evaluate_stats(model, [(x, y)], 10))

    return evaluate


def finetune(method: str, pretrained: NamedTensors, train: Dataset, test: Dataset, *, clients: int, rounds: int,
             epochs: int, seed: int, target: float = 0.9) -> dict:
    """Federated fine-tuning of one method: final test accuracy, bytes sent, and bytes sent until the
    accuracy first reached ``target`` (None if it never did)."""
    use_pretrained, split_ = METHODS[method]
    torch.manual_seed(seed)
    start = pretrained if use_pretrained else NamedTensors.from_torch(models.digits_cnn().state_dict())
    parts = iid(train.y, clients, seed=seed)
    trainers = {f"c{k}": TorchTrainer(models.digits_cnn, tensors(train.subset(p)), lr=LR, momentum=MOMENTUM,
                                      batch_size=BATCH, epochs=epochs, device="cpu", initial=start, split=split_)
                for k, p in enumerate(parts)}
    history = Driver(InProcessFleet(trainers), fedavg(), split_.federated(start), RunConfig(rounds=rounds, seed=seed),
                     evaluate=evaluator(start, test)).run()
    sent = np.cumsum([r.metrics["bytes_down"] + r.metrics["bytes_up"] for r in history.rounds])
    curve = history.metric("accuracy")
    reached = next((i for i, a in enumerate(curve) if a >= target), None)
    return {"accuracy": curve[-1], "bytes": float(sent[-1]), "curve": curve,
            "federated_params": sum(a.size for a in split_.federated(start).values()),
            "rounds_to_target": None if reached is None else reached + 1,
            "bytes_to_target": None if reached is None else float(sent[reached])}


def run(*, rounds: int, clients: int, epochs: int, pretrain_epochs: int, seed: int, out_dir: Path,
        target: float = 0.9, methods: Sequence[str] = tuple(METHODS)) -> dict[str, dict]:
    train, test = data()
    pretrained = pretrain(subset(train, range(5)), out_dir / "pretrained_0-4.safetensors", epochs=pretrain_epochs,
                          seed=seed)
    before = evaluator(pretrained, subset(test, range(5)))(pretrained)["accuracy"]
    results = {m: finetune(m, pretrained, subset(train, range(5, 10)), subset(test, range(5, 10)), clients=clients,
                           rounds=rounds, epochs=epochs, seed=seed, target=target) for m in methods}
    results["pretrained"] = {"accuracy_0-4": before}
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--target", type=float, default=0.9, help="report the bytes sent until this accuracy")
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/transfer_digits"))
    parser.add_argument("--quick", action="store_true", help="2 rounds, short pretraining: a smoke test")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("fedloom.driver").setLevel(logging.ERROR)
    rounds, pre = (2, 3) if args.quick else (args.rounds, args.pretrain_epochs)
    results = run(rounds=rounds, clients=args.clients, epochs=args.epochs, pretrain_epochs=pre, seed=args.seed,
                  out_dir=args.out_dir, target=args.target)
    print(f"pretrained on 0-4 ({pre} epochs): test accuracy on 0-4 {results['pretrained']['accuracy_0-4']:.3f}")
    print(f"fine-tuning on 5-9: {args.clients} clients, {rounds} rounds x {args.epochs} local epoch(s)")
    print(f"{'method':>16} {'params sent':>11} {'accuracy 5-9':>12} {'bytes sent':>12} "
          f"{f'to reach {args.target:g}':>22}  per-round accuracy")
    for m in METHODS:
        r = results[m]
        curve = " ".join(f"{a:.3f}" for a in r["curve"])
        reach = "never" if r["rounds_to_target"] is None else \
            f"{int(r['bytes_to_target']):,} (round {r['rounds_to_target']})"
        print(f"{m:>16} {r['federated_params']:>11} {r['accuracy']:>12.3f} {int(r['bytes']):>12,} {reach:>22}  {curve}")
    return results


if __name__ == "__main__":
    main()
