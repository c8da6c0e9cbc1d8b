"""Presets: registered, keyword-only, built from the public pieces, and runnable through the Driver."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from fedloom.fleet import InProcessFleet
from fedloom.server.driver import Driver, RunConfig
from fedloom.strategies import PRESETS, Rejected, RoundInfo, Update, weighted_mean
from fedloom.strategies.robust import median
from fedloom.strategies.server_opt import adam, server_momentum
from fedloom.tensors import NamedTensors

EXPECTED = {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum",
            "multikrum", "bulyan"}
ROBUST = {"fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"}


def test_all_presets_are_registered():
    assert EXPECTED <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_shape(name):
    factory = PRESETS[name]
    params = inspect.signature(factory).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not p.empty for p in params)
    strategy = factory()
    assert strategy.name == name
    assert len(strategy.pre) == 2
    assert strategy.aggregate.linear is (name not in ROBUST)
    assert (strategy.post is None) == (name in ROBUST or name == "fedavg")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_presets_reject_non_finite_updates(name):
    strategy = PRESETS[name]()
    g = NamedTensors({"w": np.zeros(2, np.float32)})
    state = strategy.init(g)
    bad = Update("x", NamedTensors({"w": np.array([np.nan, 0.0], np.float32)}), 1)
    with pytest.raises(Rejected, match="non-finite"):
        strategy.preprocess(state, bad, g)


def _finish(strategy, state, g, updates, rnd):
    acc = strategy.aggregate.begin(g)
    for u in updates:
        acc = strategy.aggregate.fold(acc, strategy.preprocess(state, u, g))
    return strategy.finish(state, g, acc, round=rnd)


@pytest.mark.parametrize(
    ("name", "kwargs", "aggregator", "post"),
    [
        ("fedavgm", {"server_lr": 0.5, "server_momentum": 0.8}, weighted_mean(),
         server_momentum(lr=0.5, momentum=0.8)),
        ("fedadam", {"eta": 0.05}, weighted_mean(), adam(lr=0.05)),
        ("fedmedian", {}, median(), None),
    ],
)
def test_preset_equals_its_pieces_by_hand(name, kwargs, aggregator, post):
    rng = np.random.default_rng(5)
    g = NamedTensors({"w": rng.normal(size=(2, 3)).astype(np.float32)})
    strategy = PRESETS[name](**kwargs)
    state = strategy.init(g)
    post_state = None if post is None else post.init(g)
    g_hand = g
    for rnd in (1, 2):
        ups = [Update(f"n{i}", NamedTensors({"w": (g["w"] + rng.normal(size=(2, 3))).astype(np.float32)}), i + 1)
               for i in range(3)]
        g = _finish(strategy, state, g, ups, rnd)
        acc = aggregator.begin(g_hand)
        for u in ups:
            acc = aggregator.fold(acc, u)
        agg = aggregator.result(acc)[0]
        if post is None:
            g_hand = agg
        else:
            g_hand, post_state = post.apply(post_state, g_hand, agg, RoundInfo(rnd, 3, 6.0))
        assert g.equal(g_hand)


class _ConstantTrainer:
    """Returns fixed weights: honest ones near 1.0, a Byzantine one at 1000."""

    def __init__(self, value: float):
        self.value = value

    def fit(self, weights, config):
        return NamedTensors({k: np.full_like(a, self.value) for k, a in weights.items()}), 10, {}

    def evaluate(self, weights, config):
        return 10, {}


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_presets_through_the_driver_ignore_one_byzantine_node(name):
    values = {"a": 1.0, "b": 1.1, "c": 0.9, "d": 1.05, "e": 0.95, "f": 1.02, "z": 1000.0}
    fleet = InProcessFleet({k: _ConstantTrainer(v) for k, v in values.items()})
    kwargs = {} if name in ("fedmedian", "fedtrimmedavg") else {"num_malicious": 1}
    initial = NamedTensors({"w": np.zeros(3, np.float32), "steps": np.zeros((), np.int64)})
    history = Driver(fleet, PRESETS[name](**kwargs), initial, RunConfig(rounds=2, min_clients=7)).run()
    assert 0.9 <= float(history.weights["w"][0]) <= 1.1
    assert history.weights["steps"].dtype == np.int64
    assert all(r.num_results == 7 for r in history.rounds)
