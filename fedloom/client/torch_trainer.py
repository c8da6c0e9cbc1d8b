"""A Trainer for a PyTorch ``nn.Module`` and its data.

It uses CUDA when present. Data given as tensors moves to the device once and
is batched there, so nothing is copied to or from the host per batch; any
iterable of (inputs, targets) batches, such as a DataLoader, works too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedloom import metrics
from fedloom.client.corrections import Proximal, ScaffoldClient, split_control
from fedloom.rundir import load_model, save_model
from fedloom.tensors import NamedTensors
from fedloom.transfer import Split
from fedloom.types import Config, Metrics

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TensorData:
    """Inputs and targets held as tensors, batched on the device by the trainer."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} inputs but {len(self.y)} targets")

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device: torch.device) -> TensorData:
        return TensorData(self.x.to(device), self.y.to(device))


class TorchTrainer:
    """Trains and evaluates ``model`` with SGD on the given data.

    ``config`` keys sent by the coordinator override the defaults for one
    call: ``lr``, ``epochs``, ``batch_size``, ``momentum``, ``weight_decay``;
    ``mu`` > 0 adds FedProx's proximal term (mu/2) * ||w - w_global||^2.

    With ``num_classes``, ``evaluate`` reports precision, recall, F1 and AUC
    and the sufficient statistics behind them (``fedloom.metrics``).

    Transfer learning: ``initial`` (e.g. a pretrained checkpoint) is loaded
    first; parameters matching ``split.frozen`` never train; those matching
    ``split.local`` train but are never sent, and are saved to
    ``personal_path`` after each fit when given. The coordinator then sends
    and receives only the federated rest.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        train: TensorData | Batches,
        test: TensorData | Batches | None = None,
        *,
        lr: float = 0.05,
        epochs: int = 1,
        batch_size: int = 32,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        loss_fn: nn.Module | None = None,
        device: str | torch.device | None = None,
        initial: NamedTensors | None = None,
        split: Split | None = None,
        personal_path: str | Path | None = None,
        num_classes: int | None = None,
    ):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = (model if isinstance(model, nn.Module) else model()).to(self.device)
        self.split = split or Split()
        self.num_classes = num_classes
        self.personal_path = Path(personal_path) if personal_path is not None else None
        if initial is not None:
            self.load(initial, partial=True)
        if self.personal_path is not None and self.personal_path.exists():
            self.load(load_model(self.personal_path), partial=True)
        for name, param in self.model.named_parameters():
            if self.split.group(name) == "frozen":
                param.requires_grad_(False)
        self.train_data = train.to(self.device) if isinstance(train, TensorData) else train
        self.test_data = test.to(self.device) if isinstance(test, TensorData) else test
        self.defaults = {"lr": lr, "epochs": epochs, "batch_size": batch_size,
                         "momentum": momentum, "weight_decay": weight_decay}
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()

    def _hp(self, config: Config, key: str) -> float:
        return config.get(key, self.defaults[key])  # type: ignore[return-value]

    def load(self, weights: NamedTensors, *, partial: bool = False) -> None:
        """Load ``weights``; unless ``partial``, whatever is absent must be frozen or local."""
        state = self.model.state_dict()
        unknown = [n for n in weights if n not in state]
        if unknown:
            raise ValueError(f"weights name parameters the model does not have: {unknown[:3]}")
        missing = [n for n in state if n not in weights and self.split.group(n) == "federated"]
        if missing and not partial:
            raise ValueError(f"weights lack federated parameters {missing[:3]} (frozen/local patterns?)")
        self.model.load_state_dict(weights.to_torch(), strict=False)

    def weights(self, names: Iterable[str] | None = None) -> NamedTensors:
        """A copy of the model's state (or of ``names``), independent of later training."""
        state = self.model.state_dict()
        keys = list(state) if names is None else list(names)
        return NamedTensors.from_torch({k: state[k].detach().to("cpu", copy=True) for k in keys})

    def fit(self, weights: NamedTensors, config: Config) -> tuple[NamedTensors, int, Metrics]:
        weights, control = split_control(weights)
        self.load(weights)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=float(self._hp(config, "lr")),
                              momentum=float(self._hp(config, "momentum")),
                              weight_decay=float(self._hp(config, "weight_decay")))
        prox = Proximal(self.model, float(config.get("mu", 0.0)))
        drift = None
        if control:
            self._scaffold = getattr(self, "_scaffold", None) or ScaffoldClient(self.model)
            drift = self._scaffold.begin(control, self.device)
        epoch_seen, loss_sum, seen, steps = 0, 0.0, 0, 0
        for _ in range(int(self._hp(config, "epochs"))):
            epoch_seen = 0
            for x, y in self._batches(self.train_data, int(self._hp(config, "batch_size")), shuffle=True):
                opt.zero_grad(set_to_none=True)
                loss = self.loss_fn(self.model(x), y)
                loss.backward()
                prox.add_gradient()
                if drift is not None:
                    drift.correct()
                opt.step()
                steps += 1
                loss_sum += loss.detach() * len(y)
                seen += len(y)
                epoch_seen += len(y)
        n = len(self.train_data) if isinstance(self.train_data, TensorData) else epoch_seen
        out = self.weights(weights)  # exactly the federated names the coordinator sent
        if drift is not None:
            out = NamedTensors({**out, **drift.finish(steps, float(self._hp(config, "lr")), control)})
        if self.personal_path is not None:
            self.personal_path.parent.mkdir(parents=True, exist_ok=True)
            save_model(self.personal_path, self.weights(n for n in self.model.state_dict()
                                                        if self.split.group(n) == "local"))
        return out, n, {"loss": float(loss_sum) / max(seen, 1)}

    @torch.no_grad()
    def evaluate(self, weights: NamedTensors, config: Config) -> tuple[int, Metrics]:
        if self.test_data is None:
            raise ValueError("this trainer has no evaluation data")
        self.load(weights)
        batches = self._batches(self.test_data, 1024, shuffle=False)
        if self.num_classes is None:
            return evaluate_model(self.model, batches, self.loss_fn)
        # sufficient statistics travel with the metrics, so the coordinator aggregates them exactly
        stats = metrics.evaluate_stats(self.model, batches, self.num_classes)
        return stats.count, {**metrics.compute(stats), **metrics.to_dict(stats)}

    def _batches(self, data: TensorData | Batches, batch_size: int, *, shuffle: bool) -> Batches:
        if not isinstance(data, TensorData):
            for x, y in data:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return
        n = len(data)
        order = torch.randperm(n, device=self.device) if shuffle else torch.arange(n, device=self.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield data.x[idx], data.y[idx]


@torch.no_grad()
def evaluate_model(model: nn.Module, batches: Batches, loss_fn: nn.Module | None = None) -> tuple[int, Metrics]:
    """Loss and accuracy of a classifier over batches: (examples, metrics)."""
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    model.eval()
    n, loss_sum, correct = 0, 0.0, 0
    for x, y in batches:
        out = model(x)
        loss_sum += float(loss_fn(out, y)) * len(y)
        correct += int((out.argmax(dim=1) == y).sum())
        n += len(y)
    if n == 0:
        return 0, {}
    return n, {"loss": loss_sum / n, "accuracy": correct / n}
