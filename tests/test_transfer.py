"""Transfer learning: pretrained starts, frozen and local parameters, partial federation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedloom import Driver, InProcessFleet, NamedTensors, RunConfig, fedavg
from fedloom.client.torch_trainer import TensorData, TorchTrainer
from fedloom.rundir import save_model
from fedloom.transfer import Split, load_pretrained


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))


def _trainer(**kw) -> TorchTrainer:
    return TorchTrainer(_model(), _data(), lr=0.1, epochs=2, device="cpu", **kw)


def test_split_groups_by_pattern() -> None:
    split = Split(frozen=("0.*",), local=("2.bias",))
    assert [split.group(n) for n in ("0.weight", "2.bias", "2.weight")] == ["frozen", "local", "federated"]
    full = NamedTensors.from_torch(_model().state_dict())
    assert list(split.federated(full)) == ["2.weight"]


def test_frozen_parameters_do_not_train_and_only_federated_ones_travel() -> None:
    split = Split(frozen=("0.*",))
    trainer = _trainer(split=split)
    full = trainer.weights()
    sent = split.federated(full)
    out, n, _ = trainer.fit(sent, {})
    assert list(out) == ["2.weight", "2.bias"] and n == 32
    assert not np.array_equal(out["2.weight"], sent["2.weight"])
    after = trainer.weights()
    np.testing.assert_array_equal(after["0.weight"], full["0.weight"])


def test_local_parameters_stay_and_are_saved(tmp_path) -> None:
    split = Split(local=("2.*",))
    path = tmp_path / "personal.safetensors"
    trainer = _trainer(split=split, personal_path=path)
    sent = split.federated(trainer.weights())
    trainer.fit(sent, {})
    head = trainer.weights(["2.weight"])["2.weight"]
    trainer.fit(sent, {})  # the head keeps training from where it was, not from the sent weights
    assert not np.array_equal(trainer.weights(["2.weight"])["2.weight"], head)
    reborn = _trainer(split=split, personal_path=path)  # e.g. the node restarted
    np.testing.assert_array_equal(reborn.weights(["2.weight"])["2.weight"], trainer.weights(["2.weight"])["2.weight"])


def test_load_refuses_unknown_and_missing_federated_names() -> None:
    trainer = _trainer(split=Split(frozen=("0.*",)))
    with pytest.raises(ValueError, match="does not have"):
        trainer.load(NamedTensors({"nope": np.zeros(1, np.float32)}))
    with pytest.raises(ValueError, match="lack federated"):
        trainer.load(NamedTensors({"2.bias": np.zeros(3, np.float32)}))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pretrained_start(tmp_path, suffix) -> None:
    pretrained = NamedTensors.from_torch({k: v + 1.0 for k, v in _model().state_dict().items()})
    path = tmp_path / f"pre{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": pretrained.to_torch()}, path)
    else:
        save_model(path, pretrained)
    loaded = load_pretrained(path)
    assert loaded.equal(pretrained)
    trainer = _trainer(initial=loaded)
    assert trainer.weights().equal(pretrained)


def test_pretrained_refuses_non_state_dicts(tmp_path) -> None:
    path = tmp_path / "bad.pt"
    torch.save({"optimizer": "not a tensor"}, path)
    with pytest.raises(ValueError, match="state_dict"):
        load_pretrained(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_pretrained(tmp_path / "missing.pt")


def test_bytes_on_the_wire_drop_with_frozen_parameters() -> None:
    def run(split: Split) -> float:
        trainers = {f"n{i}": _trainer(split=split) for i in range(2)}
        initial = split.federated(trainers["n0"].weights())
        history = Driver(InProcessFleet(trainers), fedavg(), initial, RunConfig(rounds=1, min_clients=2)).run()
        return history.rounds[0].metrics["bytes_down"] + history.rounds[0].metrics["bytes_up"]

    full, partial = run(Split()), run(Split(frozen=("0.*",)))
    # 4*8 + 8 frozen floats of 67: the traffic shrinks to 27/67
    assert partial == pytest.approx(full * 27 / 67)
