"""The coordinator's gRPC service and its node registry.

Nodes dial out: they register, heartbeat, pull a task, download its weights
and submit a result. The registry knows who is registered, when each node was
last heard from and which task it holds; the servicer validates every message
and refuses anything malformed with a precise status, so one bad node costs
one task and nothing else:

- INVALID_ARGUMENT: malformed ids, frames, shapes, dtypes, truncated uploads;
- NOT_FOUND: unknown node or task; UNAUTHENTICATED: wrong session token;
- FAILED_PRECONDITION: a stale, late or duplicate submission;
- RESOURCE_EXHAUSTED: a chunk or a stream larger than allowed.

Memory stays bounded by the model, not the number of nodes: weights are
encoded once per round and every download streams from the same arrays, and a
semaphore bounds how many uploads are decoded at once; a decoded update keeps
its permit until the driver has folded it.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError

from fedloom.codec import CHUNK_SIZE, Decoder, End, Frame, encode
from fedloom.protos import serde
from fedloom.protos.fedloom.protos import fleet_pb2 as pb
from fedloom.protos.fedloom.protos import fleet_pb2_grpc as pb_grpc
from fedloom.tensors import TensorError
from fedloom.types import Failure, Instruction, Outcome

MAX_NODE_ID = 128
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", serde.MAX_MESSAGE),
    ("grpc.max_send_message_length", serde.MAX_MESSAGE),
    # No BDP probing: it grows each stream's receive window, and uploads waiting for a decode slot would
    # then park megabytes each in gRPC's buffers (measured: +25 MB per waiting node), growing with the fleet.
    ("grpc.http2.bdp_probe", 0),
]


class Refused(Exception):
    """A request the service turns down with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Permit:
    """One slot of the decode semaphore, released exactly once."""

    def __init__(self, semaphore: threading.Semaphore | None):
        self._semaphore = semaphore

    def release(self) -> None:
        semaphore, self._semaphore = self._semaphore, None
        if semaphore is not None:
            semaphore.release()


@dataclass
class Payload:
    """What every node of one ``run`` downloads: the weights' frames, built once."""

    instruction: Instruction
    frames: list[Frame]
    spec: dict
    nbytes: int

    @classmethod
    def of(cls, instruction: Instruction) -> Payload:
        weights = instruction.weights
        return cls(instruction, list(encode(weights)), weights.spec(), weights.nbytes)


@dataclass(eq=False)
class Task:
    """One node's share of one ``run``; settled exactly once (result or failure)."""

    id: str
    node_id: str
    payload: Payload
    sink: queue.Queue
    deadline: float
    state: str = "open"  # open -> submitting -> done
    permit: Permit | None = None  # the decode slot of an upload in progress

    @property
    def kind(self) -> str:
        return self.payload.instruction.kind


@dataclass(eq=False)
class Node:
    node_id: str
    session: str
    last_seen: float
    task: Task | None = None  # the latest task, kept after it is settled to tell "stale" from "unknown"
    told_finished: bool = False


