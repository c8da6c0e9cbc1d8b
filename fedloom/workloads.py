"""Workloads: a model, a data set split across clients, and a held-out test set.

The default, ``digits``, is what ``fedloom server``, ``fedloom client`` and
``fedloom simulate`` run when given no code of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedloom import datasets, metrics, models, partition
from fedloom.client.torch_trainer import TensorData, TorchTrainer
from fedloom.tensors import NamedTensors
from fedloom.types import Metrics

DATA_SEED = 0  # the train/test split of embedded data is fixed, so every process agrees on it


@dataclass
class Workload:
    name: str
    model_fn: Callable[[], nn.Module]
    train: datasets.Dataset
    test: datasets.Dataset
    parts: list[np.ndarray]
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    epochs: int = 5
    val_fraction: float = 0.0  # of each client's data, held out for federated evaluation

    @property
    def num_clients(self) -> int:
        return len(self.parts)

    def client_data(self, index: int) -> datasets.Dataset:
        if not 0 <= index < len(self.parts):
            raise ValueError(f"partition {index} does not exist; valid: 0..{len(self.parts) - 1}")
        return self.train.subset(self.parts[index])

    def trainer(self, index: int, *, device: str | None = None, **options) -> TorchTrainer:
        """Client ``index``'s trainer; with ``val_fraction`` > 0 part of its data is held out for
        federated evaluation. ``options`` go to TorchTrainer (split, initial, personal_path...)."""
        d = self.client_data(index)
        val = None
        if self.val_fraction > 0 and len(d) >= 2:
            cut = np.random.default_rng([DATA_SEED, index]).permutation(len(d))
            k = max(1, int(len(d) * self.val_fraction))
            val, d = d.subset(np.sort(cut[:k])), d.subset(np.sort(cut[k:]))
        tensors = lambda ds: TensorData(torch.from_numpy(ds.x), torch.from_numpy(ds.y))  # noqa: E731
        return TorchTrainer(self.model_fn, tensors(d), None if val is None else tensors(val), lr=self.lr,
                            momentum=self.momentum, batch_size=self.batch_size, epochs=self.epochs, device=device,
                            num_classes=self.train.num_classes, **options)

    def initial_weights(self, seed: int) -> NamedTensors:
        torch.manual_seed(seed)
        return NamedTensors.from_torch(self.model_fn().state_dict())

    def evaluator(self) -> Callable[[NamedTensors], Metrics]:
        """Centralized evaluation on the held-out test split."""
        model = self.model_fn()
        x, y = torch.from_numpy(self.test.x), torch.from_numpy(self.test.y)

        def evaluate(weights: NamedTensors) -> Metrics:
            model.load_state_dict(weights.to_torch())
            return metrics.compute(metrics.evaluate_stats(model, [(x, y)], self.test.num_classes))

        return evaluate


def digits(num_clients: int, *, scheme: str = "iid", seed: int = 0, alpha: float = 0.5,
           classes_per_client: int = 2) -> Workload:
    """The digits CNN over ``num_clients`` clients (80/20 train/test split)."""
    train, test = datasets.split(datasets.digits(), test_fraction=0.2, seed=DATA_SEED)
    parts = partition.partition(train.y, num_clients, scheme, seed=seed, alpha=alpha,
                                classes_per_client=classes_per_client)
    return Workload("digits", models.digits_cnn, train, test, parts)


WORKLOADS = {"digits": digits}
