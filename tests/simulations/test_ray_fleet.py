"""The Ray fleet against a real local Ray, started once for the module and stopped by the last test."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from typer.testing import CliRunner  # noqa: E402

from fedloom import workloads  # noqa: E402
from fedloom.cli import app  # noqa: E402
from fedloom.rundir import load_model  # noqa: E402
from fedloom.simulations import simulate  # noqa: E402
from fedloom.simulations.ray_fleet import RayFleet, reduce_fit  # noqa: E402
from fedloom.tensors import NamedTensors  # noqa: E402
from fedloom.types import EvalRes, Failure, FitRes, Instruction  # noqa: E402

pytestmark = pytest.mark.slow

# Trainers defined here travel to the actors by value: the workers cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

WORK = workloads.digits(8, scheme="iid", seed=0)
FIT = {"epochs": 1, "lr": 0.05, "batch_size": 32}


class Raising:
    def fit(self, weights, config):
        raise RuntimeError("boom")

    def evaluate(self, weights, config):
        raise RuntimeError("boom")


class Dying:
    def fit(self, weights, config):
        os._exit(3)

    def evaluate(self, weights, config):
        os._exit(3)


class Counting:
    """Reports how many times the factory ran in this actor, to observe caching."""

    built = 0

    def __init__(self, client: int):
        Counting.built += 1
        self.client = client

    def fit(self, weights, config):
        return weights, 1, {"built": float(Counting.built), "client": float(self.client)}

    def evaluate(self, weights, config):
        return 1, {}


def digits_trainer(client: int):
    """Clients 0..7 train digits; client 8 raises."""
    return Raising() if client == 8 else WORK.trainer(client)


class Stuck:
    def fit(self, weights, config):
        threading.Event().wait(120)  # stands for a client far slower than the round's deadline
        return weights, 1, {}

    def evaluate(self, weights, config):
        return 1, {}


def dying_at_5(client: int):
    """Client 5 kills its actor's process; client 7 overruns any short deadline."""
    return Dying() if client == 5 else Stuck() if client == 7 else WORK.trainer(client)


@pytest.fixture(scope="module")
def owner():
    """The module's shared fleet: it starts Ray (and stops it on close); the other fleets join that Ray."""
    if ray.is_initialized():
        pytest.skip("Ray already running in this process")
    fleet = RayFleet(digits_trainer, num_clients=9, num_actors=2, num_cpus=0.5)  # leaves a CPU for the others
    fleet.wait_for_nodes(9, 120)
    yield fleet
    fleet.close()


def run(fleet, *, rounds=2, fraction=0.5, **kw):
    return simulate(digits_trainer, num_clients=9, rounds=rounds, initial_weights=WORK.initial_weights(0),
                    fraction=fraction, seed=7, fit_config=FIT, fleet=fleet, round_timeout=120, **kw)


