"""The Byzantine example, quick variant: x100-scaled updates wreck FedAvg, the median shrugs them off."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.tensors import NamedTensors


@pytest.fixture(scope="module")
def byz(load_example):
    return load_example("byzantine")


class _Fixed:
    def fit(self, weights, config):
        return NamedTensors({k: a + 1 for k, a in weights.items()}), 5, {"loss": 1.0}

    def evaluate(self, weights, config):
        return 5, {}


def test_byzantine_wrapper_corrupts_only_the_float_update(byz):
    g = NamedTensors({"w": np.full(2, 3.0, np.float32), "n": np.array([4], np.int64)})
    # honest update: +1 everywhere; the int tensor passes through as trained
    flipped, n, _ = byz.Byzantine(_Fixed(), byz.ATTACKS["signflip"]).fit(g, {})
    scaled, _, _ = byz.Byzantine(_Fixed(), byz.ATTACKS["scale"]).fit(g, {})
    assert flipped["w"].tolist() == [2.0, 2.0] and scaled["w"].tolist() == [103.0, 103.0]
    assert flipped["n"].tolist() == [5] and flipped["w"].dtype == np.float32 and n == 5


def test_quick_run_fedavg_degrades_median_holds(byz, capsys):
    results = byz.main(["--quick"])
    clean = results["fedavg"]["clean"]
    assert clean > 0.3  # it learns something in 3 rounds
    assert results["fedavg"]["scale"] < 0.2  # one x100 client out of 7 wrecks the mean
    assert results["fedmedian"]["scale"] > clean - 0.1
    assert "| fedmedian |" in capsys.readouterr().out
