"""The gRPC fleet: the Fleet protocol over nodes that dial in.

``run`` hands every selected node a task and yields outcomes as they arrive.
A node that fails, vanishes (no heartbeat within ``heartbeat_timeout``),
sends garbage or misses the deadline becomes a Failure; a result arriving
after the deadline is discarded and never aggregated, and an upload cut off
midway produces no partial update.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections.abc import Iterator, Sequence
from concurrent import futures

import grpc

from fedloom.server.grpc_auth import Guard, ServerSecurity
from fedloom.server.grpc_service import GRPC_OPTIONS, FleetServicer, add_to_server
from fedloom.server.registry import Payload, Permit, Registry, Task, task_id
from fedloom.strategies.streaming import StreamingFold
from fedloom.types import Failure, Instruction, Outcome

log = logging.getLogger("fedloom.grpc")


class GrpcFleet:
    """A coordinator-side fleet served over gRPC. ``start`` it, drive it, ``close`` it.

    ``security`` sets TLS (optionally mutual) and request signing; without it the fleet serves plaintext
    and admits any node (local experiments and tests). ``rate``/``burst`` bound each node's calls per second.
    ``stream_uploads``: fold fit uploads into the round's aggregate tensor by tensor as they arrive, for
    strategies that allow it (``fedloom.strategies.streaming``); the coordinator then holds about 2x the model.
    ``upload_window``: the HTTP/2 window of each upload stream. Larger is faster (64 KiB, gRPC's default, moved
    uploads 10-15 % slower in docs/benchmarks.md), but an upload waiting for a decode slot parks up to this much.
    """

    def __init__(
        self,
        *,
        heartbeat_interval: float = 2.0,
        heartbeat_timeout: float = 10.0,
        max_decodes: int = 2,
        max_workers: int = 128,
        poll_wait: float = 1.0,
        finish_grace: float | None = None,
        security: ServerSecurity | None = None,
        rate: float = 50.0,
        burst: float = 100.0,
        stream_uploads: bool = True,
        upload_window: int = 4 << 20,
    ):
        if heartbeat_timeout <= heartbeat_interval:
            raise ValueError(f"heartbeat_timeout ({heartbeat_timeout}) must exceed heartbeat_interval "
                             f"({heartbeat_interval})")
        if rate < 1 / heartbeat_interval + 1 / poll_wait:
            raise ValueError(f"rate ({rate:g}/s) must allow a node's heartbeats and polls "
                             f"({1 / heartbeat_interval + 1 / poll_wait:g}/s)")
        self.registry = Registry(heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout)
        self.security = security or ServerSecurity()
        self.servicer = FleetServicer(self.registry, max_decodes=max_decodes, poll_wait=poll_wait,
                                      guard=Guard(self.security, rate=rate, burst=burst))
        self._max_workers = max_workers
        if upload_window < 65_535:
            raise ValueError(f"upload_window must be at least 65535 bytes (HTTP/2's default), got {upload_window}")
        self._options = [*GRPC_OPTIONS, ("grpc.http2.lookahead_bytes", upload_window)]
        self.streams_uploads = stream_uploads
        self._finish_grace = finish_grace if finish_grace is not None else 2 * heartbeat_interval + poll_wait
        self._server: grpc.Server | None = None
        self._runs = itertools.count(1)
        self.port: int | None = None

    def start(self, address: str = "127.0.0.1:0") -> int:
        """Listen on ``address`` (HOST:PORT; port 0 picks a free one); returns the bound port."""
        if self._server is not None:
            raise RuntimeError("the fleet is already started")
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="fleet"),
                             options=self._options, maximum_concurrent_rpcs=self._max_workers)
        add_to_server(self.servicer, server)
        credentials = self.security.credentials()
        try:
            port = server.add_insecure_port(address) if credentials is None else \
                server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise ValueError(f"cannot listen on {address}: {exc}") from None
        if port == 0:
            raise ValueError(f"cannot listen on {address} (address in use or invalid)")
        server.start()
        self._server, self.port = server, port
        mode = "plaintext" if credentials is None else "mutual TLS" if self.security.tls.ca else "TLS"
        auth = "signed requests from authorized keys" if self.security.authorized_keys is not None else "any node"
        log.info("listening on %s (port %d, %s, admitting %s)", address, port, mode, auth)
        return port

    def wait_for_nodes(self, count: int, timeout: float) -> list[str]:
        return self.registry.wait_for(count, timeout)

    def run(self, instruction: Instruction, node_ids: Sequence[str], *, timeout: float,
            fold: StreamingFold | None = None) -> Iterator[Outcome]:
        if fold is not None and not self.streams_uploads:
            raise ValueError("this fleet was created with stream_uploads=False")
        deadline = time.monotonic() + timeout
        payload = Payload.of(instruction)  # frames built once; every download streams from the same arrays
        sink: queue.Queue = queue.Queue()
        sequence = next(self._runs)
        pending: dict[str, Task] = {}
        for node_id in dict.fromkeys(node_ids):
            if not self.registry.alive(node_id):
                yield Failure(node_id, "not connected")
                continue
            task = Task(task_id(sequence), node_id, payload, sink, deadline, fold=fold)
            pending[node_id] = task
            self.registry.assign(task)
        try:
            yield from self._collect(pending, sink, deadline, timeout)
        finally:
            for task in pending.values():
                self.registry.settle(task, None)
            _drain(sink)

    def _collect(self, pending: dict[str, Task], sink: queue.Queue, deadline: float,
                 timeout: float) -> Iterator[Outcome]:
        tick = self.registry.heartbeat_interval
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for node_id, task in list(pending.items()):
                    if self.registry.settle(task, None):
                        del pending[node_id]
                        yield Failure(node_id, f"missed the {timeout:g}s deadline")
                if not pending:
                    return
            try:
                task, outcome, permit = sink.get(timeout=max(0.01, min(remaining, tick)))
            except queue.Empty:
                yield from self._vanished(pending)
                continue
            if pending.get(task.node_id) is not task:  # from an earlier run; never aggregated
                _release(permit)
                continue
            del pending[task.node_id]
            try:
                yield outcome
            finally:
                _release(permit)  # the driver has folded it: the next upload may decode
                del outcome  # nor may this frame keep the update alive while it waits for the next one

    def _vanished(self, pending: dict[str, Task]) -> Iterator[Outcome]:
        for node_id, task in list(pending.items()):
            if not self.registry.alive(node_id) and self.registry.settle(task, None):
                del pending[node_id]
                timeout = self.registry.heartbeat_timeout
                yield Failure(node_id, f"vanished: no heartbeat for more than {timeout:g}s")

    def close(self) -> None:
        """Tell nodes the run is over (they exit), then stop serving."""
        server, self._server = self._server, None
        if server is None:
            return
        self.registry.finish()
        deadline = time.monotonic() + self._finish_grace
        while not self.registry.all_told() and time.monotonic() < deadline:
            with self.registry.cond:
                self.registry.cond.wait(0.05)
        server.stop(grace=1.0).wait()

    def __enter__(self) -> GrpcFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release(permit: Permit | None) -> None:
    if permit is not None:
        permit.release()


def _drain(sink: queue.Queue) -> None:
    while True:
        try:
            _task, _outcome, permit = sink.get_nowait()
        except queue.Empty:
            return
        _release(permit)
