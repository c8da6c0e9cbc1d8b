"""Nodes dying with SIGKILL: in every round, and halfway through an upload. Real node processes (no torch)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedloom.server.driver import Driver, RunConfig
from fedloom.server.grpc_fleet import GrpcFleet
from fedloom.strategies import fedavg
from fedloom.tensors import NamedTensors

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("chaos_node.py")
NODES = 10
ROUNDS = 3
KILLED = {r: {f"n{(3 * r + k) % NODES}" for k in range(3)} for r in range(1, ROUNDS + 1)}  # 30% per round


def _spawn(port: int, node_id: str, log: Path, *, die: str = "", mode: str = "train") -> subprocess.Popen:
    index = int(node_id[1:])
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, str(SCRIPT), "--port", str(port), "--node-id", node_id,
                                 "--delta", str(index + 1), "--examples", str(index + 1), "--die", die,
                                 "--die-mode", mode], stdout=out, stderr=subprocess.STDOUT)


def _poll(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling with a deadline


@pytest.fixture
def fleet():
    fleet = GrpcFleet(heartbeat_interval=0.2, heartbeat_timeout=1.5, poll_wait=0.2)
    fleet.start("127.0.0.1:0")
    yield fleet
    fleet.close()


def _expected_step(alive: set[str]) -> float:
    """FedAvg of the survivors by hand: node i adds i+1 with weight i+1, so the step is sum (i+1)^2 / sum (i+1)."""
    sizes = [int(n[1:]) + 1 for n in alive]
    return sum(s * s for s in sizes) / sum(sizes)


def test_rounds_complete_when_30_percent_of_nodes_die_every_round(fleet, tmp_path: Path) -> None:
    ids = [f"n{i}" for i in range(NODES)]
    schedule = {n: ",".join(str(r) for r in KILLED if n in KILLED[r]) for n in ids}
    procs = {n: _spawn(fleet.port, n, tmp_path / f"{n}.log", die=schedule[n]) for n in ids}
    initial = NamedTensors({"w": np.zeros(3, np.float32)})
    config = RunConfig(rounds=ROUNDS, min_clients=NODES, min_results=5, round_timeout=30, wait_timeout=30, seed=1)
    driver = Driver(fleet, fedavg(), initial, config)
    expected = np.zeros(3, np.float64)
    try:
        for rnd in range(1, ROUNDS + 1):
            before = {n: fleet.registry.nodes.get(n) for n in ids}
            record = driver.run_round()
            assert record.num_results == NODES - 3, record.failures
            assert set(record.failures) == KILLED[rnd], record.failures
            expected += _expected_step(set(ids) - KILLED[rnd])
            np.testing.assert_allclose(driver.weights["w"], expected.astype(np.float32), rtol=1e-6)
            for node_id in KILLED[rnd]:  # a supervisor restarts what died; the new process registers again
                assert procs[node_id].wait(10) == -9
                procs[node_id] = _spawn(fleet.port, node_id, tmp_path / f"{node_id}.log", die=schedule[node_id])
            _poll(lambda b=before: all(fleet.registry.nodes[n] is not b[n] for n in KILLED[rnd]), 20,  # noqa: B023
                  "restarted nodes")
    finally:
        fleet.close()
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_a_node_killed_mid_upload_contributes_nothing(fleet, tmp_path: Path) -> None:
    good = _spawn(fleet.port, "n0", tmp_path / "n0.log")
    dying = _spawn(fleet.port, "n9", tmp_path / "n9.log", die="1", mode="upload")
    initial = NamedTensors({"w": np.zeros(3 << 20, np.float32)})  # 12 MiB: three chunks, the node dies after one
    config = RunConfig(rounds=1, min_clients=2, round_timeout=30, wait_timeout=30)
    try:
        record = Driver(fleet, fedavg(), initial, config).run_round()
        assert dying.wait(10) == -9
    finally:
        fleet.close()
        for proc in (good, dying):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert record.num_results == 1 and set(record.failures) == {"n9"}, record.failures
    assert "upload interrupted" in record.failures["n9"], record.failures  # the cut stream, not a timeout
    assert record.metrics["train_loss"] == 1.0  # only n0's update (delta 1) was folded