@dataclass
class Registry:
    """Registered nodes, their liveness and their current tasks; thread-safe."""

    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 10.0
    nodes: dict[str, Node] = field(default_factory=dict)
    finished: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)

    def register(self, node_id: str) -> str:
        session = secrets.token_hex(16)
        with self.cond:
            old = self.nodes.get(node_id)
            if old is not None and old.task is not None:
                self._settle(old.task, Failure(node_id, "node re-registered; the task it held was lost"))
            self.nodes[node_id] = Node(node_id, session, time.monotonic())
            self.cond.notify_all()
        return session

    def touch(self, node_id: str, session: str) -> Node:
        """The caller's node, refreshed; Refused if unknown or the session is wrong."""
        with self.cond:
            node = self.nodes.get(node_id)
            if node is None:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"unknown node {node_id[:MAX_NODE_ID]!r}: register first")
            if not secrets.compare_digest(node.session, session):
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"stale or wrong session for node {node_id!r}")
            node.last_seen = time.monotonic()
            return node

    def alive(self, node_id: str) -> bool:
        with self.cond:
            node = self.nodes.get(node_id)
            return node is not None and time.monotonic() - node.last_seen <= self.heartbeat_timeout

    def alive_ids(self) -> list[str]:
        with self.cond:
            now = time.monotonic()
            return sorted(n for n, node in self.nodes.items() if now - node.last_seen <= self.heartbeat_timeout)

    def wait_for(self, count: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                ids = self.alive_ids()
                remaining = deadline - time.monotonic()
                if len(ids) >= count or remaining <= 0:
                    return ids
                self.cond.wait(min(remaining, self.heartbeat_interval))

    def assign(self, task: Task) -> None:
        with self.cond:
            node = self.nodes[task.node_id]
            if node.task is not None:
                self._settle(node.task, Failure(node.node_id, "superseded by a newer task"))
            node.task = task
            self.cond.notify_all()

    def settle(self, task: Task, outcome: Outcome | None, permit: Permit | None = None) -> bool:
        """Close ``task`` with ``outcome`` (queued for its run; None: the run already knows). False if closed."""
        with self.cond:
            return self._settle(task, outcome, permit)

    def _settle(self, task: Task, outcome: Outcome | None, permit: Permit | None = None) -> bool:
        if task.state == "done":
            return False
        task.state = "done"
        if permit is None and task.permit is not None:
            task.permit.release()  # settled under a stalled or cut-off upload: free its slot for others now
        if outcome is not None:
            task.sink.put((task, outcome, permit))
        return True

    def claim(self, task: Task) -> None:
        """Mark ``task`` as being submitted; Refused if it is already submitted, settled or late."""
        with self.cond:
            if task.state != "open":
                why = "is being submitted" if task.state == "submitting" else "was already settled or is late"
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"task {task.id} {why}; submission refused")
            task.state = "submitting"

    def finish(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def all_told(self) -> bool:
        """Whether every live node has been told that the run is finished."""
        with self.cond:
            return all(self.nodes[n].told_finished for n in self.alive_ids())


def _refusing(method):
    """Turn ``Refused`` raised by a unary handler into ``context.abort``."""

    def handler(self, request, context):
        try:
            return method(self, request, context)
        except Refused as exc:
            context.abort(exc.code, exc.message)

    handler.__name__ = method.__name__
    handler.__doc__ = method.__doc__
    return handler


class FleetServicer(pb_grpc.FleetServicer):
    """The RPCs a node calls; see ``protos/fedloom/protos/fleet.proto``."""

    def __init__(self, registry: Registry, *, max_decodes: int = 2, poll_wait: float = 1.0):
        if max_decodes < 1:
            raise ValueError(f"max_decodes must be at least 1, got {max_decodes}")
        self.registry = registry
        self.decodes = threading.Semaphore(max_decodes)
        self.poll_wait = poll_wait

    # ------------------------------------------------------------- session

    @_refusing
    def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterReply:
        node_id = request.node_id
        if not node_id or len(node_id) > MAX_NODE_ID or not node_id.isprintable():
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"node id must be 1..{MAX_NODE_ID} printable characters, got {node_id[:MAX_NODE_ID]!r}")
        session = self.registry.register(node_id)
        return pb.RegisterReply(session=session, heartbeat_interval=self.registry.heartbeat_interval)

    @_refusing
    def Heartbeat(self, request: pb.NodeRef, context) -> pb.HeartbeatReply:
        node = self.registry.touch(request.node_id, request.session)
        with self.registry.cond:
            if self.registry.finished:
                node.told_finished = True
            return pb.HeartbeatReply(finished=self.registry.finished)

    @_refusing
    def PullTask(self, request: pb.NodeRef, context) -> pb.PullTaskReply:
        """Long-polls up to ``poll_wait`` seconds for a task, so a node starts as soon as work exists."""
        node = self.registry.touch(request.node_id, request.session)
        deadline = time.monotonic() + self.poll_wait
        with self.registry.cond:
            while True:
                if self.registry.finished:
                    node.told_finished = True
                    return pb.PullTaskReply(finished=True)
                task = node.task
                if task is not None and task.state == "open":
                    return pb.PullTaskReply(task=serde.instruction_to_proto(task.payload.instruction, task.id))
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not context.is_active():
                    return pb.PullTaskReply(retry_after=0.0)
                self.registry.cond.wait(remaining)

    # ------------------------------------------------------------- tasks

    def _task(self, ref: pb.TaskRef) -> tuple[Node, Task]:
        node = self.registry.touch(ref.node.node_id, ref.node.session)
        with self.registry.cond:
            task = node.task
            if task is None or task.id != ref.task_id:
                if task is not None and 0 <= task_sequence(ref.task_id) < task_sequence(task.id):
                    raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"task {ref.task_id[:80]!r} is stale; node {node.node_id!r} now holds {task.id}")
                raise Refused(grpc.StatusCode.NOT_FOUND, f"node {node.node_id!r} holds no task {ref.task_id[:80]!r}")
            return node, task

    def DownloadWeights(self, request: pb.TaskRef, context) -> Iterator[pb.TensorFrame | bytes]:
        try:
            node, task = self._task(request)
        except Refused as exc:
            context.abort(exc.code, exc.message)
        if task.state == "done":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"task {task.id} is already settled")
        for frame in task.payload.frames:
            if task.state == "done":
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"task {task.id} was settled during the download")
            node.last_seen = time.monotonic()
            # Data chunks go out pre-serialized: one copy of each chunk, straight from the global weights.
            yield serde.data_frame_wire(frame) if isinstance(frame, memoryview) else serde.frame_to_proto(frame)

    def SubmitResult(self, request_iterator: Iterator[bytes], context) -> pb.SubmitReply:
        """Messages arrive serialized (see ``add_to_server``): data chunks are decoded without a copy."""
        try:
            self._submit(request_iterator)
        except Refused as exc:
            context.abort(exc.code, exc.message)
        return pb.SubmitReply(accepted=True)

    def _submit(self, messages: Iterator[bytes]) -> None:
        first = _parse(_next(messages))
        if first is None or first.WhichOneof("message") != "header":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the first message of a submission must be a result header")
        node, task = self._task(first.header.task)
        self.registry.claim(task)
        try:
            outcome, permit = self._read(first.header, messages, node, task)
        except (ValueError, Refused) as exc:
            refusal = exc if isinstance(exc, Refused) else Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            self.registry.settle(task, Failure(node.node_id, f"invalid upload: {refusal.message}"))
            raise refusal from None
        except BaseException:
            self.registry.settle(task, Failure(node.node_id, "the coordinator failed while receiving the result"))
            raise
        if not self.registry.settle(task, outcome, permit):
            permit.release()
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"task {task.id} was settled (late); result discarded")

    def _read(self, header: pb.ResultHeader, messages: Iterator[bytes], node: Node,
              task: Task) -> tuple[Outcome, Permit]:
        """The outcome a submission carries, and the decode permit its weights hold (if any)."""
        kind = serde.result_kind(header)
        if kind in ("fit", "evaluate") and kind != task.kind:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"task {task.id} is {task.kind}, got a {kind} result")
        if kind != "fit":
            if _next(messages) is not None:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"a {kind} result carries no tensors")
            return serde.result_from_proto(header, node.node_id), Permit(None)
        permit = self._acquire(task)
        try:
            weights = self._receive(messages, node, task)
            return serde.result_from_proto(header, node.node_id, weights), permit
        except BaseException:
            permit.release()
            raise

    def _acquire(self, task: Task) -> Permit:
        """A decode slot; waits while others decode, gives up when the task is settled or late."""
        while not self.decodes.acquire(timeout=0.25):
            if task.state == "done" or time.monotonic() > task.deadline:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"task {task.id} ended while waiting to upload")
        task.permit = Permit(self.decodes)
        return task.permit

    def _receive(self, messages: Iterator[bytes], node: Node, task: Task):
        decoder = Decoder(expected=task.payload.spec, max_bytes=task.payload.nbytes, max_chunk=CHUNK_SIZE)
        while True:
            raw = _next(messages)
            if raw is None:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "truncated upload: the stream ended before End")
            frame = serde.submit_data_view(raw)
            if frame is None:
                message = _parse(raw)
                if message.WhichOneof("message") != "frame":
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a result header may only be the first message")
                frame = serde.frame_from_proto(message.frame)
            if isinstance(frame, bytes | memoryview) and len(frame) > CHUNK_SIZE:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"chunk of {len(frame)} bytes exceeds the limit of {CHUNK_SIZE}")
            if task.state == "done":
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"task {task.id} was settled during the upload")
            node.last_seen = time.monotonic()
            try:
                decoder.feed(frame)
            except TensorError as exc:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if "exceeds the limit" in str(exc) else \
                    grpc.StatusCode.INVALID_ARGUMENT
                raise Refused(code, str(exc)) from None
            if isinstance(frame, End):
                if _next(messages) is not None:
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "messages after the end of the tensor stream")
                return decoder.result()


