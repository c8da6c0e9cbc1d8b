"""Random and mutated bytes sent to every RPC of a live coordinator, over a real socket.

Requests go through generic ``unary_unary``/``unary_stream``/``stream_unary``
calls with identity serializers, so the coordinator gets exactly the fuzzed
bytes. Every call must end in a deliberate status (never UNKNOWN, which is
what an exception escaping a handler becomes), and a good node must still
complete a round afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedloom.client import node as node_loop
from fedloom.codec import encode
from fedloom.protos import serde
from fedloom.protos.fedloom.protos import fleet_pb2 as pb
from fedloom.security import keys, signing
from fedloom.server.grpc_auth import ServerSecurity
from fedloom.server.grpc_fleet import GrpcFleet
from fedloom.tensors import NamedTensors
from fedloom.types import FitRes, Instruction

SERVICE = "/fedloom.protos.Fleet"
WEIGHTS = NamedTensors({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.int64)})
DELIBERATE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


class Shift:
    def fit(self, weights, config):
        return weights.map(lambda a: a + 1), 2, {}

    def evaluate(self, weights, config):
        return 2, {}


EDITS = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.integers(0, 1 << 16), st.integers(1, 255),
                          st.binary(min_size=1, max_size=6)), min_size=1, max_size=3)


def _mutate(data: bytes, edits) -> bytes:
    """Apply edits drawn independently of ``data`` (whose length varies with random session ids)."""
    out = bytearray(data)
    for op, where, xor, insert in edits:
        pos = where % max(1, len(out))
        if op == "flip" and out:
            out[pos] ^= xor
        elif op == "cut":
            del out[pos:]
        else:
            out[pos:pos] = insert
    return bytes(out)


def _status(call) -> grpc.StatusCode:
    try:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


class Target:
    """A live coordinator, a raw channel to it, and a registered peer that can be handed tasks."""

    def __init__(self, security: ServerSecurity | None = None):
        self.fleet = GrpcFleet(heartbeat_interval=0.2, heartbeat_timeout=5, poll_wait=0.05, rate=1e6, burst=1e6,
                               security=security)
        self.fleet.start("127.0.0.1:0")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.fleet.port}", options=node_loop.CHANNEL_OPTIONS)
        self.register = self.channel.unary_unary(f"{SERVICE}/Register")
        self.unary = {n: self.channel.unary_unary(f"{SERVICE}/{n}") for n in ("Register", "Heartbeat", "PullTask")}
        self.download = self.channel.unary_stream(f"{SERVICE}/DownloadWeights")
        self.submit = self.channel.stream_unary(f"{SERVICE}/SubmitResult")

    def peer(self) -> pb.NodeRef:
        session = pb.RegisterReply.FromString(self.register(pb.RegisterRequest(node_id="evil").SerializeToString()))
        return pb.NodeRef(node_id="evil", session=session.session)

    def task(self, ref: pb.NodeRef) -> tuple[pb.TaskRef, threading.Thread, list]:
        """Hand the peer a fresh fit task; returns its ref and the thread collecting the run's outcome."""
        outcomes: list = []
        thread = threading.Thread(target=lambda: outcomes.extend(
            self.fleet.run(Instruction("fit", 1, WEIGHTS, {}), ["evil"], timeout=10)))
        thread.start()
        while True:
            reply = pb.PullTaskReply.FromString(self.unary["PullTask"](ref.SerializeToString()))
            if reply.WhichOneof("reply") == "task":
                return pb.TaskRef(node=ref, task_id=reply.task.task_id), thread, outcomes

    def close(self) -> None:
        self.channel.close()
        self.fleet.close()


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    target = Target()
    yield target
    target.close()


def _valid_unary(ref: pb.NodeRef) -> list[tuple[str, bytes]]:
    return [("Register", pb.RegisterRequest(node_id="evil").SerializeToString()),
            ("Heartbeat", ref.SerializeToString()), ("PullTask", ref.SerializeToString()),
            ("DownloadWeights", pb.TaskRef(node=ref, task_id="1:00").SerializeToString())]


