"""Workloads for simulation beyond the default digits: FedProx Synthetic, user ``.npz`` files, torch Datasets.

Each returns a ``fedloom.workloads.Workload``: one training set with one
index array per client, a held-out test set and a model factory, so the
trainer factory, initial weights and evaluator come for free.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fedloom import datasets, models, partition
from fedloom.client.torch_trainer import TensorData
from fedloom.workloads import DATA_SEED, Workload, digits

DATASETS = ("digits", "synthetic", "npz")


def synthetic(num_clients: int, *, alpha: float = 1.0, beta: float = 1.0, seed: int = 0,
              test_fraction: float = 0.2) -> Workload:
    """FedProx's Synthetic(alpha, beta): each client's data is its own; an MLP learns them.

    A seeded ``test_fraction`` of every client's samples is held out; the
    held-out parts together form the centralized test set.
    """
    clients = datasets.synthetic(alpha=alpha, beta=beta, num_clients=num_clients, seed=seed)
    rng = np.random.default_rng(DATA_SEED)
    trains, tests = [], []
    for data in clients:
        order = rng.permutation(len(data))
        cut = max(1, int(round(len(data) * test_fraction)))
        tests.append(data.subset(np.sort(order[:cut])))
        trains.append(data.subset(np.sort(order[cut:])))
    train, parts = _concat(trains)
    test, _ = _concat(tests)
    model_fn = partial(models.mlp, train.x.shape[1], train.num_classes)
    return Workload("synthetic", model_fn, train, test, parts, lr=0.01, momentum=0.0, epochs=1)


def npz(path: str | Path, num_clients: int, *, scheme: str = "iid", seed: int = 0, alpha: float = 0.5,
        classes_per_client: int = 2, test_fraction: float = 0.2) -> Workload:
    """A user's ``.npz`` (arrays ``x`` and ``y``), split train/test, partitioned, learned by an MLP."""
    data = datasets.from_npz(path)
    x = data.x.reshape(len(data), -1)
    flat = datasets.Dataset(x, data.y, data.num_classes)
    return from_arrays(flat, num_clients, scheme=scheme, seed=seed, alpha=alpha,
                       classes_per_client=classes_per_client, test_fraction=test_fraction, name=f"npz:{path}")


def from_arrays(data: datasets.Dataset, num_clients: int, *, scheme: str = "iid", seed: int = 0, alpha: float = 0.5,
                classes_per_client: int = 2, test_fraction: float = 0.2, name: str = "arrays") -> Workload:
    """Flat features and integer labels, split train/test and partitioned over clients, learned by an MLP."""
    if data.x.ndim != 2:
        raise ValueError(f"expected flat features (N x D), got shape {list(data.x.shape)}")
    train, test = datasets.split(data, test_fraction=test_fraction, seed=DATA_SEED)
    parts = partition.partition(train.y, num_clients, scheme, seed=seed, alpha=alpha,
                                classes_per_client=classes_per_client)
    model_fn = partial(models.mlp, data.x.shape[1], data.num_classes)
    return Workload(name, model_fn, train, test, parts)


def make(dataset: str, num_clients: int, *, scheme: str = "dirichlet", seed: int = 0, alpha: float = 0.5,
         classes_per_client: int = 2, data: str | Path | None = None, synthetic_alpha: float = 1.0,
         synthetic_beta: float = 1.0) -> Workload:
    """The workload named ``dataset`` (``digits``, ``synthetic`` or ``npz`` with ``data``)."""
    if dataset == "digits":
        return digits(num_clients, scheme=scheme, seed=seed, alpha=alpha, classes_per_client=classes_per_client)
    if dataset == "synthetic":
        return synthetic(num_clients, alpha=synthetic_alpha, beta=synthetic_beta, seed=seed)
    if dataset == "npz":
        if data is None:
            raise ValueError("--dataset npz needs --data PATH (an .npz file with arrays x and y)")
        return npz(data, num_clients, scheme=scheme, seed=seed, alpha=alpha, classes_per_client=classes_per_client)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def tensor_data(dataset: torch.utils.data.Dataset) -> TensorData:
    """A map-style torch Dataset of (input, label) pairs, materialized as stacked tensors."""
    pairs = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    if not pairs:
        raise ValueError("the dataset is empty")
    x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
    y = torch.as_tensor([int(p[1]) for p in pairs], dtype=torch.int64)
    return TensorData(x, y)


def split_dataset(dataset: torch.utils.data.Dataset | TensorData, num_clients: int, *, scheme: str = "iid",
                  seed: int = 0, alpha: float = 0.5, classes_per_client: int = 2) -> list[TensorData]:
    """Per-client TensorData from a torch Dataset, partitioned by label with ``fedloom.partition``."""
    whole = dataset if isinstance(dataset, TensorData) else tensor_data(dataset)
    parts = partition.partition(whole.y.numpy(), num_clients, scheme, seed=seed, alpha=alpha,
                                classes_per_client=classes_per_client)
    return [TensorData(whole.x[torch.from_numpy(p)], whole.y[torch.from_numpy(p)]) for p in parts]


def _concat(parts: Sequence[datasets.Dataset]) -> tuple[datasets.Dataset, list[np.ndarray]]:
    sizes = np.array([len(p) for p in parts])
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    x = np.concatenate([p.x for p in parts])
    y = np.concatenate([p.y for p in parts])
    index = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(parts))]
    return datasets.Dataset(x, y, parts[0].num_classes), index