@pytest.fixture
def one_thread():
    """Actors run torch on one thread; the in-process fleet must too for the same bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ray_matches_inprocess_bitwise_and_repeats(owner, one_thread):
    first = run(owner, rounds=3)
    again = run(owner, rounds=3)
    local = run("inprocess", rounds=3)
    assert first.weights.equal(again.weights)
    assert first.weights.equal(local.weights)
    assert not first.weights.equal(WORK.initial_weights(0))
    assert [r.metrics for r in first.rounds] == [r.metrics for r in local.rounds]
    assert [r.failures for r in first.rounds] == [r.failures for r in local.rounds]


def test_one_failing_client_is_a_recorded_failure(owner):
    history = run(owner, fraction=1.0)
    for record in history.rounds:
        assert set(record.failures) == {"8"}
        assert "RuntimeError: boom" in record.failures["8"]
        assert record.num_results == 8


def test_dead_actor_fails_its_clients_and_is_replaced(owner):
    fleet = RayFleet(dying_at_5, num_clients=8, num_actors=2, num_cpus=0.25)
    try:
        fleet.wait_for_nodes(8, 60)
        weights = WORK.initial_weights(0)
        outcomes = list(fleet.run(Instruction("fit", 1, weights, FIT), ["1", "2", "5", "6"], timeout=60))
        by_id = {o.node_id: o for o in outcomes}
        assert [o.node_id for o in outcomes] == ["1", "2", "5", "6"]  # ordered like the request
        # client 5 shares actor 1 with client 1: both fail; actor 0 (clients 2, 6) is unaffected
        assert isinstance(by_id["1"], Failure) and isinstance(by_id["5"], Failure)
        assert "actor failed" in by_id["5"].reason
        assert isinstance(by_id["2"], FitRes) and isinstance(by_id["6"], FitRes)
        again = list(fleet.run(Instruction("fit", 2, weights, FIT), ["1", "3"], timeout=60))
        assert all(isinstance(o, FitRes) for o in again)  # a fresh actor took over
        late = list(fleet.run(Instruction("fit", 3, weights, FIT), ["2", "3", "7"], timeout=3))
        assert isinstance(late[0], FitRes)  # actor 0 was on time
        assert all(isinstance(o, Failure) and o.reason.startswith("late") for o in late[1:])
        after = list(fleet.run(Instruction("fit", 4, weights, FIT), ["3"], timeout=60))
        assert isinstance(after[0], FitRes)  # the stuck actor was replaced, not queued behind
    finally:
        fleet.close()
    assert ray.is_initialized()  # a joined fleet leaves Ray running


def test_trainers_are_cached_with_an_lru_bound(owner):
    fleet = RayFleet(Counting, num_clients=4, num_actors=1, max_cached_clients=2, num_cpus=0.25)
    try:
        weights = WORK.initial_weights(0)

        def built(ids, rnd):
            outs = list(fleet.run(Instruction("fit", rnd, weights, {}), ids, timeout=60))
            return [int(o.metrics["built"]) for o in outs]

        assert built(["0", "1"], 1) == [1, 2]
        assert built(["0", "1"], 2) == [2, 2]  # kept across rounds
        assert built(["2"], 3) == [3]  # evicts 0, the least recently used
        assert built(["1", "0"], 4) == [3, 4]  # 1 still cached, 0 rebuilt
    finally:
        fleet.close()


def test_unknown_nodes_and_evaluate(owner):
    weights = WORK.initial_weights(0)
    outs = list(owner.run(Instruction("evaluate", 1, weights, {}), ["0", "x", "9", "01"], timeout=60))
    assert [o.node_id for o in outs] == ["0", "x", "9", "01"]
    assert isinstance(outs[0], Failure) and "no evaluation data" in outs[0].reason
    assert all(o.reason == "unknown node" for o in outs[1:])


def test_reduce_linear_gives_one_result_per_actor_with_the_same_mean(owner):
    weights = WORK.initial_weights(0)
    ids = [str(i) for i in range(9)]

    def mean(outcomes):
        fits = [o for o in outcomes if isinstance(o, FitRes)]
        total = sum(f.num_examples for f in fits)
        return {n: sum(f.weights[n].astype(np.float64) * f.num_examples for f in fits) / total for n in weights}, fits

    exact, per_client = mean(owner.run(Instruction("fit", 1, weights, {**FIT, "seed": 1}), ids, timeout=60))
    owner.reduce_linear = True
    try:
        outcomes = list(owner.run(Instruction("fit", 1, weights, {**FIT, "seed": 1}), ids, timeout=60))
    finally:
        owner.reduce_linear = False
    reduced, per_actor = mean(outcomes)
    assert len(per_client) == 8
    assert sorted(f.node_id for f in per_actor) == ["0+2+4+6", "1+3+5+7"]  # one per actor, naming its clients
    assert sum(f.num_examples for f in per_actor) == sum(f.num_examples for f in per_client)
    assert [o.node_id for o in outcomes if isinstance(o, Failure)] == ["8"]
    for name in weights:
        np.testing.assert_allclose(reduced[name], exact[name], rtol=1e-5, atol=1e-6)


def test_reduce_fit_is_the_weighted_mean():
    a = FitRes("0", NamedTensors({"w": np.array([1.0, 2.0], np.float32)}), 1, {"loss": 1.0})
    b = FitRes("1", NamedTensors({"w": np.array([4.0, 8.0], np.float32)}), 3, {"loss": 3.0})
    out = reduce_fit([a, Failure("2", "x"), b, EvalRes("3", 1)])
    fit = out[0]
    assert fit.num_examples == 4 and fit.metrics == {"loss": 2.5}
    np.testing.assert_array_equal(fit.weights["w"], np.array([3.25, 6.5], np.float32))  # (1+12)/4, (2+24)/4
    assert fit.weights["w"].dtype == np.float32
    assert fit.node_id == "0+1"
    assert [o.node_id for o in out[1:]] == ["2", "3"]


def test_cli_simulate_on_ray_end_to_end(owner, tmp_path: Path):
    result = CliRunner().invoke(app, ["simulate", "--num-clients", "10", "--rounds", "2", "--epochs", "1",
                                      "--fraction", "0.5", "--num-cpus", "1", "--run-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"round": 2' in lines[1] and '"accuracy"' in lines[1]
    model = load_model(tmp_path / "model.safetensors")
    assert list(model) == list(WORK.initial_weights(0))


def test_close_stops_the_ray_it_started(owner):
    assert ray.is_initialized()
    owner.close()
    assert not ray.is_initialized()
    owner.close()  # idempotent
