"""End to end: a real ``fedloom server`` and ``fedloom client`` processes on loopback (plaintext, and TLS)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import finish, free_port, launch, logs  # the test directories are not packages

pytestmark = pytest.mark.slow

ROUNDS = 10


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _federation(tmp_path: Path, *, epochs: int, min_clients: int, rounds: int = ROUNDS, server_args: tuple = (),
                client_args: tuple = ()) -> tuple[subprocess.Popen, list, Path]:
    port = free_port()
    run_dir = tmp_path / "run"
    server = launch(["server", "--insecure", "--address", f"127.0.0.1:{port}", "--rounds", str(rounds),
                     "--min-clients", str(min_clients), "--epochs", str(epochs), "--round-timeout", "60",
                     "--wait-timeout", "60", "--run-dir", str(run_dir), *server_args], tmp_path / "server.log")
    clients = [launch(["client", "--insecure", "--server", f"127.0.0.1:{port}", "--partition", str(i),
                       "--num-partitions", "3", "--connect-timeout", "60", *client_args], tmp_path / f"client{i}.log")
               for i in range(3)]
    return server, clients, run_dir


def test_three_nodes_reach_90_percent(tmp_path: Path) -> None:
    server, clients, run_dir = _federation(tmp_path, epochs=2, min_clients=3)
    codes = finish([server, *clients], timeout=120)
    assert codes == [0, 0, 0, 0], logs(tmp_path)
    records = _records(run_dir)
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    assert max(r["accuracy"] for r in records) >= 0.90, records
    assert all(r["num_results"] == 3 and r["num_failures"] == 0 for r in records), records
    assert (run_dir / "model.safetensors").exists()
    assert "listening on 127.0.0.1" in (tmp_path / "server.log").read_text()


def test_run_completes_when_a_node_is_killed_mid_run(tmp_path: Path) -> None:
    server, clients, run_dir = _federation(tmp_path, epochs=1, min_clients=2)
    try:
        deadline = time.monotonic() + 90
        while len(_records(run_dir)) < 2 and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the run directory with a deadline
        assert len(_records(run_dir)) >= 2, logs(tmp_path)
        clients[2].send_signal(signal.SIGKILL)
        codes = finish([server, clients[0], clients[1]], timeout=120)
    finally:
        finish(clients, timeout=5)
    assert codes == [0, 0, 0], logs(tmp_path)
    records = _records(run_dir)
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1)), logs(tmp_path)
    assert all(r["num_results"] >= 2 for r in records), records
    assert any("node-2" in r["failures"] for r in records[2:]), records  # its task failed, the round went on


def test_secure_aggregation_from_the_command_line(tmp_path: Path) -> None:
    server, clients, run_dir = _federation(tmp_path, epochs=1, min_clients=3, rounds=2,
                                           server_args=("--strategy", "secagg_fedavg"),
                                           client_args=("--secure-aggregation",))
    codes = finish([server, *clients], timeout=120)
    assert codes == [0, 0, 0, 0], logs(tmp_path)
    records = _records(run_dir)
    assert [r["round"] for r in records] == [1, 2] and all(r["num_results"] == 3 for r in records), records
    assert all("secure_seconds_mask" in r for r in records)
    assert records[-1]["accuracy"] > records[0]["accuracy"] - 0.05, records


def test_partial_federation_personal_heads_and_federated_evaluation(tmp_path: Path) -> None:
    transfer = ("--freeze", "0.*", "--local", "9.*")
    server, clients, run_dir = _federation(tmp_path, epochs=1, min_clients=3, rounds=2,
                                           server_args=(*transfer, "--eval-fraction", "1", "--validate-norms", "3.5"),
                                           client_args=(*transfer, "--val-fraction", "0.2",
                                                        "--personal-dir", str(tmp_path / "personal")))
    codes = finish([server, *clients], timeout=120)
    assert codes == [0, 0, 0, 0], logs(tmp_path)
    records = _records(run_dir)
    assert all(r["num_failures"] == 0 and "federated_accuracy" in r for r in records), records
    # conv1 (0.*) stays frozen and the head (9.*) stays on the nodes: only the rest travels
    assert records[0]["bytes_down"] == 3 * 4 * (32 * 16 * 9 + 32 + 64 * 128 + 64)
    assert sorted(p.name for p in (tmp_path / "personal").iterdir()) == [f"node-{i}.safetensors" for i in range(3)]


def test_mutual_tls_with_signed_requests_and_an_intruder_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    made = subprocess.run([sys.executable, "-m", "fedloom.cli", "keys", "--out", str(keys), "--nodes",
                           "node-0,node-1,intruder"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    authorized = [line for line in (keys / "authorized_keys").read_text().splitlines() if "intruder" not in line]
    (keys / "admitted").write_text("\n".join(authorized) + "\n")
    port, run_dir = free_port(), tmp_path / "run"
    server = launch(["server", "--address", f"127.0.0.1:{port}", "--rounds", "3", "--min-clients", "2",
                     "--epochs", "1", "--wait-timeout", "60", "--run-dir", str(run_dir),
                     "--tls-cert", str(keys / "server.crt"), "--tls-key", str(keys / "server.key"),
                     "--client-ca", str(keys / "ca.crt"), "--authorized-keys", str(keys / "admitted")],
                    tmp_path / "server.log")

    def client(node_id: str, partition: int) -> subprocess.Popen:
        own = keys / "nodes" / node_id
        return launch(["client", "--server", f"localhost:{port}", "--partition", str(partition),
                       "--num-partitions", "2", "--node-id", node_id, "--connect-timeout", "60",
                       "--root-ca", str(own / "ca.crt"), "--node-key", str(own / "node.key"),
                       "--tls-cert", str(own / "tls.crt"), "--tls-key", str(own / "tls.key")],
                      tmp_path / f"{node_id}.log")

    intruder = client("intruder", 0)
    nodes = [client("node-0", 0), client("node-1", 1)]
    codes = finish([server, *nodes, intruder], timeout=120)
    assert codes == [0, 0, 0, 2], logs(tmp_path)
    assert [r["round"] for r in _records(run_dir)] == [1, 2, 3]
    assert all(r["num_results"] == 2 for r in _records(run_dir))
    assert "node 'intruder' is not in the authorized keys" in (tmp_path / "intruder.log").read_text()
    assert "refused Register" in (tmp_path / "server.log").read_text()  # and the coordinator logged it
    assert "(TLS)" in (tmp_path / "server.log").read_text()
