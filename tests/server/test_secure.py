"""Secure aggregation (SecAgg+) in the round driver, over the in-process, gRPC and Ray fleets."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest

from fedloom.client import secure_trainer as wire
from fedloom.client.secure_trainer import SecureTrainer, contribution
from fedloom.fleet import InProcessFleet
from fedloom.secagg import QuantSpec, quantize
from fedloom.server.driver import Driver, RunConfig
from fedloom.server.secure import degree, error_bound, secagg_fedavg, secure, threshold
from fedloom.strategies import fedavg, registry
from fedloom.strategies.dp import dp_fedavg
from fedloom.strategies.pipeline import Asynchronous, SecureAggregation
from fedloom.strategies.presets import fedavgm, fedmedian, fedtrimmedavg, krum
from fedloom.tensors import NamedTensors
from fedloom.types import Failure, FitRes, Instruction, Outcome

WEIGHTS = NamedTensors({"w": np.linspace(-1, 1, 600, dtype=np.float32).reshape(20, 30),
                        "b": np.arange(5, dtype=np.float64)})
N = 8  # complete graph: k = 7, threshold 5, so up to 3 of 8 may drop out
COMPLETE = SecureAggregation(neighbours=7)


class Step:
    """Adds a fixed, client-specific delta in (-0.05, 0.05) to every weight; claims ``n`` examples."""

    def __init__(self, client: int, n: int | None = None):
        rng = np.random.default_rng(client)
        self.deltas = {k: rng.uniform(-0.05, 0.05, a.shape) for k, a in WEIGHTS.items()}
        self.n = n if n is not None else 10 + 7 * client

    def fit(self, weights, config):
        return NamedTensors((k, (a + self.deltas[k]).astype(a.dtype)) for k, a in weights.items()), self.n, {}

    def evaluate(self, weights, config):
        return self.n, {"accuracy": 0.5}


def ids(n: int = N) -> list[str]:
    return [f"node-{i}" for i in range(n)]


def plain_mean(nodes: Sequence[str]) -> dict[str, np.ndarray]:
    """FedAvg's weighted mean of the nodes' updates, by hand in float64."""
    steps = {i: Step(int(i.split("-")[1])) for i in nodes}
    total = sum(s.n for s in steps.values())
    return {k: a.astype(np.float64) + sum(s.n * s.deltas[k] for s in steps.values()) / total
            for k, a in WEIGHTS.items()}


def secure_fleet(n: int = N) -> InProcessFleet:
    return InProcessFleet({i: SecureTrainer(Step(c)) for c, i in enumerate(ids(n))})


def run(fleet, strategy, rounds: int = 1, **config):
    return Driver(fleet, strategy, WEIGHTS, RunConfig(rounds=rounds, **config)).run()


def assert_close(got: NamedTensors, want: dict[str, np.ndarray], bound: float) -> None:
    for k, a in want.items():
        eps = np.finfo(got[k].dtype).eps * np.abs(a).max()  # the final cast to the model's dtype
        assert np.max(np.abs(got[k].astype(np.float64) - a)) <= bound + eps, k


def bound_for(settings: SecureAggregation, participants: int, survivors: Sequence[str]) -> float:
    total = sum(Step(int(i.split("-")[1])).n for i in survivors)
    return error_bound(settings, participants=participants, survivors=len(survivors), total_examples=total)


# ----------------------------------------------------------------- equality with FedAvg


@pytest.mark.parametrize("settings", [SecureAggregation(), COMPLETE, SecureAggregation(bits=24, clip=0.1)])
def test_secure_round_equals_fedavg_within_the_quantization_bound(settings: SecureAggregation) -> None:
    history = run(secure_fleet(), replace(secagg_fedavg(), secure=settings))
    record = history.rounds[0]
    assert record.num_results == N and not record.failures
    bound = bound_for(settings, N, ids())
    assert 0 < bound < 1e-3
    assert_close(history.weights, plain_mean(ids()), bound)
    plain = run(InProcessFleet({i: Step(c) for c, i in enumerate(ids())}), fedavg())
    assert_close(history.weights, {k: a.astype(np.float64) for k, a in plain.weights.items()}, bound)


def test_parameters_follow_the_settings() -> None:
    assert degree(SecureAggregation(), 100) == 14 and threshold(SecureAggregation(), 14) == 8
    assert degree(SecureAggregation(neighbours=50), 9) == 8 and threshold(SecureAggregation(), 8) == 5
    assert degree(SecureAggregation(neighbours=3), 9) == 2  # odd degree impossible on 9 nodes
    assert threshold(SecureAggregation(threshold_fraction=0.75), 7) == 7
    with pytest.raises(ValueError, match="threshold_fraction"):
        SecureAggregation(threshold_fraction=0.3)


def test_the_same_inputs_give_the_same_bits_despite_fresh_masks() -> None:
    first, second = (run(secure_fleet(), secagg_fedavg()).weights for _ in range(2))
    assert first.equal(second)


def test_contribution_is_the_clipped_weighted_delta_hand_computed() -> None:
    model = NamedTensors({"x": np.array([1.0, 2.0, 3.0], np.float32)})
    trained = NamedTensors({"x": np.array([1.5, 0.0, 3.25], np.float32)})
    x = contribution(model, trained, 250, clip=1.0, max_examples=1000)
    np.testing.assert_allclose(x, [0.5 * 0.25, -1.0 * 0.25, 0.25 * 0.25, 0.25])
    assert contribution(model, trained, 5000, clip=1.0, max_examples=1000)[-1] == 1.0  # capped at max_examples


def test_server_optimizer_post_step_runs_on_the_secure_mean() -> None:
    strategy = secure(fedavgm(server_lr=0.5, server_momentum=0.0))
    history = run(secure_fleet(), strategy)
    want = {k: a.astype(np.float64) + 0.5 * (m - a) for (k, a), m in zip(WEIGHTS.items(), plain_mean(ids()).values(),
                                                                          strict=True)}
    assert_close(history.weights, want, bound_for(strategy.secure, N, ids()))


# ----------------------------------------------------------------- dropouts


class DropFleet(InProcessFleet):
    """Fails ``drops[stage]`` nodes at that SecAgg stage, as a transport losing them would."""

    def __init__(self, trainers, drops: dict[str, set[str]], rounds: set[int] = frozenset({1})):
        super().__init__(trainers)
        self.drops, self.rounds = drops, rounds

    def run(self, instruction: Instruction, node_ids: Sequence[str], *, timeout: float) -> Iterator[Outcome]:
        lost = self.drops.get(str(instruction.config.get(wire.STAGE)), set()) if instruction.round in self.rounds \
            else set()
        yield from (Failure(i, "connection lost") for i in node_ids if i in lost)
        yield from super().run(instruction, [i for i in node_ids if i not in lost], timeout=timeout)


class FailAt:
    """A node whose trainer raises at one stage (e.g. out of memory while training at the mask stage)."""

    def __init__(self, inner: SecureTrainer, stage: str):
        self.inner, self.stage = inner, stage

    def fit(self, weights, config):
        if config.get(wire.STAGE) == self.stage:
            raise MemoryError("out of memory")
        return self.inner.fit(weights, config)

    def evaluate(self, weights, config):
        return self.inner.evaluate(weights, config)


STAGES = [wire.ADVERTISE, wire.SHARE, wire.MASK, wire.UNMASK]


@pytest.mark.parametrize("how", ["fleet", "trainer"])
@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_up_to_the_threshold_at_each_stage(stage: str, how: str) -> None:
    lost = {"node-1", "node-4", "node-6"}  # 3 of 8: 5 remain, the threshold
    trainers = {i: SecureTrainer(Step(c)) for c, i in enumerate(ids())}
    if how == "trainer":
        trainers = {i: FailAt(t, stage) if i in lost else t for i, t in trainers.items()}
        fleet = InProcessFleet(trainers)
    else:
        fleet = DropFleet(trainers, {stage: lost})
    history = run(fleet, replace(secagg_fedavg(), secure=COMPLETE))
    record = history.rounds[0]
    assert set(record.failures) == lost and all(f"secure {stage}" in r for r in record.failures.values())
    # a node lost at unmask had sent its masked input: its update is in the sum
    survivors = ids() if stage == wire.UNMASK else [i for i in ids() if i not in lost]
    assert record.num_results == len(survivors)
    assert_close(history.weights, plain_mean(survivors), bound_for(COMPLETE, N - (stage == wire.ADVERTISE) * 3,
                                                                   survivors))


@pytest.mark.parametrize("stage", STAGES)
def test_below_the_threshold_the_round_fails_cleanly_and_the_next_one_runs(stage: str) -> None:
    lost = {"node-0", "node-2", "node-5", "node-7"}  # 4 of 8: 4 remain, one short of the threshold
    trainers = {i: SecureTrainer(Step(c)) for c, i in enumerate(ids())}
    history = run(DropFleet(trainers, {stage: lost}), replace(secagg_fedavg(), secure=COMPLETE), rounds=2,
                  min_results=5)  # at the advertise stage, the graph would otherwise be planned for the 4 left
    failed, ok = history.rounds
    assert failed.num_results == 0 and "*" in failed.failures and "*secure" in failed.failures
    assert "InsufficientParticipants" in failed.failures["*secure"]
    assert ok.num_results == N and not ok.failures  # the kept model moved on in round 2 only
    assert_close(history.weights, plain_mean(ids()), bound_for(COMPLETE, N, ids()))


def test_secagg_plus_neighbourhoods_survive_dropouts() -> None:
    n, settings = 12, SecureAggregation()  # k = 8, threshold 5: a neighbourhood of 9 may lose 4
    nodes = ids(n)
    lost = {"node-3", "node-9"}
    trainers = {i: SecureTrainer(Step(c)) for c, i in enumerate(nodes)}
    history = run(DropFleet(trainers, {wire.MASK: lost}), secagg_fedavg())
    survivors = [i for i in nodes if i not in lost]
    assert history.rounds[0].num_results == n - 2
    assert_close(history.weights, plain_mean(survivors), bound_for(settings, n, survivors))


# ----------------------------------------------------------------- what the coordinator sees


class Recording(InProcessFleet):
    """Keeps every FitRes that reaches the driver."""

    def __init__(self, trainers):
        super().__init__(trainers)
        self.seen: list[tuple[str, FitRes]] = []

    def run(self, instruction, node_ids, *, timeout):
        for outcome in super().run(instruction, node_ids, timeout=timeout):
            if isinstance(outcome, FitRes):
                self.seen.append((str(instruction.config.get(wire.STAGE)), outcome))
            yield outcome


def test_the_coordinator_sees_only_masked_updates() -> None:
    fleet = Recording({i: SecureTrainer(Step(c)) for c, i in enumerate(ids())})
    run(fleet, secagg_fedavg())
    assert [stage for stage, _ in fleet.seen] == [s for s in STAGES for _ in range(N)]
    spec = QuantSpec(bits=32, clip=1.0, max_summands=N)
    for stage, res in fleet.seen:
        step = Step(int(res.node_id.split("-")[1]))
        trained, n, _ = step.fit(WEIGHTS, {})
        raw = b"".join(a.tobytes() for a in res.weights.values())
        for k, a in trained.items():
            assert not np.array_equal(res.weights.get(k), a)
            assert a.tobytes()[:64] not in raw  # not even a slice of the plain update travels
        assert res.num_examples == 1 and not res.metrics  # no example count or metric in the clear
        if stage == wire.MASK:
            masked = np.frombuffer(wire.unpack_reply(res.weights), "<u4")
            plain = quantize(contribution(WEIGHTS, trained, n, clip=1.0, max_examples=10_000), spec)
            assert np.mean(masked == plain) < 0.01
            u = masked / 2.0**32
            assert abs(u.mean() - 0.5) < 0.05 and 0.2 < u.std() < 0.4  # uniform: mean 1/2, sd 0.289


def test_a_secure_node_refuses_a_plain_fit() -> None:
    history = run(secure_fleet(), fedavg())
    assert history.rounds[0].num_results == 0
    assert all("PermissionError" in r for k, r in history.rounds[0].failures.items() if k != "*")
    assert history.weights.equal(WEIGHTS)


# ----------------------------------------------------------------- refusals and plumbing


@pytest.mark.parametrize("strategy, words", [
    (krum(), "robust"), (fedmedian(), "robust"), (fedtrimmedavg(), "robust"),
    (dp_fedavg(noise_multiplier=1.0, clip_norm=1.0, clients_per_round=4, total_clients=8), "individual updates"),
])
def test_strategies_that_need_individual_updates_are_refused(strategy, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Driver(secure_fleet(), replace(strategy, secure=SecureAggregation()), WEIGHTS, RunConfig(rounds=1))


def test_secure_and_asynchronous_or_reduced_fleets_are_refused() -> None:
    with pytest.raises(ValueError, match="synchronous"):
        replace(secagg_fedavg(), asynchronous=Asynchronous())
    fleet = secure_fleet()
    fleet.reduce_linear = True  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="reduce_linear"):
        Driver(fleet, secagg_fedavg(), WEIGHTS, RunConfig(rounds=1))


def test_the_preset_is_selectable_by_name() -> None:
    strategy = registry.build("secagg_fedavg", {"clip": "0.5", "neighbours": "4"})
    assert strategy.secure == SecureAggregation(clip=0.5, neighbours=4)


def test_replies_carry_bytes_in_the_shape_of_their_instruction() -> None:
    template = NamedTensors({"f": np.zeros((3, 2), np.float32), "m": np.zeros(4, np.bool_),
                             "h": np.zeros(5, ml_dtypes.bfloat16), "i": np.zeros(2, np.int64)})
    assert wire.capacity(template) == 24 + 10 + 16 - 8
    payload = bytes(range(42))
    reply = wire.pack_reply(template, payload)
    assert reply.spec() == template.spec() and not reply["m"].any()
    assert wire.unpack_reply(reply) == payload
    with pytest.raises(ValueError, match="does not fit"):
        wire.pack_reply(template, bytes(43))


# ----------------------------------------------------------------- real transports


def test_one_secure_round_over_grpc_equals_fedavg() -> None:
    from fedloom.client import node as node_loop
    from fedloom.server.grpc_fleet import GrpcFleet

    n = 5
    fleet = GrpcFleet(heartbeat_interval=0.2, heartbeat_timeout=1.5, poll_wait=0.2)
    fleet.start("127.0.0.1:0")
    threads = [threading.Thread(target=node_loop.run, args=(SecureTrainer(Step(c)), f"127.0.0.1:{fleet.port}"),
                                kwargs={"node_id": i, "connect_timeout": 10}, daemon=True)
               for c, i in enumerate(ids(n))]
    for t in threads:
        t.start()
    try:
        history = Driver(fleet, secagg_fedavg(), WEIGHTS, RunConfig(rounds=1, min_clients=n, round_timeout=30,
                                                                     wait_timeout=30)).run()
    finally:
        fleet.close()
        for t in threads:
            t.join(timeout=15)
    assert not any(t.is_alive() for t in threads)
    assert history.rounds[0].num_results == n and not history.rounds[0].failures
    assert_close(history.weights, plain_mean(ids(n)), bound_for(SecureAggregation(), n, ids(n)))


def secure_step(client: int) -> SecureTrainer:
    return SecureTrainer(Step(client))


@pytest.mark.slow
def test_one_secure_round_over_ray_equals_fedavg() -> None:
    pytest.importorskip("ray")
    from ray import cloudpickle

    from fedloom.simulations.ray_fleet import RayFleet

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    n = 6
    with RayFleet(secure_step, num_clients=n, num_actors=2) as fleet:
        history = Driver(fleet, secagg_fedavg(), WEIGHTS, RunConfig(rounds=1, round_timeout=120)).run()
    assert history.rounds[0].num_results == n and not history.rounds[0].failures
    assert_close(history.weights, plain_mean([f"node-{i}" for i in range(n)]), bound_for(SecureAggregation(), n,
                                                                                          ids(n)))
