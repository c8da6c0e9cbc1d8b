"""The PyTorch trainer: training, copies, config overrides, evaluation, DataLoaders, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedloom.client.torch_trainer import TensorData, TorchTrainer, evaluate_model
from fedloom.client.trainer import execute
from fedloom.tensors import NamedTensors
from fedloom.types import FitRes, Instruction


def _data(n: int = 64, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()  # linearly separable
    return TensorData(x, y)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def _trainer(**kw) -> TorchTrainer:
    kw.setdefault("lr", 0.1)
    return TorchTrainer(_model(), _data(), _data(32, seed=1), device="cpu", **kw)


def test_fit_changes_weights_and_reports_n_and_loss():
    t = _trainer()
    w0 = t.weights()
    w1, n, metrics = t.fit(w0, {})
    assert n == 64
    assert set(metrics) == {"loss"} and 0.0 < metrics["loss"] < 5.0
    assert list(w1) == list(w0) == ["weight", "bias"]
    assert not w1.equal(w0)
    assert w1.spec() == w0.spec()


def test_fit_starts_from_the_given_weights():
    t = _trainer(lr=0.0)
    given = NamedTensors({"weight": torch.full((2, 4), 0.25).numpy(), "bias": torch.tensor([1.0, -1.0]).numpy()})
    w, _, _ = t.fit(given, {})
    assert w.equal(given)  # lr 0: training leaves the loaded weights as they are


def test_returned_weights_are_copies():
    t = _trainer()
    w1, _, _ = t.fit(t.weights(), {})
    snapshot = {k: v.copy() for k, v in w1.items()}
    t.fit(w1, {"epochs": 2})  # trains the same model object further
    with torch.no_grad():
        t.model.weight.add_(1.0)
    assert all((w1[k] == snapshot[k]).all() for k in w1)
    w1["bias"][0] = 123.0  # and writing to the result does not touch the model
    assert float(t.model.bias.detach()[0]) != 123.0


def test_input_weights_are_not_modified():
    t = _trainer()
    w0 = t.weights()
    before = {k: v.copy() for k, v in w0.items()}
    t.fit(w0, {})
    assert all((w0[k] == before[k]).all() for k in w0)


def test_config_overrides_lr_and_epochs():
    t = _trainer(lr=0.1, epochs=1)
    w0 = t.weights()
    frozen, _, _ = t.fit(w0, {"lr": 0.0})
    assert frozen.equal(w0)

    torch.manual_seed(1)
    one, _, _ = t.fit(w0, {"epochs": 1, "batch_size": 64})
    torch.manual_seed(1)
    three, _, _ = t.fit(w0, {"epochs": 3, "batch_size": 64})
    # full-batch GD: 3 epochs = 3 steps; moving further from w0 than 1 step
    d1 = sum(float(abs(one[k] - w0[k]).sum()) for k in w0)
    d3 = sum(float(abs(three[k] - w0[k]).sum()) for k in w0)
    assert d3 > 2 * d1 > 0


def test_full_batch_sgd_step_matches_hand_computation():
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    y = torch.tensor([0, 1])
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    t = TorchTrainer(model, TensorData(x, y), lr=1.0, batch_size=2, device="cpu")
    w, n, metrics = t.fit(t.weights(), {})
    # zero logits -> p = [0.5, 0.5]; grad of mean CE wrt logits = (p - onehot)/2 per sample
    # sample 0: [0, 0] - ... -> dW row0 = -0.25 * x0, row1 = +0.25 * x0; sample 1 the reverse with x1
    assert n == 2 and metrics["loss"] == pytest.approx(0.6931472, abs=1e-6)  # ln 2
    assert w["weight"][:, :2].tolist() == [[0.25, -0.25], [-0.25, 0.25]]
    assert w["bias"].tolist() == [0.0, 0.0]


def test_evaluate_gives_accuracy():
    t = _trainer()
    w = t.weights()
    for _ in range(5):
        w, _, _ = t.fit(w, {"epochs": 5})
    n, m = t.evaluate(w, {})
    assert n == 32
    assert set(m) == {"loss", "accuracy"} and m["accuracy"] >= 0.9


def test_evaluate_model_hand_counts():
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model.bias.zero_()
    x = torch.tensor([[1.0], [2.0], [-1.0], [3.0]])  # predicts class 0, 0, 1, 0
    y = torch.tensor([0, 1, 1, 0])
    n, m = evaluate_model(model, [(x[:3], y[:3]), (x[3:], y[3:])])
    assert n == 4 and m["accuracy"] == 0.75
    assert evaluate_model(model, []) == (0, {})


def test_evaluate_without_test_data_raises():
    t = TorchTrainer(_model(), _data(), device="cpu")
    with pytest.raises(ValueError, match="no evaluation data"):
        t.evaluate(t.weights(), {})


def test_works_with_a_dataloader():
    d = _data()
    loader = DataLoader(TensorDataset(d.x, d.y), batch_size=16, shuffle=True)
    t = TorchTrainer(_model(), loader, DataLoader(TensorDataset(d.x, d.y), batch_size=50), lr=0.5, device="cpu")
    w0 = t.weights()
    w1, n, metrics = t.fit(w0, {})
    assert n == 64 and not w1.equal(w0) and metrics["loss"] > 0
    n_eval, m = t.evaluate(w1, {})
    assert n_eval == 64 and 0.0 <= m["accuracy"] <= 1.0


def test_dataloader_example_count_does_not_grow_with_epochs():
    d = _data()
    t = TorchTrainer(_model(), DataLoader(TensorDataset(d.x, d.y), batch_size=16), device="cpu")
    _, n, _ = t.fit(t.weights(), {"epochs": 3})
    assert n == 64


def test_tensor_data_length_mismatch():
    with pytest.raises(ValueError, match="3 inputs but 2 targets"):
        TensorData(torch.zeros(3, 1), torch.zeros(2))


def test_model_factory_accepted():
    t = TorchTrainer(_model, _data(), device="cpu")
    assert list(t.weights()) == ["weight", "bias"]


def _fit_via_execute(seed: int, node: str = "n1", rnd: int = 1) -> FitRes:
    t = _trainer()
    inst = Instruction("fit", rnd, t.weights(), {"seed": seed, "batch_size": 8})
    out = execute(t, node, inst)
    assert isinstance(out, FitRes)
    return out


def test_deterministic_given_the_same_seed():
    torch.manual_seed(123)  # global state before must not matter
    a = _fit_via_execute(7)
    torch.manual_seed(456)
    b = _fit_via_execute(7)
    assert a.weights.equal(b.weights) and a.metrics == b.metrics
    assert not a.weights.equal(_fit_via_execute(8).weights)
    assert not a.weights.equal(_fit_via_execute(7, node="n2").weights)
    assert not a.weights.equal(_fit_via_execute(7, rnd=2).weights)
