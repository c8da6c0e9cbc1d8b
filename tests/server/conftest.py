"""Fixtures shared by the gRPC tests: a started fleet and in-process node loops against it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from fedloom.client import node as node_loop
from fedloom.server.grpc_fleet import GrpcFleet


@pytest.fixture
def fleet() -> Iterator[GrpcFleet]:
    fleet = GrpcFleet(heartbeat_interval=0.2, heartbeat_timeout=1.5, poll_wait=0.2)
    fleet.start("127.0.0.1:0")
    yield fleet
    fleet.close()


@pytest.fixture
def nodes(fleet: GrpcFleet) -> Iterator[Callable[[str, object], threading.Thread]]:
    """Start in-process node loops against ``fleet``; they must all exit once it closes."""
    threads: list[threading.Thread] = []
    errors: list[BaseException] = []

    def start(node_id: str, trainer) -> threading.Thread:
        def target() -> None:
            try:
                node_loop.run(trainer, f"127.0.0.1:{fleet.port}", node_id=node_id, connect_timeout=10)
            except BaseException as exc:  # surfaced by the fixture
                errors.append(exc)

        thread = threading.Thread(target=target, name=node_id, daemon=True)
        thread.start()
        threads.append(thread)
        return thread

    yield start
    fleet.close()
    for thread in threads:
        thread.join(timeout=15)
        assert not thread.is_alive(), f"node {thread.name} did not exit after the run finished"
    assert not errors, errors
