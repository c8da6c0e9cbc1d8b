"""Client-side corrections of the local objective: FedProx's proximal term and
SCAFFOLD's control variates. Both act on gradients between backward and step."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedloom.strategies.scaffold import CONTROL, DELTA
from fedloom.tensors import NamedTensors


class Proximal:
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


def split_control(weights: NamedTensors) -> tuple[NamedTensors, dict[str, np.ndarray]]:
    """Separate SCAFFOLD's server control variate (if sent) from the model."""
    if not any(n.startswith(CONTROL) for n in weights):
        return weights, {}
    model = NamedTensors((n, a) for n, a in weights.items() if not n.startswith(CONTROL))
    return model, {n[len(CONTROL):]: a for n, a in weights.items() if n.startswith(CONTROL)}


class ScaffoldClient:
    """SCAFFOLD's client side (Karimireddy et al. 2020, option II).

    Keeps this client's control variate c_i across rounds; during training adds
    (c - c_i) to each gradient; afterwards sets c_i+ = c_i - c + (x - y) / (K lr)
    and returns delta c_i = c_i+ - c_i under DELTA names.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.c_i: dict[str, torch.Tensor] = {}

    def begin(self, control: dict[str, np.ndarray], device: torch.device) -> ScaffoldClient:
        """Start a round with the server's control variate (float model entries, by name)."""
        self.names = list(control)
        named = dict(self.model.named_parameters())
        self.params = {n: named[n] for n in control if n in named and named[n].requires_grad}
        for n, p in self.params.items():
            self.c_i.setdefault(n, torch.zeros_like(p))
        self.c = {n: torch.as_tensor(control[n], device=device) for n in self.params}
        self.start = {n: p.detach().clone() for n, p in self.params.items()}
        return self

    @torch.no_grad()
    def correct(self) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.add_(self.c[n] - self.c_i[n])

    @torch.no_grad()
    def finish(self, steps: int, lr: float, control: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """delta c_i for every control entry (zero for buffers and frozen parameters)."""
        out = {DELTA + n: np.zeros_like(c) for n, c in control.items()}
        for n, p in self.params.items():
            new = self.c_i[n] - self.c[n] + (self.start[n] - p) / (max(steps, 1) * lr)
            out[DELTA + n] = (new - self.c_i[n]).cpu().numpy()
            self.c_i[n] = new
        return out
