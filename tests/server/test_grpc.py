"""The gRPC fleet over real loopback sockets: hostile peers, failures, deadlines, the driver on top."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from fedloom.client import node as node_loop
from fedloom.codec import End, Header, encode
from fedloom.protos import serde
from fedloom.protos.fedloom.protos import fleet_pb2 as pb
from fedloom.protos.fedloom.protos import fleet_pb2_grpc as pb_grpc
from fedloom.server.driver import Driver, RunConfig
from fedloom.server.grpc_fleet import GrpcFleet
from fedloom.strategies import fedavg
from fedloom.tensors import NamedTensors
from fedloom.types import Failure, FitRes, Instruction

WEIGHTS = NamedTensors({"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                        "big": np.zeros(1 << 21, np.float32)})  # 8 MiB: more than one 4 MiB chunk
MiB = 1 << 20


class Shift:
    """A trainer adding ``delta`` to every weight, claiming ``n`` examples; optionally waits for ``gate`` first."""

    def __init__(self, delta: float, n: int = 10, gate: threading.Event | None = None):
        self.delta, self.n, self.gate = delta, n, gate

    def fit(self, weights, config):
        if self.gate is not None:
            assert self.gate.wait(30)
        return weights.map(lambda a: a + np.asarray(self.delta, a.dtype)), self.n, {"loss": self.delta}

    def evaluate(self, weights, config):
        return self.n, {"accuracy": 0.5}


class Boom(Shift):
    def fit(self, weights, config):
        raise RuntimeError("disk on fire")


def _collect(fleet: GrpcFleet, instruction: Instruction, ids: list[str],
             timeout: float) -> tuple[threading.Thread, list]:
    outcomes: list = []
    thread = threading.Thread(target=lambda: outcomes.extend(fleet.run(instruction, ids, timeout=timeout)))
    thread.start()
    return thread, outcomes


def _poll(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)  # polling with a deadline, not sleeping as synchronization
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------- a hostile peer


class Peer:
    """A hand-driven node speaking raw protos, to send what a real node never would."""

    def __init__(self, port: int, node_id: str = "evil"):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=node_loop.CHANNEL_OPTIONS)
        self.stub = pb_grpc.FleetStub(self.channel)
        reply = self.stub.Register(pb.RegisterRequest(node_id=node_id))
        self.ref = pb.NodeRef(node_id=node_id, session=reply.session)
        self.task: pb.TaskRef | None = None

    def pull(self) -> pb.TaskRef:
        def task():
            reply = self.stub.PullTask(self.ref)
            return reply.task if reply.WhichOneof("reply") == "task" else None

        header = _poll(task, what="a task for the peer")
        self.task = pb.TaskRef(node=self.ref, task_id=header.task_id)
        return self.task

    def submit(self, *frames, header: pb.ResultHeader | None = None) -> pb.SubmitReply:
        first = header or pb.ResultHeader(task=self.task, fit=pb.ResultSummary(num_examples=5))
        messages = [pb.SubmitMessage(header=first)]
        for frame in frames:
            messages.append(frame if isinstance(frame, pb.SubmitMessage) else
                            pb.SubmitMessage(frame=frame if isinstance(frame, pb.TensorFrame)
                                             else serde.frame_to_proto(frame)))
        return self.stub.SubmitResult(iter(messages), timeout=10)

    def submit_good(self) -> pb.SubmitReply:
        return self.submit(*encode(WEIGHTS.map(lambda a: a + 1)))


def _good_frames() -> list:
    return list(encode(WEIGHTS.map(lambda a: a + 1)))


HEADER_BIG = Header("big", "float32", (1 << 21,))
CASES = {
    # name: (hostile act, expected status, whether the peer's task then fails, reason fragment)
    "unknown node": (lambda p: p.stub.PullTask(pb.NodeRef(node_id="ghost", session="x")),
                     grpc.StatusCode.NOT_FOUND, False, ""),
    "wrong session": (lambda p: p.stub.PullTask(pb.NodeRef(node_id="evil", session="forged")),
                      grpc.StatusCode.NOT_FOUND, False, ""),  # register again
    "unknown task": (lambda p: list(p.stub.DownloadWeights(pb.TaskRef(node=p.ref, task_id="999:x"))),
                     grpc.StatusCode.NOT_FOUND, False, ""),
    "bad node id": (lambda p: p.stub.Register(pb.RegisterRequest(node_id="")),
                    grpc.StatusCode.INVALID_ARGUMENT, False, ""),
    "frame before header": (lambda p: p.stub.SubmitResult(iter([pb.SubmitMessage(frame=pb.TensorFrame(data=b"x"))])),
                            grpc.StatusCode.INVALID_ARGUMENT, False, ""),
    "empty frame": (lambda p: p.submit(pb.TensorFrame()), grpc.StatusCode.INVALID_ARGUMENT, True, "empty tensor"),
    "data before header": (lambda p: p.submit(b"abcd"), grpc.StatusCode.INVALID_ARGUMENT, True, "before any tensor"),
    "wrong shape": (lambda p: p.submit(Header("w", "float32", (3, 2))), grpc.StatusCode.INVALID_ARGUMENT, True,
                    "expected float32[2, 3]"),
    "wrong dtype": (lambda p: p.submit(Header("w", "float64", (2, 3))), grpc.StatusCode.INVALID_ARGUMENT, True,
                    "expected float32"),
    "unknown tensor": (lambda p: p.submit(Header("evil", "float32", (1,))), grpc.StatusCode.INVALID_ARGUMENT, True,
                       "unexpected tensor"),
    "oversized chunk": (lambda p: p.submit(HEADER_BIG, bytes(5 * MiB)), grpc.StatusCode.RESOURCE_EXHAUSTED, True,
                        "exceeds the limit"),
    "oversized message": (lambda p: p.submit(HEADER_BIG, bytes(9 * MiB)), grpc.StatusCode.RESOURCE_EXHAUSTED, True,
                          ""),
    "tiny chunks": (lambda p: p.submit(HEADER_BIG, *[b""] * 200), grpc.StatusCode.RESOURCE_EXHAUSTED, True,
                    "chunks too small"),  # a per-stream bound on messages, not only on bytes
    "truncated upload": (lambda p: p.submit(*_good_frames()[:-2]), grpc.StatusCode.INVALID_ARGUMENT, True,
                         "truncated"),
    "missing end": (lambda p: p.submit(*_good_frames()[:-1]), grpc.StatusCode.INVALID_ARGUMENT, True, "truncated"),
    "wrong end count": (lambda p: p.submit(*_good_frames()[:-1], End(3)), grpc.StatusCode.INVALID_ARGUMENT, True,
                        "announced 3"),
    "frames after end": (lambda p: p.submit(*_good_frames(), End(2)), grpc.StatusCode.INVALID_ARGUMENT, True,
                         "after the end"),
    "wrong kind": (lambda p: p.submit(header=pb.ResultHeader(task=p.task, evaluate=pb.ResultSummary(num_examples=1))),
                   grpc.StatusCode.INVALID_ARGUMENT, True, "got a evaluate result"),
    "duplicate submission": (lambda p: (p.submit_good(), p.submit_good()), grpc.StatusCode.FAILED_PRECONDITION,
                             False, ""),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_and_others_keep_working(fleet, nodes, case) -> None:
    act, code, task_fails, reason = CASES[case]
    nodes("good", Shift(1.0))
    peer = Peer(fleet.port)
    assert fleet.wait_for_nodes(2, 10) == ["evil", "good"]
    thread, outcomes = _collect(fleet, Instruction("fit", 1, WEIGHTS, {"seed": 0}), ["good", "evil"], timeout=20)
    peer.pull()
    with pytest.raises(grpc.RpcError) as info:
        act(peer)
    assert info.value.code() == code, info.value.details()
    if not task_fails and case != "duplicate submission":
        peer.submit_good()  # the refusal cost nothing: the peer can still deliver
    thread.join(30)
    by_node = {o.node_id: o for o in outcomes}
    assert sorted(by_node) == ["evil", "good"] and len(outcomes) == 2
    assert isinstance(by_node["good"], FitRes) and by_node["good"].weights.equal(WEIGHTS.map(lambda a: a + 1))
    if task_fails:
        assert isinstance(by_node["evil"], Failure) and reason in by_node["evil"].reason, by_node["evil"]
    else:
        assert isinstance(by_node["evil"], FitRes) and by_node["evil"].num_examples == 5


def test_upload_cut_off_midway_gives_no_partial_update(fleet) -> None:
    peer = Peer(fleet.port)
    thread, outcomes = _collect(fleet, Instruction("fit", 1, WEIGHTS, {}), ["evil"], timeout=20)
    task = peer.pull()
    sent = threading.Event()

    def stream():
        yield pb.SubmitMessage(header=pb.ResultHeader(task=task, fit=pb.ResultSummary(num_examples=5)))
        for frame in _good_frames()[:3]:
            yield pb.SubmitMessage(frame=serde.frame_to_proto(frame))
        sent.set()
        threading.Event().wait(30)  # stalls mid-upload until cancelled

    call = peer.stub.SubmitResult.future(stream())
    assert sent.wait(10)
    call.cancel()
    thread.join(30)
    assert len(outcomes) == 1 and isinstance(outcomes[0], Failure), outcomes
    assert "interrupted" in outcomes[0].reason or "truncated" in outcomes[0].reason


def test_late_result_is_discarded_and_the_node_serves_the_next_round(fleet, nodes) -> None:
    gate = threading.Event()
    nodes("slow", Shift(1.0, gate=gate))
    fleet.wait_for_nodes(1, 10)
    first = list(fleet.run(Instruction("fit", 1, WEIGHTS, {}), ["slow"], timeout=0.5))
    assert len(first) == 1 and isinstance(first[0], Failure) and "deadline" in first[0].reason
    gate.set()  # the late result is now uploaded and refused as stale
    second = list(fleet.run(Instruction("fit", 2, WEIGHTS.map(lambda a: a * 0), {}), ["slow"], timeout=20))
    assert len(second) == 1 and isinstance(second[0], FitRes)
    assert second[0].weights.equal(WEIGHTS.map(lambda a: a * 0 + 1))  # from round 2's weights, not round 1's


def test_unconnected_node_fails_at_once(fleet) -> None:
    assert list(fleet.run(Instruction("fit", 1, WEIGHTS, {}), ["nobody"], timeout=5)) == [
        Failure("nobody", "not connected")]


def test_decodes_are_bounded_until_the_driver_folds(nodes) -> None:
    fleet = GrpcFleet(heartbeat_interval=0.2, heartbeat_timeout=1.5, poll_wait=0.2, max_decodes=1)
    fleet.start("127.0.0.1:0")
    try:
        ids = ["a", "b", "c"]
        for i, node_id in enumerate(ids):
            _start_node(fleet, node_id, Shift(float(i)))
        fleet.wait_for_nodes(3, 10)
        outcomes = fleet.run(Instruction("fit", 1, WEIGHTS, {}), ids, timeout=30)
        first = next(outcomes)
        others = [n for n in ids if n != first.node_id]
        # The other two have started uploading but wait for the only decode slot, held by `first`.
        _poll(lambda: all(fleet.registry.nodes[n].task.state == "submitting" for n in others), what="uploads")
        assert fleet.servicer.decodes._value == 0
        rest = list(outcomes)
        assert sorted(o.node_id for o in rest) == sorted(others)
        assert all(isinstance(o, FitRes) for o in (first, *rest))
        assert fleet.servicer.decodes._value == 1
    finally:
        fleet.close()


def _start_node(fleet: GrpcFleet, node_id: str, trainer) -> threading.Thread:
    thread = threading.Thread(target=node_loop.run, args=(trainer, f"127.0.0.1:{fleet.port}"),
                              kwargs={"node_id": node_id, "connect_timeout": 10}, daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------- the driver over the fleet


class Vanisher:
    """Registers, takes its task, then goes silent: no heartbeat, no result."""

    def __init__(self, port: int):
        self.peer = Peer(port, "ghost")
        self.thread = threading.Thread(target=self.peer.pull, daemon=True)
        self.thread.start()


def test_driver_rounds_with_a_failing_and_a_vanishing_node(fleet, nodes) -> None:
    for node_id, trainer in {"n1": Shift(1.0, 10), "n2": Shift(2.0, 20), "n3": Shift(3.0, 30), "boom": Boom(0)}.items():
        nodes(node_id, trainer)
    ghost = Vanisher(fleet.port)
    initial = NamedTensors({"w": np.zeros((2, 2), np.float32), "b": np.ones(3, np.float64)})
    config = RunConfig(rounds=1, min_clients=5, round_timeout=30, wait_timeout=10, seed=3)
    record = Driver(fleet, fedavg(), initial, config).run_round()
    ghost.thread.join(10)
    assert record.num_results == 3
    assert set(record.failures) == {"boom", "ghost"}
    assert "disk on fire" in record.failures["boom"]
    assert "vanished" in record.failures["ghost"]
    assert record.seconds < config.round_timeout
    # FedAvg by hand: (1*10 + 2*20 + 3*30) / 60 = 140/60 added to every weight.
    assert record.metrics["train_loss"] == pytest.approx(140 / 60)
    assert fleet.wait_for_nodes(4, 0) == ["boom", "n1", "n2", "n3"]  # the ghost is no longer alive


def test_driver_reaches_the_same_weights_as_in_process(fleet, nodes) -> None:
    from fedloom.fleet import InProcessFleet

    trainers = {"a": Shift(0.5, 3), "b": Shift(-1.0, 1)}
    for node_id, trainer in trainers.items():
        nodes(node_id, trainer)
    initial = NamedTensors({"w": np.arange(4, dtype=np.float32)})
    config = RunConfig(rounds=3, min_clients=2, round_timeout=30, wait_timeout=10)
    over_grpc = Driver(fleet, fedavg(), initial, config).run()
    in_process = Driver(InProcessFleet(trainers), fedavg(), initial, config).run()
    assert over_grpc.weights.equal(in_process.weights)
    # Each round adds (0.5*3 - 1*1)/4 = 0.125; three rounds add 0.375.
    np.testing.assert_array_equal(over_grpc.weights["w"], np.arange(4, dtype=np.float32) + 0.375)


# ----------------------------------------------------------------- the node loop


def test_node_names_the_address_when_no_coordinator_answers() -> None:
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(node_loop.CoordinatorUnreachable, match=f"127.0.0.1:{port}"):
        node_loop.run(Shift(1.0), f"127.0.0.1:{port}", node_id="n", connect_timeout=1.0)
    assert time.monotonic() - start < 10


def test_node_registers_again_after_a_coordinator_restart() -> None:
    first = GrpcFleet(heartbeat_interval=0.2, heartbeat_timeout=1.5, poll_wait=0.2)
    port = first.start("127.0.0.1:0")
    thread = _start_node(first, "n", Shift(1.0))
    assert first.wait_for_nodes(1, 10) == ["n"]
    first._server.stop(None).wait()  # a crash: nodes are not told anything
    second = GrpcFleet(heartbeat_interval=0.2, heartbeat_timeout=1.5, poll_wait=0.2)
    try:
        assert second.start(f"127.0.0.1:{port}") == port
        assert second.wait_for_nodes(1, 20) == ["n"]
        outcomes = list(second.run(Instruction("fit", 1, WEIGHTS, {}), ["n"], timeout=20))
        assert isinstance(outcomes[0], FitRes) and outcomes[0].weights.equal(WEIGHTS.map(lambda a: a + 1))
    finally:
        second.close()
    thread.join(15)
    assert not thread.is_alive()


@pytest.mark.parametrize(("attempts", "ceiling"), [(0, 0.2), (1, 0.4), (3, 1.6), (10, 5.0)])
def test_backoff_grows_exponentially_with_jitter_up_to_the_cap(attempts: int, ceiling: float) -> None:
    backoff = node_loop.Backoff(give_up_after=60, base=0.2, cap=5.0)
    backoff.attempt = attempts
    assert ceiling / 2 <= backoff.delay() <= ceiling
    assert backoff.attempt == attempts + 1
    backoff.reset()
    assert backoff.attempt == 0 and not backoff.expired()


def test_a_stalled_upload_frees_its_decode_slot_at_the_deadline(nodes) -> None:
    fleet = GrpcFleet(heartbeat_interval=0.2, heartbeat_timeout=1.5, poll_wait=0.2, max_decodes=1)
    fleet.start("127.0.0.1:0")
    release = threading.Event()
    try:
        peer = Peer(fleet.port)
        thread, outcomes = _collect(fleet, Instruction("fit", 1, WEIGHTS, {}), ["evil"], timeout=1.0)
        task = peer.pull()

        def stall():
            yield pb.SubmitMessage(header=pb.ResultHeader(task=task, fit=pb.ResultSummary(num_examples=5)))
            yield pb.SubmitMessage(frame=serde.frame_to_proto(_good_frames()[0]))
            release.wait(30)  # holds the only decode slot, sending nothing more

        call = peer.stub.SubmitResult.future(stall())
        thread.join(30)
        assert len(outcomes) == 1 and "deadline" in outcomes[0].reason
        _start_node(fleet, "good", Shift(1.0))
        fleet.wait_for_nodes(2, 10)
        again = list(fleet.run(Instruction("fit", 2, WEIGHTS, {}), ["good"], timeout=20))
        assert isinstance(again[0], FitRes), again  # the stalled upload no longer blocks everyone else
    finally:
        release.set()
        call.cancel()
        fleet.close()


@pytest.mark.parametrize("node_id", ["", "x" * 129, "tab\there"])
def test_node_refuses_a_bad_id_before_dialing(node_id: str) -> None:
    with pytest.raises(ValueError, match="node id"):
        node_loop.run(Shift(1.0), "127.0.0.1:1", node_id=node_id, connect_timeout=0)


def test_fedbuff_runs_asynchronously_over_grpc(fleet, nodes) -> None:
    from fedloom.server.async_driver import AsyncDriver
    from fedloom.strategies.asynchronous import fedbuff

    for i in range(4):
        nodes(f"n{i}", Shift(1.0, 1))
    initial = NamedTensors({"w": np.zeros(3, np.float32)})
    config = RunConfig(rounds=4, min_clients=4, round_timeout=30, wait_timeout=10)
    # staleness exponent 0: each server version adds exactly the mean shift, 1.0
    history = AsyncDriver(fleet, fedbuff(buffer_size=2, concurrency=3, staleness_exponent=0.0), initial, config).run()
    assert [r.num_results for r in history.rounds] == [2, 2, 2, 2]
    np.testing.assert_allclose(history.weights["w"], np.full(3, 4.0))
