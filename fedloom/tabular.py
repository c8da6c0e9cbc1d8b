"""Tabular workloads with federated normalization: scikit-learn's breast cancer and wine data.

Raw tabular features live on wildly different scales (breast cancer: from
about 0.001 to 4000), which plain SGD on an MLP handles badly. Normalizing
needs the global mean and standard deviation, which no client has: the
coordinator collects them from sufficient statistics
(``fedloom.preprocessing.collect_feature_stats``) and sends them in every
config; each ``TabularTrainer`` answers the stats task and normalizes its own
rows with what it is sent::

    workload = tabular("breast_cancer", 5, scheme="iid", seed=0)
    fleet = InProcessFleet(factory=lambda n: workload.trainer(int(n)), node_ids=[str(i) for i in range(5)])
    norm = collect_feature_stats(fleet, fleet.wait_for_nodes(5, 60), timeout=60).to_config("standard")
    Driver(fleet, fedavg(), workload.initial_weights(0), RunConfig(fit_config=norm),
           evaluate=workload.evaluator(norm)).run()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from fedloom import datasets, metrics, models, partition, preprocessing
from fedloom.client.torch_trainer import TensorData, TorchTrainer
from fedloom.preprocessing import Normalizer
from fedloom.tensors import NamedTensors
from fedloom.types import Config, Metrics
from fedloom.workloads import DATA_SEED, Workload

TABULAR = ("breast_cancer", "wine")


def load(name: str) -> datasets.Dataset:
    """An embedded scikit-learn tabular data set (no download): ``breast_cancer`` (30 features, 2 classes)
    or ``wine`` (13 features, 3 classes), features float32 as they come (not normalized)."""
    from sklearn import datasets as sk

    loaders = {"breast_cancer": sk.load_breast_cancer, "wine": sk.load_wine}
    if name not in loaders:
        raise ValueError(f"unknown tabular data set {name!r}; choose one of {', '.join(TABULAR)}")
    raw = loaders[name]()
    y = raw.target.astype(np.int64)
    return datasets.Dataset(raw.data.astype(np.float32), y, int(y.max()) + 1)


class TabularTrainer:
    """A TorchTrainer that answers the ``feature_stats`` task and normalizes its data as configs say.

    Statistics come from the training rows only (the held-out evaluation rows
    must not shape the normalization). The raw rows are kept; the normalized
    copy is rebuilt only when the normalization in the config changes.
    """

    def __init__(self, inner: TorchTrainer, *, num_classes: int):
        if not isinstance(inner.train_data, TensorData):
            raise ValueError("TabularTrainer needs the training data as TensorData")
        self.inner = inner
        self.num_classes = num_classes
        self._raw = (inner.train_data, inner.test_data)
        self._norm: Normalizer | None = None

    def _prepare(self, config: Config) -> None:
        norm = Normalizer.from_config(config)
        if (norm is None and self._norm is None) or (norm is not None and norm.same(self._norm)):
            return
        apply = (lambda d: d) if norm is None else partial(_normalized, norm)
        train, test = self._raw
        self.inner.train_data = apply(train)
        self.inner.test_data = test if test is None else apply(test)
        self._norm = norm

    def fit(self, weights: NamedTensors, config: Config) -> tuple[NamedTensors, int, Metrics]:
        self._prepare(config)
        return self.inner.fit(weights, config)

    def evaluate(self, weights: NamedTensors, config: Config) -> tuple[int, Metrics]:
        if preprocessing.is_stats_task(config):
            train = self._raw[0]
            return preprocessing.answer(train.x, train.y, num_classes=self.num_classes)
        self._prepare(config)
        return self.inner.evaluate(weights, config)


def _normalized(norm: Normalizer, data: TensorData) -> TensorData:
    return TensorData(norm.apply(data.x), data.y)


@dataclass
class TabularWorkload(Workload):
    """A ``Workload`` whose trainers are ``TabularTrainer`` s and whose evaluator normalizes the test set."""

    def trainer(self, index: int, *, device: str | None = None, **options) -> TabularTrainer:  # type: ignore[override]
        return TabularTrainer(super().trainer(index, device=device, **options), num_classes=self.train.num_classes)

    def evaluator(self, config: Config | None = None) -> Callable[[NamedTensors], Metrics]:
        """Centralized evaluation on the test split, normalized as ``config`` (the fit config) says."""
        model = self.model_fn()
        norm = Normalizer.from_config(config or {})
        x = torch.from_numpy(self.test.x if norm is None else norm.apply(self.test.x))
        y = torch.from_numpy(self.test.y)

        def evaluate(weights: NamedTensors) -> Metrics:
            model.load_state_dict(weights.to_torch())
            return metrics.compute(metrics.evaluate_stats(model, [(x, y)], self.test.num_classes))

        return evaluate


def tabular(name: str, num_clients: int, *, scheme: str = "iid", seed: int = 0, alpha: float = 0.5,
            classes_per_client: int = 2, test_fraction: float = 0.2, hidden: int = 32, lr: float = 0.05,
            epochs: int = 2, val_fraction: float = 0.0) -> TabularWorkload:
    """``name`` (breast_cancer or wine) split train/test (fixed), the training rows partitioned over
    ``num_clients`` by ``scheme``; an MLP with ``hidden`` units learns it."""
    data = load(name)
    train, test = datasets.split(data, test_fraction=test_fraction, seed=DATA_SEED)
    parts = partition.partition(train.y, num_clients, scheme, seed=seed, alpha=alpha,
                                classes_per_client=classes_per_client)
    model_fn = partial(models.mlp, data.x.shape[1], data.num_classes, hidden)
    return TabularWorkload(name, model_fn, train, test, parts, lr=lr, momentum=0.9, batch_size=16, epochs=epochs,
                           val_fraction=val_fraction)
