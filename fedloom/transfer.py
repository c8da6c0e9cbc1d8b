"""Transfer learning: pretrained starts, frozen parameters, partial federation, personalization.

Parameters fall into three groups by name patterns (``fnmatch`` style, e.g.
``"features.*"``): *frozen* ones keep their pretrained values and never
train; *local* ones train but stay on the client (FedPer heads, FedBN
normalization layers); the rest are *federated*: only they travel, so the
bytes on the wire drop with every parameter frozen or kept local.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from fedloom.tensors import NamedTensors


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class Split:
    """Which parameters are frozen, local, or federated."""

    frozen: Sequence[str] = field(default_factory=tuple)
    local: Sequence[str] = field(default_factory=tuple)

    def group(self, name: str) -> str:
        if matches(name, self.frozen):
            return "frozen"
        if matches(name, self.local):
            return "local"
        return "federated"

    def federated(self, weights: NamedTensors) -> NamedTensors:
        """The subset of ``weights`` that the coordinator aggregates."""
        return NamedTensors((n, a) for n, a in weights.items() if self.group(n) == "federated")

    def part(self, weights: NamedTensors, group: str) -> NamedTensors:
        return NamedTensors((n, a) for n, a in weights.items() if self.group(n) == group)


# FedBN (Li et al. 2021) keeps normalization layers local; FedPer (Arivazhagan et al. 2019) keeps the head.
FEDBN_PATTERNS = ("*bn*", "*norm*", "*running_mean", "*running_var", "*num_batches_tracked")


def load_pretrained(path: str | Path) -> NamedTensors:
    """A pretrained checkpoint: ``.safetensors``, or a torch state_dict read with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"pretrained checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from fedloom.rundir import load_model

        return load_model(path)
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a state_dict loadable with weights_only=True: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict of tensors")
    return NamedTensors.from_torch(state)


def patterns(text: str) -> tuple[str, ...]:
    """``"a.*, b.*"`` -> ``("a.*", "b.*")``: the command line's comma-separated patterns."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def start(model_weights: NamedTensors, *, pretrained: str | Path | None = None, freeze: str = "",
          local: str = "") -> tuple[Split, NamedTensors]:
    """The split and the full starting weights for a run: the pretrained checkpoint (checked against
    the model's names and shapes) or the model's own initial weights."""
    split = Split(frozen=patterns(freeze), local=patterns(local))
    full = load_pretrained(pretrained) if pretrained else model_weights
    if list(full) != list(model_weights) or any(full[n].shape != model_weights[n].shape for n in model_weights):
        raise ValueError(f"pretrained checkpoint {pretrained} does not fit the model "
                         f"(expected {list(model_weights)[:4]}...)")
    if not split.federated(full):
        raise ValueError("--freeze/--local leave no parameter to federate")
    return split, full
