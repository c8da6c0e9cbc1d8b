"""The coordinator's gRPC service.

Nodes dial out: they register, heartbeat, pull a task, download its weights
and submit a result. Every request arrives as raw bytes and passes the
``Guard`` (signature, node identity, rate limit) before it is parsed further;
the servicer validates every message and refuses anything malformed with a
precise status, so one bad node costs one task and nothing else:

- INVALID_ARGUMENT: malformed messages, ids, frames, shapes, dtypes, truncated uploads;
- NOT_FOUND: unknown node, stale session (register again) or unknown task;
- UNAUTHENTICATED / PERMISSION_DENIED: missing, bad or foreign credentials (see ``grpc_auth``);
- FAILED_PRECONDITION: a stale, late or duplicate submission;
- RESOURCE_EXHAUSTED: a chunk, a message or a stream larger than allowed; too many calls.

Memory stays bounded by the model, not the number of nodes: weights are
encoded once per round and every download streams from the same arrays, and a
semaphore bounds how many uploads are decoded at once; a decoded update keeps
its permit until the driver has folded it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import grpc
from google.protobuf.message import DecodeError

from fedloom.codec import CHUNK_SIZE, Decoder, End
from fedloom.protos import serde
from fedloom.protos.fedloom.protos import fleet_pb2 as pb
from fedloom.server.grpc_auth import Guard
from fedloom.server.registry import MAX_NODE_ID, Node, Permit, Refused, Registry, Task, task_sequence
from fedloom.strategies.pipeline import Rejected
from fedloom.strategies.streaming import StreamingFold
from fedloom.tensors import NamedTensors, TensorError
from fedloom.types import Failure, FitRes, Outcome

SERVICE = pb.DESCRIPTOR.services_by_name["Fleet"].full_name
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", serde.MAX_MESSAGE),
    ("grpc.max_send_message_length", serde.MAX_MESSAGE),
    # No BDP probing: it grows each stream's receive window, and uploads waiting for a decode slot would
    # then park megabytes each in gRPC's buffers (measured: +25 MB per waiting node), growing with the fleet.
    ("grpc.http2.bdp_probe", 0),
]
MIN_MEAN_CHUNK = 64 * 1024  # an upload may not be split into chunks smaller than this on average


def method_path(name: str) -> str:
    return f"/{SERVICE}/{name}"


def max_messages(task: Task) -> int:
    """How many frames an upload for ``task`` may take: a header and an end per tensor, a little slack,
    and data chunks of at least ``MIN_MEAN_CHUNK`` bytes on average (the node's encoder uses 4 MiB)."""
    return 2 * len(task.payload.spec) + task.payload.nbytes // MIN_MEAN_CHUNK + 16


class FleetServicer:
    """The RPCs a node calls; see ``protos/fedloom/protos/fleet.proto``. Requests arrive parsed and checked."""

    def __init__(self, registry: Registry, *, max_decodes: int = 2, poll_wait: float = 1.0,
                 guard: Guard | None = None):
        if max_decodes < 1:
            raise ValueError(f"max_decodes must be at least 1, got {max_decodes}")
        self.registry = registry
        self.decodes = threading.Semaphore(max_decodes)
        self.poll_wait = poll_wait
        self.guard = guard or Guard()

    # ------------------------------------------------------------- session

    def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterReply:
        node_id = request.node_id
        if not node_id or len(node_id) > MAX_NODE_ID or not node_id.isprintable():
            raise Refused("INVALID_ARGUMENT",
                          f"node id must be 1..{MAX_NODE_ID} printable characters, got {node_id[:MAX_NODE_ID]!r}")
        session = self.registry.register(node_id)
        return pb.RegisterReply(session=session, heartbeat_interval=self.registry.heartbeat_interval)

    def Heartbeat(self, request: pb.NodeRef, context) -> pb.HeartbeatReply:
        node = self.registry.touch(request.node_id, request.session)
        with self.registry.cond:
            if self.registry.finished:
                node.told_finished = True
            return pb.HeartbeatReply(finished=self.registry.finished)

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
                    raise Refused("FAILED_PRECONDITION",
                                  f"task {ref.task_id[:80]!r} is stale; node {node.node_id!r} now holds {task.id}")
                raise Refused("NOT_FOUND", f"node {node.node_id!r} holds no task {ref.task_id[:80]!r}")
            return node, task

    def DownloadWeights(self, request: pb.TaskRef, context) -> Iterator[pb.TensorFrame | bytes]:
        node, task = self._task(request)
        payload = task.payload  # before the check: settling swaps in a payload without frames
        if task.state == "done":
            raise Refused("FAILED_PRECONDITION", f"task {task.id} is already settled")
        for index, frame in enumerate(payload.frames):
            if task.state == "done":
                raise Refused("FAILED_PRECONDITION", f"task {task.id} was settled during the download")
            node.last_seen = time.monotonic()
            # Data chunks go out pre-serialized: one copy of each chunk, straight from the global weights,
            # shared by the downloads that need it at about the same time.
            yield payload.wire(index, serde.data_frame_wire) if isinstance(frame, memoryview) \
                else serde.frame_to_proto(frame)

    def SubmitResult(self, first: pb.SubmitMessage, messages: Iterator[bytes], context) -> pb.SubmitReply:
        """``first`` is the (checked) result header; the rest arrive serialized, chunks decoded without a copy."""
        if first.WhichOneof("message") != "header":
            raise Refused("INVALID_ARGUMENT", "the first message of a submission must be a result header")
        node, task = self._task(first.header.task)
        self.registry.claim(task)
        try:
            outcome, permit = self._read(first.header, messages, node, task)
        except (ValueError, Refused) as exc:
            refusal = exc if isinstance(exc, Refused) else Refused("INVALID_ARGUMENT", str(exc))
            self.registry.settle(task, Failure(node.node_id, f"invalid upload: {refusal.message}"))
            raise refusal from None
        except BaseException:
            self.registry.settle(task, Failure(node.node_id, "the coordinator failed while receiving the result"))
            raise
        if not self.registry.settle(task, outcome, permit):
            permit.release()
            raise Refused("FAILED_PRECONDITION", f"task {task.id} was settled (late); result discarded")
        return pb.SubmitReply(accepted=True)

    def _read(self, header: pb.ResultHeader, messages: Iterator[bytes], node: Node,
              task: Task) -> tuple[Outcome, Permit]:
        """The outcome a submission carries, and the decode permit its weights hold (if any)."""
        kind = serde.result_kind(header)
        if kind in ("fit", "evaluate") and kind != task.kind:
            raise Refused("INVALID_ARGUMENT", f"task {task.id} is {task.kind}, got a {kind} result")
        if kind != "fit":
            if _next(messages) is not None:
                raise Refused("INVALID_ARGUMENT", f"a {kind} result carries no tensors")
            return serde.result_from_proto(header, node.node_id), Permit(None)
        fold = task.fold  # read once: settling the task clears it
        permit = self._acquire(task)
        if fold is not None:
            try:
                return self._stream(header, messages, node, task, fold), Permit(None)
            finally:
                permit.release()  # nothing of a streamed upload outlives it
        try:
            weights = self._receive(messages, node, task)
            return serde.result_from_proto(header, node.node_id, weights), permit
        except BaseException:
            permit.release()
            raise

    def _stream(self, header: pb.ResultHeader, messages: Iterator[bytes], node: Node, task: Task,
                fold: StreamingFold) -> Outcome:
        """Fold the upload into the round's aggregate tensor by tensor, straight from the received chunks."""
        outcome = serde.result_from_proto(header, node.node_id, NamedTensors())
        assert isinstance(outcome, FitRes)
        try:
            upload = fold.open(node.node_id, outcome.num_examples)
            self._receive(messages, node, task, on_tensor=upload.add)
        except Rejected as exc:
            raise Refused("INVALID_ARGUMENT", f"rejected: {exc.reason}") from None
        return replace(outcome, folded=True)

    def _acquire(self, task: Task) -> Permit:
        """A decode slot; waits while others decode, gives up when the task is settled or late."""
        while not self.decodes.acquire(timeout=0.25):
            if task.state == "done" or time.monotonic() > task.deadline:
                raise Refused("FAILED_PRECONDITION", f"task {task.id} ended while waiting to upload")
        task.permit = Permit(self.decodes)
        return task.permit

    def _receive(self, messages: Iterator[bytes], node: Node, task: Task, **stream):
        decoder = Decoder(expected=task.payload.spec, max_bytes=task.payload.nbytes, max_chunk=CHUNK_SIZE,
                          **stream)
        limit = max_messages(task)
        for _ in range(limit):
            raw = _next(messages)
            if raw is None:
                # a peer that dies mid-upload shows up as an RpcError or, when gRPC sees the end of the stream
                # before the cancellation, as this: from here the two cannot be told apart
                raise Refused("INVALID_ARGUMENT", "upload interrupted or truncated: the stream ended before End")
            frame = serde.submit_data_view(raw)
            if frame is None:
                message = _parse(pb.SubmitMessage, raw)
                if message.WhichOneof("message") != "frame":
                    raise Refused("INVALID_ARGUMENT", "a result header may only be the first message")
                frame = serde.frame_from_proto(message.frame)
            if isinstance(frame, bytes | memoryview) and len(frame) > CHUNK_SIZE:
                raise Refused("RESOURCE_EXHAUSTED", f"chunk of {len(frame)} bytes exceeds the limit of {CHUNK_SIZE}")
            if task.state == "done":
                raise Refused("FAILED_PRECONDITION", f"task {task.id} was settled during the upload")
            node.last_seen = time.monotonic()
            try:
                decoder.feed(frame)
            except TensorError as exc:
                code = "RESOURCE_EXHAUSTED" if "exceeds the limit" in str(exc) else "INVALID_ARGUMENT"
                raise Refused(code, str(exc)) from None
            if isinstance(frame, End):
                if _next(messages) is not None:
                    raise Refused("INVALID_ARGUMENT", "messages after the end of the tensor stream")
                return decoder.result()
        raise Refused("RESOURCE_EXHAUSTED", f"upload exceeds {limit} messages for a model of "
                                            f"{task.payload.nbytes} bytes (chunks too small)")


# ----------------------------------------------------------------- wiring


def _claimed_unary(request) -> str:
    """The node a unary request speaks for."""
    if isinstance(request, pb.TaskRef):
        return request.node.node_id
    return request.node_id


def _abort(context, exc: Refused):
    context.abort(grpc.StatusCode[exc.code], exc.message)


def _unary(servicer: FleetServicer, name: str, parse: type, method: Callable) -> Callable:
    """A raw-bytes unary handler: check the caller against the exact bytes, parse, serve; Refused -> status."""
    path = method_path(name)

    def handler(raw: bytes, context):
        try:
            request = _parse(parse, raw)
            servicer.guard.check(path, context, raw, _claimed_unary(request))
            return method(request, context)
        except (Refused, ValueError) as exc:
            _abort(context, exc if isinstance(exc, Refused) else Refused("INVALID_ARGUMENT", str(exc)))

    return handler


def _download(servicer: FleetServicer) -> Callable:
    path = method_path("DownloadWeights")

    def handler(raw: bytes, context):
        try:
            request = _parse(pb.TaskRef, raw)
            servicer.guard.check(path, context, raw, request.node.node_id)
            yield from servicer.DownloadWeights(request, context)
        except Refused as exc:
            _abort(context, exc)

    return handler


def _submit(servicer: FleetServicer) -> Callable:
    path = method_path("SubmitResult")

    def handler(messages: Iterator[bytes], context):
        try:
            raw = _next(messages)
            if raw is None:
                raise Refused("INVALID_ARGUMENT", "empty submission: expected a result header")
            first = _parse(pb.SubmitMessage, raw)
            servicer.guard.check(path, context, raw, first.header.task.node.node_id)
            return servicer.SubmitResult(first, messages, context)
        except Refused as exc:
            _abort(context, exc)

    return handler


def add_to_server(servicer: FleetServicer, server: grpc.Server) -> None:
    """Register the service: every request arrives as raw bytes, so signatures cover exactly what was sent."""
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        "Register": unary(_unary(servicer, "Register", pb.RegisterRequest, servicer.Register),
                          response_serializer=pb.RegisterReply.SerializeToString),
        "Heartbeat": unary(_unary(servicer, "Heartbeat", pb.NodeRef, servicer.Heartbeat),
                           response_serializer=pb.HeartbeatReply.SerializeToString),
        "PullTask": unary(_unary(servicer, "PullTask", pb.NodeRef, servicer.PullTask),
                          response_serializer=pb.PullTaskReply.SerializeToString),
        "DownloadWeights": grpc.unary_stream_rpc_method_handler(_download(servicer),
                                                                response_serializer=serde.serialize),
        "SubmitResult": grpc.stream_unary_rpc_method_handler(_submit(servicer),
                                                             response_serializer=pb.SubmitReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def _parse(message_type: type, raw: bytes):
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise Refused("INVALID_ARGUMENT", f"undecodable {message_type.__name__} message") from None


def _next(messages: Iterator[bytes]) -> bytes | None:
    """The next message, None at the end; a broken or cancelled stream counts as truncated."""
    try:
        return next(messages, None)
    except grpc.RpcError as exc:
        raise Refused("INVALID_ARGUMENT", f"upload interrupted: {exc}") from None
