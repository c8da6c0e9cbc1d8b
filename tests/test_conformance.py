"""One seeded federation over all three fleets: in-process, Ray, and real gRPC processes.

Design rule: the round logic is the same everywhere, so the same seed must give
the same global weights, bit for bit, whichever fleet carries the round.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedloom import simulate
from fedloom.rundir import load_model
from fedloom.workloads import digits

pytestmark = pytest.mark.slow
ROUNDS, SEED = 2, 5
FIT = {"epochs": 1, "lr": 0.05, "batch_size": 32}
WORK = digits(3, scheme="iid", seed=SEED)  # what `fedloom client --num-partitions 3 --seed 5` holds


def _simulated(fleet: str):
    return simulate(WORK.trainer, num_clients=3, rounds=ROUNDS, initial_weights=WORK.initial_weights(SEED),
                    seed=SEED, fit_config=FIT, fleet=fleet, num_cpus=0.5, round_timeout=300)


def _over_grpc(tmp_path: Path, *server_options: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "fedloom.cli"]
    common = ["--insecure", "--seed", str(SEED)]
    server = subprocess.Popen([*cli, "server", *common, "--address", f"127.0.0.1:{port}", "--rounds", str(ROUNDS),
                               "--min-clients", "3", "--epochs", "1", "--lr", "0.05", "--batch-size", "32",
                               "--run-dir", str(tmp_path), *server_options], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    nodes = [subprocess.Popen([*cli, "client", *common, "--server", f"127.0.0.1:{port}", "--partition", str(i),
                               "--num-partitions", "3", "--node-id", str(i)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(3)]
    try:
        _, err = server.communicate(timeout=240)
        assert server.returncode == 0, err.decode(errors="replace")[-2000:]
    finally:
        for node in nodes:
            node.kill() if node.poll() is None else None
            node.wait()
    return load_model(tmp_path / "model.safetensors")


def test_same_seed_same_weights_on_every_fleet(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray actors and node processes train on one thread: the same float paths
    try:
        local = _simulated("inprocess").weights
        on_ray = _simulated("ray").weights
    finally:
        torch.set_num_threads(threads)
    over_grpc = _over_grpc(tmp_path / "streamed")  # uploads folded tensor by tensor as they arrive
    decoded = _over_grpc(tmp_path / "decoded", "--no-stream-uploads")  # each update decoded whole, then folded
    assert not local.equal(WORK.initial_weights(SEED))
    assert on_ray.equal(local), "Ray fleet differs from the in-process fleet"
    assert over_grpc.equal(local), "gRPC deployment differs from the in-process fleet"
    assert decoded.equal(local), "gRPC deployment without streaming aggregation differs from the in-process fleet"
