"""Streaming aggregation over real loopback gRPC: uploads folded tensor by tensor as they arrive."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_grpc import WEIGHTS, Peer, Shift  # the test directories are not packages

from fedloom.client import node as node_loop
from fedloom.codec import End, Header, encode
from fedloom.server.driver import Driver, RunConfig
from fedloom.server.grpc_fleet import GrpcFleet
from fedloom.strategies import fedavg
from fedloom.strategies.streaming import StreamingFold
from fedloom.tensors import NamedTensors
from fedloom.types import Failure, FitRes, Instruction


class Poison(Shift):
    """Shifts like ``Shift`` but puts a NaN into the tensor ``name``."""

    def __init__(self, name: str, n: int = 10):
        super().__init__(1.0, n)
        self.name = name

    def fit(self, weights, config):
        out, n, metrics = super().fit(weights, config)
        bad = out[self.name].copy()
        bad.reshape(-1)[-1] = np.nan
        return NamedTensors({k: bad if k == self.name else v for k, v in out.items()}), n, metrics


def _run(fleet: GrpcFleet, ids: list[str]) -> tuple[StreamingFold, list, object]:
    strategy = fedavg(precision="native")
    stream = StreamingFold(strategy, strategy.aggregate.begin(WEIGHTS))
    outcomes = list(fleet.run(Instruction("fit", 1, WEIGHTS, {"seed": 0}), ids, timeout=20, fold=stream))
    return stream, outcomes, strategy


def test_a_streamed_upload_arrives_folded_and_equals_the_decoded_one(fleet, nodes) -> None:
    nodes("a", Shift(1.0, 1))
    nodes("b", Shift(3.0, 3))
    assert fleet.wait_for_nodes(2, 10) == ["a", "b"]
    stream, outcomes, strategy = _run(fleet, ["a", "b"])
    assert all(isinstance(o, FitRes) and o.folded and len(o.weights) == 0 for o in outcomes), outcomes
    for o in outcomes:
        stream.commit(o.node_id, o.num_examples)
    mean, count, total = strategy.aggregate.take(stream.close())
    assert (count, total) == (2, 4)
    assert mean.equal(WEIGHTS.map(lambda a: a + np.float32(2.5)))  # (1*1 + 3*3) / 4


def test_a_poisoned_tensor_is_refused_midway_and_the_kept_tensors_are_named(fleet, nodes) -> None:
    nodes("good", Shift(1.0, 1))
    nodes("bad", Poison("big"))  # "w" comes first and is folded before "big" is refused
    assert fleet.wait_for_nodes(2, 10) == ["bad", "good"]
    stream, outcomes, _ = _run(fleet, ["good", "bad"])
    by_node = {o.node_id: o for o in outcomes}
    assert isinstance(by_node["good"], FitRes) and by_node["good"].folded
    assert isinstance(by_node["bad"], Failure) and "rejected: non-finite values in big" in by_node["bad"].reason
    stream.commit("good", 1)
    stream.close()
    assert stream.partial() == {"bad": 1}


def test_odd_chunks_are_gathered_and_still_folded(fleet) -> None:
    peer = Peer(fleet.port)
    strategy = fedavg()
    stream = StreamingFold(strategy, strategy.aggregate.begin(WEIGHTS))
    outcomes: list = []
    thread = threading.Thread(target=lambda: outcomes.extend(
        fleet.run(Instruction("fit", 1, WEIGHTS, {}), ["evil"], timeout=20, fold=stream)))
    thread.start()
    peer.pull()
    shifted = WEIGHTS.map(lambda a: a + 1)
    frames = [f if isinstance(f, Header | End) else bytes(f) for f in encode(shifted, chunk_size=65_537)]
    assert peer.submit(*frames).accepted  # chunks that split float32 elements
    thread.join(20)
    assert len(outcomes) == 1 and outcomes[0].folded, outcomes
    stream.commit("evil", outcomes[0].num_examples)
    mean, _, _ = strategy.aggregate.take(stream.close())
    assert mean.equal(shifted)


def test_the_driver_streams_and_reports_tensors_kept_from_a_failed_upload(fleet, nodes) -> None:
    nodes("good", Shift(2.0, 1))
    nodes("bad", Poison("big", 1))
    config = RunConfig(rounds=1, min_clients=2, round_timeout=30, wait_timeout=10)
    record = Driver(fleet, fedavg(precision="native"), WEIGHTS, config).run_round()
    assert record.num_results == 1 and set(record.failures) == {"bad"}
    assert "non-finite values in big" in record.failures["bad"]
    assert "1 of 2 tensors were already folded" in record.failures["bad"]


def test_streaming_can_be_turned_off() -> None:
    plain = GrpcFleet(heartbeat_interval=0.2, heartbeat_timeout=1.5, poll_wait=0.2, stream_uploads=False)
    plain.start("127.0.0.1:0")
    try:
        with pytest.raises(ValueError, match="stream_uploads=False"):
            next(iter(plain.run(Instruction("fit", 1, WEIGHTS, {}), [], timeout=1,
                                fold=StreamingFold(fedavg(), fedavg().aggregate.begin(WEIGHTS)))))
        thread = threading.Thread(target=node_loop.run, args=(Shift(1.0, 1), f"127.0.0.1:{plain.port}"),
                                  kwargs={"node_id": "a", "connect_timeout": 10}, daemon=True)
        thread.start()
        config = RunConfig(rounds=1, min_clients=1, round_timeout=30, wait_timeout=10)
        history = Driver(plain, fedavg(), WEIGHTS, config).run()
        assert history.rounds[0].num_results == 1 and history.weights.equal(WEIGHTS.map(lambda a: a + 1))
    finally:
        plain.close()
    thread.join(15)


def test_an_upload_window_below_http2s_default_is_refused() -> None:
    with pytest.raises(ValueError, match="upload_window"):
        GrpcFleet(upload_window=1024)


def test_a_decoded_update_is_not_kept_while_the_fleet_waits_for_the_next() -> None:
    import gc
    import weakref

    plain = GrpcFleet(heartbeat_interval=0.2, heartbeat_timeout=1.5, poll_wait=0.2, stream_uploads=False)
    plain.start("127.0.0.1:0")
    gate = threading.Event()
    threads = [threading.Thread(target=node_loop.run, args=(trainer, f"127.0.0.1:{plain.port}"),
                                kwargs={"node_id": node_id, "connect_timeout": 10}, daemon=True)
               for node_id, trainer in {"fast": Shift(1.0, 1), "slow": Shift(2.0, 1, gate)}.items()]
    try:
        for thread in threads:
            thread.start()
        assert plain.wait_for_nodes(2, 10) == ["fast", "slow"]
        outcomes = plain.run(Instruction("fit", 1, WEIGHTS, {}), ["fast", "slow"], timeout=20)
        first = next(outcomes)
        assert first.node_id == "fast"
        kept = weakref.ref(first.weights["big"])
        del first
        waiting = threading.Thread(target=lambda: next(outcomes), daemon=True)
        waiting.start()  # the fleet now waits for "slow", whose trainer is held at the gate
        for _ in range(200):
            gc.collect()
            if kept() is None:
                break
            waiting.join(0.01)
        assert kept() is None, "the fleet kept the previous update alive while waiting"
        gate.set()
        waiting.join(20)
    finally:
        gate.set()
        plain.close()
    for thread in threads:
        thread.join(15)
