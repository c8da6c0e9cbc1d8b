"""A coordinator killed with SIGKILL at any point of a round resumes and ends bit-identical.

Real processes: a ``fedloom server`` and two ``fedloom client`` nodes on
loopback. The server is killed (``FEDLOOM_CRASH``, see
``fedloom.server.faults``, or by this test from outside), restarted with
``--resume`` on the same port, and the nodes reconnect by themselves. With a
fixed seed, each node's training is seeded from (seed, round, node), so the
final model must equal an uninterrupted run's byte for byte.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from processes import finish, free_port, launch, logs  # the test directories are not packages

from fedloom.rundir import RunDir
from fedloom.server import runstate

pytestmark = pytest.mark.slow

ROUNDS = 3


def _server(port: int, run_dir: Path, log: Path, *, resume: bool = False, **env: str) -> subprocess.Popen:
    where = ["--resume", str(run_dir)] if resume else ["--run-dir", str(run_dir)]
    return launch(["server", "--insecure", "--address", f"127.0.0.1:{port}", "--rounds", str(ROUNDS),
                   "--min-clients", "2", "--epochs", "1", "--seed", "7", "--round-timeout", "60",
                   "--wait-timeout", "60", *where], log, **env)


def _nodes(port: int, tmp_path: Path) -> list[subprocess.Popen]:
    return [launch(["client", "--insecure", "--server", f"127.0.0.1:{port}", "--partition", str(i),
                    "--num-partitions", "2", "--connect-timeout", "60"], tmp_path / f"node{i}.log")
            for i in range(2)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    """The final model of an uninterrupted run."""
    tmp_path = tmp_path_factory.mktemp("straight")
    port = free_port()
    procs = [_server(port, tmp_path / "run", tmp_path / "server.log"), *_nodes(port, tmp_path)]
    assert finish(procs, 90) == [0, 0, 0], logs(tmp_path)
    return (tmp_path / "run" / "model.safetensors").read_bytes()


def _kill_from_outside(server: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL once round 1 is recorded: the server is then between checkpoints, inside round 2."""
    deadline = time.monotonic() + 60
    while not RunDir(run_dir).records() and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # polling the run directory with a deadline
    server.send_signal(signal.SIGKILL)


# point -> (the round the run state holds after the crash, metrics lines on disk after the crash)
CRASHES = {
    "mid-round:2": (1, 1),
    "after-checkpoint:2": (2, 1),  # the state is one round ahead of metrics.jsonl and model.safetensors
    "in-checkpoint:2": (1, 1),  # a torn temporary file; the previous state stays intact
    "outside": (None, 1),
}


@pytest.mark.parametrize("crash", list(CRASHES))
def test_killed_coordinator_resumes_to_the_same_model(tmp_path: Path, reference: bytes, crash: str) -> None:
    port, run_dir = free_port(), tmp_path / "run"
    env = {} if crash == "outside" else {"FEDLOOM_CRASH": crash}
    server = _server(port, run_dir, tmp_path / "server.log", **env)
    nodes = _nodes(port, tmp_path)
    try:
        if crash == "outside":
            _kill_from_outside(server, run_dir)
        assert finish([server], 60) == [-signal.SIGKILL], logs(tmp_path)
        state_round, lines = CRASHES[crash]
        if state_round is not None:
            assert runstate.load(run_dir).round == state_round
            assert len(RunDir(run_dir).records()) == lines
        if crash.startswith("in-checkpoint"):
            assert (run_dir / ".state.safetensors.crash").exists()
        restarted = _server(port, run_dir, tmp_path / "server.log", resume=True)
        codes = finish([restarted, *nodes], 90)
    finally:
        finish(nodes, 5)
    assert codes == [0, 0, 0], logs(tmp_path)
    assert [r["round"] for r in RunDir(run_dir).records()] == list(range(1, ROUNDS + 1)), logs(tmp_path)
    assert (run_dir / "model.safetensors").read_bytes() == reference
    assert not list(run_dir.glob(".*.crash")), "leftovers of the torn write are cleaned up"
    assert f"resuming {run_dir}" in (tmp_path / "server.log").read_text().replace("\n", "")
