"""A coordinator killed with SIGKILL at any point of a round resumes and ends bit-identical.

Real processes: a ``fedloom server`` and two ``fedloom client`` nodes on
loopback. The server is killed (``FEDLOOM_CRASH``, see
``fedloom.server.faults``, or by this test from outside), restarted with
``--resume`` on the same port, and the nodes reconnect by themselves. With a
fixed seed, each node's training is seeded from (seed, round, node), so the
final model must equal an uninterrupted run's byte for byte.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedloom.rundir import RunDir
from fedloom.server import runstate

pytestmark = pytest.mark.slow

ROUNDS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fedloom.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)


def _server(port: int, run_dir: Path, log: Path, *, resume: bool = False, **env: str) -> subprocess.Popen:
    where = ["--resume", str(run_dir)] if resume else ["--run-dir", str(run_dir)]
    return _launch(["server", "--insecure", "--address", f"127.0.0.1:{port}", "--rounds", str(ROUNDS),
                    "--min-clients", "2", "--epochs", "1", "--seed", "7", "--round-timeout", "60",
                    "--wait-timeout", "60", *where], log, **env)


def _nodes(port: int, tmp_path: Path) -> list[subprocess.Popen]:
    return [_launch(["client", "--insecure", "--server", f"127.0.0.1:{port}", "--partition", str(i),
                     "--num-partitions", "2", "--connect-timeout", "60"], tmp_path / f"node{i}.log")
            for i in range(2)]


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append(None)
    return codes


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(tmp_path.glob("*.log")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    """The final model of an uninterrupted run."""
    tmp_path = tmp_path_factory.mktemp("straight")
    port = _free_port()
    procs = [_server(port, tmp_path / "run", tmp_path / "server.log"), *_nodes(port, tmp_path)]
    assert _wait(procs, 90) == [0, 0, 0], _logs(tmp_path)
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
    port, run_dir = _free_port(), tmp_path / "run"
    env = {} if crash == "outside" else {"FEDLOOM_CRASH": crash}
    server = _server(port, run_dir, tmp_path / "server.log", **env)
    nodes = _nodes(port, tmp_path)
    try:
        if crash == "outside":
            _kill_from_outside(server, run_dir)
        assert _wait([server], 60) == [-signal.SIGKILL], _logs(tmp_path)
        state_round, lines = CRASHES[crash]
        if state_round is not None:
            assert runstate.load(run_dir).round == state_round
            assert len(RunDir(run_dir).records()) == lines
        if crash.startswith("in-checkpoint"):
            assert (run_dir / ".state.safetensors.crash").exists()
        restarted = _server(port, run_dir, tmp_path / "server.log", resume=True)
        codes = _wait([restarted, *nodes], 90)
    finally:
        _wait(nodes, 5)
    assert codes == [0, 0, 0], _logs(tmp_path)
    assert [r["round"] for r in RunDir(run_dir).records()] == list(range(1, ROUNDS + 1)), _logs(tmp_path)
    assert (run_dir / "model.safetensors").read_bytes() == reference
    assert not list(run_dir.glob(".*.crash")), "leftovers of the torn write are cleaned up"
    assert f"resuming {run_dir}" in (tmp_path / "server.log").read_text().replace("\n", "")
