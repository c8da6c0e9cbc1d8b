"""A Trainer for a PyTorch ``nn.Module`` and its data.

It uses CUDA when present. Data given as tensors moves to the device once and
is batched there, so nothing is copied to or from the host per batch; any
iterable of (inputs, targets) batches, such as a DataLoader, works too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedloom.strategies.scaffold import CONTROL, DELTA
from fedloom.tensors import NamedTensors
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
    ):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = (model if isinstance(model, nn.Module) else model()).to(self.device)
        self.train_data = train.to(self.device) if isinstance(train, TensorData) else train
        self.test_data = test.to(self.device) if isinstance(test, TensorData) else test
        self.defaults = {"lr": lr, "epochs": epochs, "batch_size": batch_size,
                         "momentum": momentum, "weight_decay": weight_decay}
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()

    def _hp(self, config: Config, key: str) -> float:
        return config.get(key, self.defaults[key])  # type: ignore[return-value]

    def load(self, weights: NamedTensors) -> None:
        self.model.load_state_dict(weights.to_torch(), strict=True)

    def weights(self) -> NamedTensors:
        """A copy of the model's state, independent of later training."""
        return NamedTensors.from_torch({k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()})

    def fit(self, weights: NamedTensors, config: Config) -> tuple[NamedTensors, int, Metrics]:
        weights, control = _split_control(weights)
        self.load(weights)
        self.model.train()
        opt = torch.optim.SGD(self.model.parameters(), lr=float(self._hp(config, "lr")),
                              momentum=float(self._hp(config, "momentum")),
                              weight_decay=float(self._hp(config, "weight_decay")))
        prox = _Proximal(self.model, float(config.get("mu", 0.0)))
        drift = None
        if control:
            self._scaffold = getattr(self, "_scaffold", None) or _ScaffoldClient(self.model)
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
        out = self.weights()
        if drift is not None:
            out = NamedTensors({**out, **drift.finish(steps, float(self._hp(config, "lr")))})
        return out, n, {"loss": float(loss_sum) / max(seen, 1)}

    @torch.no_grad()
    def evaluate(self, weights: NamedTensors, config: Config) -> tuple[int, Metrics]:
        if self.test_data is None:
            raise ValueError("this trainer has no evaluation data")
        self.load(weights)
        return evaluate_model(self.model, self._batches(self.test_data, 1024, shuffle=False), self.loss_fn)

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


class _Proximal:
    """FedProx's proximal term (Li et al. 2020): adds (mu/2) * ||w - w_global||^2 to the loss.

    Over trainable parameters, with w_global the weights received; its gradient
    mu * (w - w_global) is added directly, which needs no autograd graph.
    """

    def __init__(self, model: nn.Module, mu: float):
        if mu < 0:
            raise ValueError(f"mu must be non-negative, got {mu}")
        self.mu = mu
        self.params = [p for p in model.parameters() if p.requires_grad] if mu > 0 else []
        self.anchor = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def add_gradient(self) -> None:
        for p, g in zip(self.params, self.anchor, strict=True):
            if p.grad is None:
                p.grad = self.mu * (p - g)
            else:
                p.grad.add_(p - g, alpha=self.mu)


def _split_control(weights: NamedTensors) -> tuple[NamedTensors, dict[str, np.ndarray]]:
    """Separate SCAFFOLD's server control variate (if sent) from the model."""
    if not any(n.startswith(CONTROL) for n in weights):
        return weights, {}
    model = NamedTensors((n, a) for n, a in weights.items() if not n.startswith(CONTROL))
    return model, {n[len(CONTROL):]: a for n, a in weights.items() if n.startswith(CONTROL)}


class _ScaffoldClient:
    """SCAFFOLD's client side (Karimireddy et al. 2020, option II).

    Keeps this client's control variate c_i across rounds; during training adds
    (c - c_i) to each gradient; afterwards sets c_i+ = c_i - c + (x - y) / (K lr)
    and returns delta c_i = c_i+ - c_i under DELTA names.
    """

    def __init__(self, model: nn.Module):
        self.params = dict(model.named_parameters())
        self.c_i = {n: torch.zeros_like(p) for n, p in self.params.items()}

    def begin(self, control: dict[str, np.ndarray], device: torch.device) -> _ScaffoldClient:
        missing = sorted(set(self.params) - set(control))
        if missing:
            raise ValueError(f"SCAFFOLD control variate lacks parameters {missing[:3]}")
        self.c = {n: torch.as_tensor(control[n], device=device) for n in self.params}
        self.start = {n: p.detach().clone() for n, p in self.params.items()}
        return self

    @torch.no_grad()
    def correct(self) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.add_(self.c[n] - self.c_i[n])

    @torch.no_grad()
    def finish(self, steps: int, lr: float) -> dict[str, np.ndarray]:
        out = {}
        for n, p in self.params.items():
            new = self.c_i[n] - self.c[n] + (self.start[n] - p) / (max(steps, 1) * lr)
            out[DELTA + n] = (new - self.c_i[n]).cpu().numpy()
            self.c_i[n] = new
        return out


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
