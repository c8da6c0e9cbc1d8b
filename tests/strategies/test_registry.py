"""Strategies by name from CLI strings and config values."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom import Driver, InProcessFleet, NamedTensors, RunConfig
from fedloom.strategies import registry


def test_every_issue_strategy_is_selectable() -> None:
    names = set(registry.available())
    assert {"fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fedmedian",
            "fedtrimmedavg", "krum", "multikrum", "bulyan", "dp_fedavg", "dp_fedavg_adaptive", "fedbuff"} <= names


@pytest.mark.parametrize(("name", "params", "check"), [
    ("fedprox", {"mu": "0.1"}, lambda s: s.fit_config == {"mu": 0.1}),
    ("fedbuff", {"buffer_size": "3"}, lambda s: s.asynchronous.buffer_size == 3),
    ("fedtrimmedavg", {"beta": 0.1}, lambda s: s.name == "fedtrimmedavg"),
    ("multikrum", {"num_malicious": "1", "weighted": "true"}, lambda s: s.name == "multikrum"),
])
def test_build_converts_strings_by_default_type(name, params, check) -> None:
    assert check(registry.build(name, params))


@pytest.mark.parametrize(("name", "params", "message"), [
    ("nope", {}, "unknown strategy 'nope'"),
    ("fedavg", {"mu": "1"}, "has no parameter mu"),
    ("fedprox", {}, "needs mu"),
    ("fedbuff", {"buffer_size": "three"}, "not a valid int"),
    ("multikrum", {"weighted": "maybe"}, "not a valid bool"),
])
def test_build_refuses_bad_input_clearly(name, params, message) -> None:
    with pytest.raises(ValueError, match=message):
        registry.build(name, params)


def test_parse_params() -> None:
    assert registry.parse_params(["mu=0.1", "buffer-size = 4"]) == {"mu": "0.1", "buffer_size": "4"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        registry.parse_params(["mu"])


class Scaled:
    def __init__(self, factor: float):
        self.factor = factor

    def fit(self, weights, config):
        return NamedTensors({"w": weights["w"] + self.factor}), 1, {}

    def evaluate(self, weights, config):
        return 1, {}


def test_adaptive_dp_runs_in_the_driver_and_reports_privacy() -> None:
    strategy = registry.build("dp_fedavg_adaptive", {"noise_multiplier": "0.3", "initial_clip_norm": "0.1",
                                                     "clients_per_round": "5", "total_clients": "5", "seed": "3"})
    fleet = InProcessFleet({f"n{i}": Scaled(1.0) for i in range(5)})
    history = Driver(fleet, strategy, NamedTensors({"w": np.zeros(4, np.float32)}), RunConfig(rounds=4)).run()
    eps = history.metric("dp_epsilon")
    clip = history.metric("dp_clip_norm")
    assert len(eps) == 4 and eps == sorted(eps) and eps[0] > 0
    assert clip[-1] > clip[0]  # every update norm (2.0) exceeds the clip, so the norm grows toward them