@FUZZ
@given(data=st.data())
def test_unary_and_download_handlers_survive_random_bytes(target: Target, data) -> None:
    ref = target.peer()
    name, valid = data.draw(st.sampled_from(_valid_unary(ref)))
    raw = data.draw(st.one_of(st.binary(max_size=120), EDITS.map(lambda edits: _mutate(valid, edits))))
    if name == "DownloadWeights":
        code = _status(lambda: target.download(raw, timeout=10))
    else:
        code = _status(lambda: target.unary[name](raw, timeout=10))
    assert code in DELIBERATE, code


PLANS = st.lists(st.tuples(st.sampled_from(["mutate", "drop", "repeat", "noise"]), st.integers(0, 1 << 16), EDITS,
                          st.binary(max_size=40)), max_size=3)


def submission(task: pb.TaskRef, plan) -> list[bytes]:
    """A fit submission for ``task`` with some messages mutated, dropped, repeated or replaced by noise."""
    header = pb.SubmitMessage(header=pb.ResultHeader(task=task, fit=pb.ResultSummary(num_examples=3)))
    messages = [header.SerializeToString()]
    for frame in encode(WEIGHTS.map(lambda a: a + 1), chunk_size=16):
        messages.append(serde.submit_data_wire(frame) if isinstance(frame, memoryview) else
                        pb.SubmitMessage(frame=serde.frame_to_proto(frame)).SerializeToString())
    for op, where, edits, noise in plan:
        if not messages:
            break
        i = where % len(messages)
        if op == "mutate":
            messages[i] = _mutate(messages[i], edits)
        elif op == "drop":
            del messages[i]
        elif op == "repeat":
            messages.insert(i, messages[i])
        else:
            messages.insert(i, noise)
    return messages


@FUZZ
@given(plan=PLANS)
def test_submissions_of_mutated_streams_are_refused_or_decoded_exactly(target: Target, plan) -> None:
    ref = target.peer()
    task, thread, outcomes = target.task(ref)
    messages = submission(task, plan)
    code = _status(lambda: target.submit(iter(messages), timeout=10))
    target.peer()  # registering again settles a task the submission never reached (e.g. a mangled task id)
    thread.join(15)
    assert code in DELIBERATE, code
    assert len(outcomes) == 1
    if isinstance(outcomes[0], FitRes):  # accepted: then it decoded to the model's exact structure
        assert code == grpc.StatusCode.OK and outcomes[0].weights.spec() == WEIGHTS.spec()
    else:
        assert code != grpc.StatusCode.OK or "node reported" in outcomes[0].reason


def test_a_good_node_is_served_after_the_fuzzing(target: Target) -> None:
    thread = threading.Thread(target=node_loop.run, args=(Shift(), f"127.0.0.1:{target.fleet.port}"),
                              kwargs={"node_id": "good", "connect_timeout": 10}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not target.fleet.registry.alive("good"):
        assert time.monotonic() < deadline, "the good node never registered"
        time.sleep(0.01)  # polling with a deadline
    outcomes = list(target.fleet.run(Instruction("fit", 2, WEIGHTS, {}), ["good"], timeout=20))
    assert isinstance(outcomes[0], FitRes) and outcomes[0].weights.equal(WEIGHTS.map(lambda a: a + 1))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(metadata=st.lists(st.tuples(st.sampled_from(signing.KEYS), st.text("0123456789abcdef.-node", max_size=40)),
                         max_size=5), raw=st.binary(max_size=60))
def test_signed_coordinator_refuses_random_credentials(tmp_path_factory, metadata, raw: bytes) -> None:
    secure = _signed_target(tmp_path_factory)
    code = _status(lambda: secure.unary["Heartbeat"](raw, metadata=metadata, timeout=10))
    assert code in {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.INVALID_ARGUMENT}, code


_SIGNED: dict = {}


def _signed_target(tmp_path_factory) -> Target:
    """One plaintext coordinator that requires signatures, shared by the examples (closed at exit)."""
    if "target" not in _SIGNED:
        out = tmp_path_factory.mktemp("fuzzkeys")
        keys.create(out, nodes=["node-0"])
        security = ServerSecurity(authorized_keys=keys.load_authorized_keys(out / "authorized_keys"))
        _SIGNED["target"] = Target(security)
    return _SIGNED["target"]


def teardown_module() -> None:
    if "target" in _SIGNED:
        _SIGNED.pop("target").close()
