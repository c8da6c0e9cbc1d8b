import pytest
import torch
from torch import nn

from fedloom.client.torch_trainer import TensorData, TorchTrainer
from fedloom.strategies.fedprox import fedprox
from fedloom.tensors import NamedTensors


def _one_weight_trainer() -> TorchTrainer:
    """Loss (w - 1)^2 on a single example x = 1, y = 1: a one-parameter model checkable by hand."""
    data = TensorData(torch.ones(1, 1), torch.ones(1, 1))
    model = nn.Linear(1, 1, bias=False)
    return TorchTrainer(model, data, lr=0.1, epochs=2, batch_size=1, loss_fn=nn.MSELoss(), device="cpu")


START = NamedTensors({"weight": torch.zeros(1, 1).numpy()})


@pytest.mark.parametrize("mu, expected", [
    (0.0, 0.36),  # w1 = 0 - 0.1 * 2(0 - 1) = 0.2; w2 = 0.2 - 0.1 * 2(0.2 - 1) = 0.36
    (2.0, 0.32),  # w2 = 0.2 - 0.1 * (2(0.2 - 1) + 2 * (0.2 - 0)) = 0.32
])
def test_proximal_term_two_steps_by_hand(mu, expected):
    weights, _, _ = _one_weight_trainer().fit(START, {"mu": mu})
    assert float(weights["weight"][0, 0]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mu", [0.0, 1.0, 2.0, 6.0])
def test_proximal_term_pulls_the_optimum_toward_the_global_weights(mu):
    # minimiser of (w - 1)^2 + (mu/2) w^2 is 2 / (2 + mu)
    weights, _, _ = _one_weight_trainer().fit(START, {"mu": mu, "epochs": 300})
    assert float(weights["weight"][0, 0]) == pytest.approx(2 / (2 + mu), abs=1e-5)


def test_fedprox_preset_is_fedavg_with_mu_in_the_fit_config():
    strategy = fedprox(mu=0.5)
    assert strategy.fit_config == {"mu": 0.5} and strategy.post is None
    with pytest.raises(ValueError):
        fedprox(mu=-1.0)
