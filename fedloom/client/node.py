"""The node loop: dial out to a coordinator, pull tasks, train, send results back.

A node sits behind NAT, so it makes every call: register, heartbeat (in a
background thread), pull a task, download its weights, run the trainer through
``fedloom.client.trainer.execute`` and stream the result up. When the
coordinator is down or restarts, the node retries with exponential backoff and
jitter and registers again; it gives up with ``CoordinatorUnreachable`` (naming
the address) after ``connect_timeout`` seconds without contact, and returns
when the coordinator says the run is finished.

With ``ClientSecurity`` the node dials over TLS (trusting the federation's
CA, optionally presenting a client certificate) and signs every request with
its Ed25519 key (``fedloom.security.signing``). A refusal of its credentials
(UNAUTHENTICATED, PERMISSION_DENIED) is final: ``CredentialsRefused``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedloom.buffers import Recycler
from fedloom.client.trainer import Trainer, execute
from fedloom.codec import Decoder, encode
from fedloom.protos import serde
from fedloom.protos.fedloom.protos import fleet_pb2 as pb
from fedloom.security import keys, signing
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
RECONNECT = (grpc.StatusCode.NOT_FOUND,)  # the coordinator forgot us (restart, stale session): register again
TASK_LOST = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)  # pull the next task
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)  # our credentials: final
SERVICE = "/" + pb.DESCRIPTOR.services_by_name["Fleet"].full_name


class CoordinatorUnreachable(ConnectionError):
    """No contact with the coordinator for ``connect_timeout`` seconds."""


class CredentialsRefused(ConnectionError):
    """The coordinator refused this node's credentials; retrying cannot help."""


