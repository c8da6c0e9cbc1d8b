"""SCAFFOLD (Karimireddy et al. 2020): control variates against client drift.

The server keeps the control variate ``c`` in this piece's state and
broadcasts it beside the model under ``CONTROL`` names; each client keeps its
own ``c_i`` across rounds (in its trainer: on the node or in its Ray actor)
and returns ``delta c_i`` under ``DELTA`` names. The piece strips those from
the update, so the aggregate sees only the model, and at the end of the round
moves ``c += (|S| / N) * mean(delta c_i)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedloom.strategies.pipeline import (
    Pre,
    Rejected,
    RoundInfo,
    Strategy,
    Update,
    check_finite,
    check_structure,
    weighted_mean,
)
from fedloom.tensors import NamedTensors, is_float

CONTROL = "scaffold.c/"  # server -> client: the server control variate of parameter <name>
DELTA = "scaffold.dc/"  # client -> server: the change of the client's control variate


def _trainable(weights: NamedTensors) -> list[str]:
    return [n for n, a in weights.items() if is_float(a.dtype)]


@dataclass(frozen=True)
class _Scaffold:
    num_clients: int | None

    def init(self, weights: NamedTensors) -> dict:
        return {"c": {n: np.zeros(weights[n].shape, np.float64) for n in _trainable(weights)},
                "sum_dc": None, "count": 0}

    def broadcast(self, state: dict) -> dict[str, np.ndarray]:
        return {CONTROL + n: c.astype(np.float32) for n, c in state["c"].items()}

    def apply(self, state: dict, update: Update, global_weights: NamedTensors) -> tuple[Update, dict]:
        deltas = {n[len(DELTA):]: a for n, a in update.weights.items() if n.startswith(DELTA)}
        if set(deltas) != set(state["c"]):
            missing = sorted(set(state["c"]) - set(deltas))[:3]
            raise Rejected(f"SCAFFOLD update lacks control deltas (e.g. {missing}); does the trainer support it?")
        if state["sum_dc"] is None:
            state["sum_dc"] = {n: np.zeros_like(c) for n, c in state["c"].items()}
        for n, d in deltas.items():
            state["sum_dc"][n] += d
        state["count"] += 1
        model = NamedTensors((n, a) for n, a in update.weights.items() if not n.startswith(DELTA))
        return replace(update, weights=model), state

    def end_round(self, state: dict, info: RoundInfo) -> dict:
        if state["count"]:
            total = self.num_clients or info.num_available or state["count"]
            for n, c in state["c"].items():
                c += state["sum_dc"][n] / total  # (|S|/N) * mean = sum / N
        state["sum_dc"], state["count"] = None, 0
        return state


def scaffold_control(*, num_clients: int | None = None) -> Pre:
    """The SCAFFOLD piece; ``num_clients`` is N (default: the nodes available in the round)."""
    return _Scaffold(num_clients)


def scaffold(*, num_clients: int | None = None) -> Strategy:
    """SCAFFOLD with the server step size 1 (x += mean of client deltas, i.e. FedAvg of the models)."""
    return Strategy(
        name="scaffold",
        pre=(scaffold_control(num_clients=num_clients), check_structure(), check_finite()),
        aggregate=weighted_mean(),
        # option II estimates c_i from (x - y) / (K lr), which assumes plain SGD steps on the client
        fit_config={"momentum": 0.0},
    )
