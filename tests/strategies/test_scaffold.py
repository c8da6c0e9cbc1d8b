"""SCAFFOLD: server piece and client correction against hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedloom import NamedTensors
from fedloom.client.torch_trainer import TensorData, TorchTrainer
from fedloom.strategies import Rejected, Update
from fedloom.strategies.pipeline import RoundInfo
from fedloom.strategies.scaffold import CONTROL, DELTA, scaffold, scaffold_control

GLOBAL = NamedTensors({"w": np.zeros(2, np.float32), "steps": np.zeros((), np.int64)})


def _update(node: str, w: list[float], dc: list[float]) -> Update:
    weights = NamedTensors({"w": np.array(w, np.float32), "steps": np.zeros((), np.int64),
                            DELTA + "w": np.array(dc, np.float32)})
    return Update(node, weights, 1)


def test_server_piece_strips_deltas_and_moves_c_by_sum_over_n() -> None:
    piece = scaffold_control(num_clients=4)
    state = piece.init(GLOBAL)
    assert list(piece.broadcast(state)) == [CONTROL + "w"]  # integers have no control variate
    out, state = piece.apply(state, _update("a", [1, 1], [2.0, -4.0]), GLOBAL)
    assert list(out.weights) == ["w", "steps"]
    _, state = piece.apply(state, _update("b", [1, 1], [6.0, 0.0]), GLOBAL)
    state = piece.end_round(state, RoundInfo(1, 2, 2.0))
    # c += (|S| / N) * mean(dc) = sum(dc) / N = [8, -4] / 4
    np.testing.assert_allclose(piece.broadcast(state)[CONTROL + "w"], [2.0, -1.0])


def test_server_piece_uses_available_nodes_when_n_is_not_given() -> None:
    piece = scaffold_control()
    state = piece.init(GLOBAL)
    _, state = piece.apply(state, _update("a", [0, 0], [3.0, 3.0]), GLOBAL)
    state = piece.end_round(state, RoundInfo(1, 1, 1.0, num_available=3))
    np.testing.assert_allclose(state["c"]["w"], [1.0, 1.0])


def test_an_update_without_control_deltas_is_rejected() -> None:
    piece = scaffold_control()
    plain = Update("a", GLOBAL, 1)
    with pytest.raises(Rejected, match="control deltas"):
        piece.apply(piece.init(GLOBAL), plain, GLOBAL)


def _trainer() -> TorchTrainer:
    model = nn.Linear(1, 1, bias=False)
    data = TensorData(torch.ones(1, 1), torch.ones(1, 1))
    return TorchTrainer(model, data, lr=0.1, batch_size=1, epochs=1, loss_fn=nn.MSELoss(), device="cpu")


def test_client_correction_and_control_update() -> None:
    trainer = _trainer()
    w0 = NamedTensors({"weight": np.zeros((1, 1), np.float32)})
    c = {CONTROL + "weight": np.zeros((1, 1), np.float32)}
    # round 1: c = c_i = 0; grad of (w - 1)^2 at 0 is -2, so w = 0.2 and c_i+ = (0 - 0.2) / (1 * 0.1) = -2
    out, _, _ = trainer.fit(NamedTensors({**w0, **c}), {})
    np.testing.assert_allclose(out["weight"], [[0.2]], rtol=1e-6)
    np.testing.assert_allclose(out[DELTA + "weight"], [[-2.0]], rtol=1e-6)
    # round 2 from w = 0 with c = 5: corrected gradient -2 + 5 - (-2) = 5, so w = -0.5;
    # c_i+ = c_i - c + (x - y) / (K lr) = -2 - 5 + 5 = -2, so delta c_i = 0
    c = {CONTROL + "weight": np.full((1, 1), 5.0, np.float32)}
    out, _, _ = trainer.fit(NamedTensors({**w0, **c}), {})
    np.testing.assert_allclose(out["weight"], [[-0.5]], rtol=1e-6)
    np.testing.assert_allclose(out[DELTA + "weight"], [[0.0]], atol=1e-6)


def test_scaffold_preset_runs_end_to_end_in_process() -> None:
    from fedloom import Driver, InProcessFleet, RunConfig

    init = NamedTensors({"weight": np.zeros((1, 1), np.float32)})
    fleet = InProcessFleet({"a": _trainer(), "b": _trainer()})
    history = Driver(fleet, scaffold(), init, RunConfig(rounds=3, min_clients=2)).run()
    assert all(r.num_results == 2 and not r.failures for r in history.rounds)
    assert list(history.weights) == ["weight"]
    assert 0.0 < float(history.weights["weight"][0, 0]) <= 1.0