def task_id(sequence: int) -> str:
    """A task id: the fleet's run counter (to tell stale ids from unknown ones) and a random part."""
    return f"{sequence}:{secrets.token_hex(8)}"


def task_sequence(task_id: str) -> int:
    """The run counter of a task id; -1 when it is not one of ours."""
    head = task_id.split(":", 1)[0]
    return int(head) if head.isdigit() and len(head) < 19 else -1


def add_to_server(servicer: FleetServicer, server: grpc.Server) -> None:
    """Register the service; downloads pass pre-serialized chunks through, uploads arrive serialized."""
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        "Register": unary(servicer.Register, request_deserializer=pb.RegisterRequest.FromString,
                          response_serializer=pb.RegisterReply.SerializeToString),
        "Heartbeat": unary(servicer.Heartbeat, request_deserializer=pb.NodeRef.FromString,
                           response_serializer=pb.HeartbeatReply.SerializeToString),
        "PullTask": unary(servicer.PullTask, request_deserializer=pb.NodeRef.FromString,
                          response_serializer=pb.PullTaskReply.SerializeToString),
        "DownloadWeights": grpc.unary_stream_rpc_method_handler(
            servicer.DownloadWeights, request_deserializer=pb.TaskRef.FromString, response_serializer=serde.serialize),
        "SubmitResult": grpc.stream_unary_rpc_method_handler(
            servicer.SubmitResult, request_deserializer=None, response_serializer=pb.SubmitReply.SerializeToString),
    }
    name = pb.DESCRIPTOR.services_by_name["Fleet"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


def _parse(raw: bytes | None) -> pb.SubmitMessage | None:
    if raw is None:
        return None
    try:
        return pb.SubmitMessage.FromString(raw)
    except DecodeError:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "undecodable submission message") from None


def _next(messages: Iterator[bytes]) -> bytes | None:
    """The next message, None at the end; a broken or cancelled stream counts as truncated."""
    try:
        return next(messages, None)
    except grpc.RpcError as exc:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"upload interrupted: {exc}") from None
