"""The node loop: dial out to a coordinator, pull tasks, train, send results back.

A node sits behind NAT, so it makes every call: register, heartbeat (in a
background thread), pull a task, download its weights, run the trainer through
``fedloom.client.trainer.execute`` and stream the result up. When the
coordinator is down or restarts, the node retries with exponential backoff and
jitter and registers again; it gives up with ``CoordinatorUnreachable`` (naming
the address) after ``connect_timeout`` seconds without contact, and returns
when the coordinator says the run is finished.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator

import grpc

from fedloom.client.trainer import Trainer, execute
from fedloom.codec import Decoder, encode
from fedloom.protos import serde
from fedloom.protos.fedloom.protos import fleet_pb2 as pb
from fedloom.protos.fedloom.protos import fleet_pb2_grpc as pb_grpc
from fedloom.tensors import TensorError
from fedloom.types import Failure, FitRes, Outcome

log = logging.getLogger("fedloom.node")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", serde.MAX_MESSAGE),
    ("grpc.max_send_message_length", serde.MAX_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
RECONNECT = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED)  # the coordinator forgot us: register
TASK_LOST = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
             grpc.StatusCode.RESOURCE_EXHAUSTED)  # this task is gone; pull the next one


class CoordinatorUnreachable(ConnectionError):
    """No contact with the coordinator for ``connect_timeout`` seconds."""


class Backoff:
    """Exponential backoff with jitter, bounded by a give-up deadline since the last contact."""

    def __init__(self, *, give_up_after: float, base: float = 0.2, cap: float = 5.0, rng: random.Random | None = None):
        self.give_up_after = give_up_after
        self.base, self.cap = base, cap
        self._rng = rng or random.Random()
        self.reset()

    def reset(self) -> None:
        self.attempt = 0
        self.since = time.monotonic()

    def delay(self) -> float:
        """The next pause: full-range jitter over an exponentially growing ceiling."""
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return ceiling * (0.5 + 0.5 * self._rng.random())

    def expired(self) -> bool:
        return time.monotonic() - self.since >= self.give_up_after

    def remaining(self) -> float:
        return max(0.0, self.give_up_after - (time.monotonic() - self.since))


class Node:
    """One node's connection to the coordinator; ``run`` is the loop."""

    def __init__(self, trainer: Trainer, server: str, *, node_id: str, connect_timeout: float = 60.0,
                 max_backoff: float = 5.0, max_download_bytes: int = 1 << 40, rpc_timeout: float = 30.0):
        if not node_id or len(node_id) > 128 or not node_id.isprintable():
            raise ValueError(f"node id must be 1..128 printable characters, got {node_id[:128]!r}")
        self.trainer, self.server, self.node_id = trainer, server, node_id
        self.max_download_bytes = max_download_bytes
        self.rpc_timeout = rpc_timeout
        self.backoff = Backoff(give_up_after=connect_timeout, cap=max_backoff)
        self.channel = grpc.insecure_channel(server, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.FleetStub(self.channel)
        service = "/" + pb.DESCRIPTOR.services_by_name["Fleet"].full_name
        # The bulk calls bypass message objects for data chunks (see serde's raw data frames).
        self._download = self.channel.unary_stream(f"{service}/DownloadWeights", request_serializer=serde.serialize,
                                                   response_deserializer=None)
        self._submit = self.channel.stream_unary(f"{service}/SubmitResult", request_serializer=serde.serialize,
                                                 response_deserializer=pb.SubmitReply.FromString)
        self.ref: pb.NodeRef | None = None
        self.interval = 0.1  # until the coordinator says how often it wants a heartbeat
        self.finished = threading.Event()
        self._stop = threading.Event()
        self.tasks_done = 0

    # ------------------------------------------------------------- loop

    def run(self) -> None:
        heartbeat = threading.Thread(target=self._heartbeats, name=f"heartbeat-{self.node_id}", daemon=True)
        heartbeat.start()
        try:
            while not self.finished.is_set():
                try:
                    self._step()
                    self.backoff.reset()
                except grpc.RpcError as exc:
                    self._recover(exc)
        finally:
            self._stop.set()
            heartbeat.join(timeout=self.interval + 1)
            self.channel.close()
        log.info("node %s: the coordinator finished the run after %d tasks", self.node_id, self.tasks_done)

    def _step(self) -> None:
        if self.ref is None:
            self._register()
        reply = self.stub.PullTask(self.ref, timeout=self.rpc_timeout)
        which = reply.WhichOneof("reply")
        if which == "finished":
            self.finished.set()
        elif which == "task":
            self._do(reply.task)
        else:
            self.finished.wait(max(0.0, reply.retry_after))

    def _recover(self, exc: grpc.RpcError) -> None:
        code = exc.code()
        if code in RECONNECT:
            log.warning("node %s: coordinator does not know this session (%s); registering again",
                        self.node_id, exc.details())
            self.ref = None
            self.backoff.reset()
        elif code in TASK_LOST:
            log.warning("node %s: task refused (%s: %s)", self.node_id, code.name, exc.details())
            self.backoff.reset()
        else:
            if self.backoff.expired():
                raise CoordinatorUnreachable(
                    f"cannot reach the coordinator at {self.server} for {self.backoff.give_up_after:g}s "
                    f"({code.name}: {exc.details()})") from None
            pause = min(self.backoff.delay(), self.backoff.remaining())
            log.info("node %s: coordinator at %s unavailable (%s); retrying in %.2fs",
                     self.node_id, self.server, code.name, pause)
            self.finished.wait(pause)

    def _register(self) -> None:
        try:
            reply = self.stub.Register(pb.RegisterRequest(node_id=self.node_id), timeout=self.rpc_timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(f"the coordinator at {self.server} refused node id {self.node_id!r}: "
                                 f"{exc.details()}") from None
            raise
        self.interval = reply.heartbeat_interval if reply.heartbeat_interval > 0 else 2.0
        self.ref = pb.NodeRef(node_id=self.node_id, session=reply.session)
        log.info("node %s: registered with %s", self.node_id, self.server)

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.interval):
            ref = self.ref
            if ref is None:
                continue
            try:
                if self.stub.Heartbeat(ref, timeout=max(self.interval, 1.0)).finished:
                    self.finished.set()
            except grpc.RpcError as exc:  # the main loop sees the same trouble and handles it
                log.debug("node %s: heartbeat failed: %s", self.node_id, exc.code())

    # ------------------------------------------------------------- one task

    def _do(self, header: pb.TaskHeader) -> None:
        ref = pb.TaskRef(node=self.ref, task_id=header.task_id)
        decoder = Decoder(max_bytes=self.max_download_bytes)
        outcome: Outcome
        try:
            for raw in self._download(ref):
                chunk = serde.data_frame_view(raw)
                decoder.feed(chunk if chunk is not None else serde.frame_from_proto(pb.TensorFrame.FromString(raw)))
            instruction = serde.instruction_from_proto(header, decoder.result())
        except (TensorError, ValueError) as exc:
            outcome = Failure(self.node_id, f"bad task from the coordinator: {exc}")
        else:
            del decoder
            outcome = execute(self.trainer, self.node_id, instruction)
            del instruction
        self._submit(_upload(outcome, ref), timeout=None)
        self.tasks_done += 1


def _upload(outcome: Outcome, ref: pb.TaskRef) -> Iterator[pb.SubmitMessage | bytes]:
    """The submission stream: the result header, then (for a fit) the weights' frames (chunks pre-serialized)."""
    yield pb.SubmitMessage(header=serde.result_header_to_proto(outcome, ref))
    if isinstance(outcome, FitRes):
        for frame in encode(outcome.weights):
            if isinstance(frame, memoryview):
                yield serde.submit_data_wire(frame)
            else:
                message = pb.SubmitMessage()
                serde.frame_to_proto(frame, message.frame)
                yield message


def run(trainer: Trainer, server: str, *, node_id: str, connect_timeout: float = 60.0, **options) -> int:
    """Serve ``trainer`` to the coordinator at ``server`` until the run is finished; returns tasks done."""
    node = Node(trainer, server, node_id=node_id, connect_timeout=connect_timeout, **options)
    node.run()
    return node.tasks_done