@dataclass(frozen=True)
class ClientSecurity:
    """How a node dials: TLS trusting ``root_ca`` (None: plaintext), an optional client certificate for
    mutual TLS, and the Ed25519 key that signs its requests (None: unsigned)."""

    root_ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    signing_key: ed25519.Ed25519PrivateKey | None = None
    server_name: str | None = None  # the name to expect in the coordinator's certificate, if not the address's

    @classmethod
    def from_files(cls, *, root_ca: str | Path | None, node_key: str | Path | None,
                   tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                   insecure: bool = False, server_name: str | None = None) -> ClientSecurity:
        """Load and check the files; KeyFileError/ValueError with a clear message when something is off."""
        if insecure:
            if root_ca or tls_cert or tls_key:
                raise ValueError("--insecure dials plaintext: drop --root-ca, --tls-cert and --tls-key")
        elif not root_ca:
            raise ValueError("TLS is on by default: pass --root-ca (the federation's ca.crt, see `fedloom keys`), "
                             "or --insecure for a local experiment")
        elif not node_key:
            raise ValueError("a TLS coordinator admits only known nodes: pass --node-key (see `fedloom keys`)")
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("mutual TLS needs both --tls-cert and --tls-key")
        ca = keys.load_certificate(root_ca, "root CA")[0] if root_ca else None
        cert, key = keys.load_tls_pair(tls_cert, tls_key, "client TLS") if tls_cert else (None, None)
        signer = keys.load_signing_key(node_key) if node_key else None
        return cls(root_ca=ca, cert=cert, key=key, signing_key=signer, server_name=server_name)

    def channel(self, server: str, options: list) -> grpc.Channel:
        if self.root_ca is None:
            return grpc.insecure_channel(server, options=options)
        if self.server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        credentials = grpc.ssl_channel_credentials(root_certificates=self.root_ca, private_key=self.key,
                                                   certificate_chain=self.cert)
        return grpc.secure_channel(server, credentials, options=options)


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
                 max_backoff: float = 5.0, max_download_bytes: int = 1 << 40, rpc_timeout: float = 30.0,
                 security: ClientSecurity | None = None):
        if not node_id or len(node_id) > 128 or not node_id.isprintable():
            raise ValueError(f"node id must be 1..128 printable characters, got {node_id[:128]!r}")
        self.trainer, self.server, self.node_id = trainer, server, node_id
        self.max_download_bytes = max_download_bytes
        self.rpc_timeout = rpc_timeout
        self.backoff = Backoff(give_up_after=connect_timeout, cap=max_backoff)
        self.security = security or ClientSecurity()
        self.channel = self.security.channel(server, CHANNEL_OPTIONS)
        # Requests go out as bytes, so the signature covers exactly what is sent; bulk calls also bypass
        # message objects for data chunks (see serde's raw data frames).
        self._unary = {name: self.channel.unary_unary(f"{SERVICE}/{name}", response_deserializer=reply.FromString)
                       for name, reply in (("Register", pb.RegisterReply), ("Heartbeat", pb.HeartbeatReply),
                                           ("PullTask", pb.PullTaskReply))}
        self._download = self.channel.unary_stream(f"{SERVICE}/DownloadWeights", response_deserializer=None)
        self._submit = self.channel.stream_unary(f"{SERVICE}/SubmitResult", request_serializer=serde.serialize,
                                                 response_deserializer=pb.SubmitReply.FromString)
        self.ref: pb.NodeRef | None = None
        self.interval = 0.1  # until the coordinator says how often it wants a heartbeat
        self.finished = threading.Event()
        self._stop = threading.Event()
        self.tasks_done = 0
        self._buffers = Recycler()  # last round's weights' memory, reused once nothing holds them

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
        reply = self._call("PullTask", self.ref, timeout=self.rpc_timeout)
        which = reply.WhichOneof("reply")
        if which == "finished":
            self.finished.set()
        elif which == "task":
            self._do(reply.task)
        else:
            self.finished.wait(max(0.0, reply.retry_after))

    def _signed(self, name: str, raw: bytes) -> list[tuple[str, str]] | None:
        key = self.security.signing_key
        return None if key is None else signing.sign(key, f"{SERVICE}/{name}", self.node_id, raw)

    def _call(self, name: str, request, *, timeout: float):
        raw = request.SerializeToString()
        return self._unary[name](raw, timeout=timeout, metadata=self._signed(name, raw))

    def _recover(self, exc: grpc.RpcError) -> None:
        code = exc.code()
        if code in REFUSED:
            raise CredentialsRefused(f"the coordinator at {self.server} refused node {self.node_id!r}: "
                                     f"{code.name}: {exc.details()}") from None
        if code in RECONNECT:
            log.warning("node %s: coordinator does not know this session (%s); registering again",
                        self.node_id, exc.details())
            self.ref = None
            self.backoff.reset()
        elif code in TASK_LOST:
            log.warning("node %s: task refused (%s: %s)", self.node_id, code.name, exc.details())
            self.backoff.reset()
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # rate-limited or too large: the coordinator is there
            pause = self.backoff.delay()
            self.backoff.since = time.monotonic()
            log.warning("node %s: %s; pausing %.2fs", self.node_id, exc.details(), pause)
            self.finished.wait(pause)
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
            reply = self._call("Register", pb.RegisterRequest(node_id=self.node_id), timeout=self.rpc_timeout)
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
                if self._call("Heartbeat", ref, timeout=max(self.interval, 1.0)).finished:
                    self.finished.set()
            except grpc.RpcError as exc:  # the main loop sees the same trouble and handles it
                log.debug("node %s: heartbeat failed: %s", self.node_id, exc.code())

    # ------------------------------------------------------------- one task

    def _do(self, header: pb.TaskHeader) -> None:
        ref = pb.TaskRef(node=self.ref, task_id=header.task_id)
        self._buffers.next_round()
        decoder = Decoder(max_bytes=self.max_download_bytes, buffer=self._buffers.take)
        outcome: Outcome
        request = ref.SerializeToString()
        try:
            for raw in self._download(request, metadata=self._signed("DownloadWeights", request)):
                chunk = serde.data_frame_view(raw)
                decoder.feed(chunk if chunk is not None else serde.frame_from_proto(pb.TensorFrame.FromString(raw)))
            instruction = serde.instruction_from_proto(header, decoder.result())
        except (TensorError, ValueError) as exc:
            outcome = Failure(self.node_id, f"bad task from the coordinator: {exc}")
        else:
            del decoder
            outcome = execute(self.trainer, self.node_id, instruction)
            del instruction
        first = pb.SubmitMessage(header=serde.result_header_to_proto(outcome, ref)).SerializeToString()
        self._submit(_upload(outcome, first), timeout=None, metadata=self._signed("SubmitResult", first))
        self.tasks_done += 1


def _upload(outcome: Outcome, first: bytes) -> Iterator[pb.SubmitMessage | bytes]:
    """The submission stream: the (signed) result header, then for a fit the weights' frames (chunks
    pre-serialized)."""
    yield first
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
