"""Differential tests: fedloom's presets against Flower's strategies (flwr 1.41) on identical inputs.

Each test feeds the same client weights and example counts to both, for three
rounds where the server optimizer's state matters, and compares the new global
weights to float tolerance. Deliberate differences (docs/robust.md):

- Flower's FedAdam always bias-corrects, with the exponent ``server_round + 1``
  (one step ahead of Kingma & Ba); fedloom follows Reddi et al. (no correction)
  unless ``bias_correction=True``, which counts steps from 1. So Flower is given
  ``server_round = t - 1`` here to compare the same formula.
- Flower's Multi-Krum weights its mean by ``num_examples``; fedloom's is
  unweighted as in Blanchard et al. unless ``weighted=True``.
- Flower's FedAvgM defaults to ``server_momentum=0.0`` (plain FedAvg); fedloom's
  ``fedavgm`` defaults to 0.9. Both are given the same values here.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import strategy as fl
from flwr.server.strategy.aggregate import aggregate, aggregate_bulyan, aggregate_krum

from fedloom.strategies import PRESETS, Strategy, Update
from fedloom.tensors import NamedTensors

SHAPES = {"conv.weight": (3, 2, 2), "conv.bias": (3,), "fc.weight": (4, 3)}
COUNTS = [30, 5, 12, 50, 7, 21, 9, 14, 3, 40, 11]
TOL = {"rtol": 2e-5, "atol": 1e-6}


def _initial(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES.values()]


def _clients(rng: np.random.Generator, global_arrays: list[np.ndarray], n: int) -> list[list[np.ndarray]]:
    """Client weights near the global ones, one far-off client among them (index 3)."""
    out = []
    for i in range(n):
        scale = 5.0 if i == 3 else 0.1
        out.append([(g + scale * rng.normal(size=g.shape)).astype(np.float32) for g in global_arrays])
    return out


def _fedloom_round(strategy: Strategy, state: dict, global_arrays, clients, rnd: int) -> list[np.ndarray]:
    g = NamedTensors(zip(SHAPES, global_arrays, strict=True))
    acc = strategy.aggregate.begin(g)
    for i, arrays in enumerate(clients):
        update = Update(f"node{i}", NamedTensors(zip(SHAPES, arrays, strict=True)), COUNTS[i])
        acc = strategy.aggregate.fold(acc, strategy.preprocess(state, update, g))
    new = strategy.finish(state, g, acc, round=rnd)
    assert new is not None
    return list(new.values())


def _flower_results(clients) -> list:
    # aggregate_fit never looks at the ClientProxy, so None stands in for it.
    ok = Status(Code.OK, "")
    return [(None, FitRes(ok, ndarrays_to_parameters(a), COUNTS[i], {})) for i, a in enumerate(clients)]


def _compare(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), **TOL)


CASES = {
    # name: (fedloom preset kwargs, Flower strategy factory, Flower server_round for fedloom round r, clients)
    "fedavg": ({}, lambda init: fl.FedAvg(), lambda r: r, 5),
    "fedavgm": ({"server_lr": 0.7, "server_momentum": 0.9},
                lambda init: fl.FedAvgM(initial_parameters=init, server_learning_rate=0.7, server_momentum=0.9),
                lambda r: r, 5),
    "fedadam": ({"bias_correction": True}, lambda init: fl.FedAdam(initial_parameters=init), lambda r: r - 1, 5),
    "fedyogi": ({}, lambda init: fl.FedYogi(initial_parameters=init), lambda r: r, 5),
    "fedadagrad": ({}, lambda init: fl.FedAdagrad(initial_parameters=init), lambda r: r, 5),
    "fedmedian": ({}, lambda init: fl.FedMedian(), lambda r: r, 6),
    "fedtrimmedavg": ({"beta": 0.2}, lambda init: fl.FedTrimmedAvg(beta=0.2), lambda r: r, 7),
    "krum": ({"num_malicious": 1}, lambda init: fl.Krum(num_malicious_clients=1), lambda r: r, 6),
    "multikrum": ({"num_malicious": 1, "num_selected": 3, "weighted": True},
                  lambda init: fl.Krum(num_malicious_clients=1, num_clients_to_keep=3), lambda r: r, 6),
    "bulyan": ({"num_malicious": 1}, lambda init: fl.Bulyan(num_malicious_clients=1, to_keep=0), lambda r: r, 7),
}


@pytest.mark.parametrize("name", list(CASES))
def test_three_rounds_match_flower(name):
    kwargs, make_flower, flower_round, n = CASES[name]
    rng = np.random.default_rng(42)
    initial = _initial(rng)
    ours_strategy = PRESETS[name](**kwargs)
    state = ours_strategy.init(NamedTensors(zip(SHAPES, initial, strict=True)))
    theirs = make_flower(ndarrays_to_parameters(initial))
    ours_w, theirs_w = initial, initial
    for rnd in (1, 2, 3):
        clients = _clients(rng, ours_w, n)
        ours_w = _fedloom_round(ours_strategy, state, ours_w, clients, rnd)
        params, _ = theirs.aggregate_fit(flower_round(rnd), _flower_results(clients), [])
        theirs_w = parameters_to_ndarrays(params)
        _compare(ours_w, theirs_w)
        assert not np.allclose(ours_w[0], initial[0])  # the model did move


def test_fedavg_matches_flower_aggregate_function():
    rng = np.random.default_rng(3)
    initial = _initial(rng)
    clients = _clients(rng, initial, 5)
    ours = _fedloom_round(PRESETS["fedavg"](), PRESETS["fedavg"]().init({}), initial, clients, 1)
    _compare(ours, aggregate([(c, COUNTS[i]) for i, c in enumerate(clients)]))


@pytest.mark.parametrize("to_keep", [0, 2, 4])
def test_krum_matches_flower_aggregate_krum(to_keep):
    rng = np.random.default_rng(to_keep)
    initial = _initial(rng)
    clients = _clients(rng, initial, 7)
    strategy = PRESETS["multikrum"](num_malicious=2, num_selected=max(to_keep, 1), weighted=True)
    ours = _fedloom_round(strategy, strategy.init({}), initial, clients, 1)
    theirs = aggregate_krum([(c, COUNTS[i]) for i, c in enumerate(clients)], num_malicious=2, to_keep=to_keep)
    _compare(ours, theirs)


def test_bulyan_matches_flower_aggregate_bulyan_with_two_malicious():
    rng = np.random.default_rng(7)
    initial = _initial(rng)
    clients = _clients(rng, initial, 11)  # 4f + 3 = 11
    strategy = PRESETS["bulyan"](num_malicious=2)
    ours = _fedloom_round(strategy, strategy.init({}), initial, clients, 1)
    results = [(c, COUNTS[i]) for i, c in enumerate(clients)]
    _compare(ours, aggregate_bulyan(results, 2, aggregate_krum, to_keep=0))
