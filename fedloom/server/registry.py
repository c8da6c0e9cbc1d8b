"""The coordinator's node registry: who is registered, who is alive, which task each node holds.

Transport-neutral (no grpc): refusals carry the *name* of a status code,
which the gRPC service turns into a real status.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fedloom.codec import Frame, encode
from fedloom.tensors import NamedTensors
from fedloom.types import Failure, Instruction, Outcome

MAX_NODE_ID = 128
DOWNLOAD_CHUNK = 4 << 20


class Refused(Exception):
    """A request the service turns down; ``code`` names a gRPC status (e.g. ``"NOT_FOUND"``)."""

    def __init__(self, code: str, message: str):
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
    """What every node of one ``run`` downloads: the weights' frames, built once.

    Data frames are serialized on demand into a small cache shared by all downloads: nodes that download at
    the same time (the usual case: a round starts for all of them at once) share each message instead of
    building their own copy of it.
    """

    instruction: Instruction
    frames: list[Frame]
    spec: dict
    nbytes: int
    cache_size: int = 8
    _cache: OrderedDict[int, bytes] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, instruction: Instruction) -> Payload:
        weights = instruction.weights
        return cls(instruction, list(encode(weights, chunk_size=DOWNLOAD_CHUNK)), weights.spec(), weights.nbytes)

    def wire(self, index: int, serialize: Callable[[Frame], bytes]) -> bytes:
        """Frame ``index`` serialized by ``serialize``, from the cache when another download just built it."""
        with self._lock:
            message = self._cache.get(index)
            if message is not None:
                self._cache.move_to_end(index)
                return message
        message = serialize(self.frames[index])
        with self._lock:
            self._cache[index] = message
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return message

    def released(self) -> Payload:
        """The same without the weights: a settled task must not keep a past round's model alive."""
        return Payload(replace(self.instruction, weights=NamedTensors()), [], self.spec, self.nbytes)


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
    fold: Any = None  # a StreamingFold: the upload is folded tensor by tensor as it arrives

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
        """The caller's node, refreshed; Refused(NOT_FOUND) if unknown or the session is not the current one.

        A stale session means the node must register again, so it is NOT_FOUND, like an unknown node;
        UNAUTHENTICATED and PERMISSION_DENIED are kept for credentials, which registering cannot fix.
        """
        with self.cond:
            node = self.nodes.get(node_id)
            if node is None:
                raise Refused("NOT_FOUND", f"unknown node {node_id[:MAX_NODE_ID]!r}: register first")
            if not secrets.compare_digest(node.session.encode(), session.encode()):
                raise Refused("NOT_FOUND", f"stale or wrong session for node {node_id!r}: register again")
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
        task.payload, task.fold = task.payload.released(), None  # keep no past round's model or aggregate alive
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
                raise Refused("FAILED_PRECONDITION", f"task {task.id} {why}; submission refused")
            task.state = "submitting"

    def finish(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def all_told(self) -> bool:
        """Whether every live node has been told that the run is finished."""
        with self.cond:
            return all(self.nodes[n].told_finished for n in self.alive_ids())


def task_id(sequence: int) -> str:
    """A task id: the fleet's run counter (to tell stale ids from unknown ones) and a random part."""
    return f"{sequence}:{secrets.token_hex(8)}"


def task_sequence(task_id: str) -> int:
    """The run counter of a task id; -1 when it is not one of ours."""
    head = task_id.split(":", 1)[0]
    return int(head) if head.isdigit() and len(head) < 19 else -1
