"""TLS, mutual TLS, signed requests and rate limits on the gRPC fleet, over real loopback sockets."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedloom.client import node as node_loop
from fedloom.client.node import ClientSecurity
from fedloom.protos.fedloom.protos import fleet_pb2 as pb
from fedloom.security import keys, signing
from fedloom.server.grpc_auth import ServerSecurity
from fedloom.server.grpc_fleet import GrpcFleet
from fedloom.tensors import NamedTensors
from fedloom.types import FitRes, Instruction

WEIGHTS = NamedTensors({"w": np.arange(4, dtype=np.float32)})
SERVICE = "/fedloom.protos.Fleet"


class Shift:
    def fit(self, weights, config):
        return weights.map(lambda a: a + 1), 3, {}

    def evaluate(self, weights, config):
        return 3, {}


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    keys.create(out, nodes=["node-0", "node-1", "intruder"])
    lines = [line for line in (out / "authorized_keys").read_text().splitlines() if not line.startswith("intruder")]
    (out / "authorized_nodes").write_text("\n".join(lines) + "\n")  # the intruder has a CA cert but no admission
    return out


def _fleet(material: Path, *, mutual: bool = False, **options) -> GrpcFleet:
    security = ServerSecurity.from_files(tls_cert=material / "server.crt", tls_key=material / "server.key",
                                         client_ca=material / "ca.crt" if mutual else None,
                                         authorized_keys=material / "authorized_nodes")
    fleet = GrpcFleet(heartbeat_interval=0.2, heartbeat_timeout=1.5, poll_wait=0.2, security=security, **options)
    fleet.start("127.0.0.1:0")
    return fleet


def _client(material: Path, node_id: str, *, cert_of: str | None = None, ca: str = "ca.crt") -> ClientSecurity:
    node = material / "nodes" / node_id
    cert = material / "nodes" / cert_of if cert_of else None
    return ClientSecurity.from_files(root_ca=material / ca, node_key=node / "node.key",
                                     tls_cert=cert / "tls.crt" if cert else None,
                                     tls_key=cert / "tls.key" if cert else None)


def _run_node(fleet: GrpcFleet, node_id: str, security: ClientSecurity, errors: list) -> threading.Thread:
    def target() -> None:
        try:
            node_loop.run(Shift(), f"localhost:{fleet.port}", node_id=node_id, connect_timeout=3, security=security)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("mutual", [False, True])
def test_signed_nodes_train_over_tls(material: Path, mutual: bool) -> None:
    fleet = _fleet(material, mutual=mutual)
    errors: list = []
    try:
        threads = [_run_node(fleet, n, _client(material, n, cert_of=n if mutual else None), errors)
                   for n in ("node-0", "node-1")]
        assert fleet.wait_for_nodes(2, 10) == ["node-0", "node-1"]
        outcomes = list(fleet.run(Instruction("fit", 1, WEIGHTS, {}), ["node-0", "node-1"], timeout=20))
        assert all(isinstance(o, FitRes) and o.weights.equal(WEIGHTS.map(lambda a: a + 1)) for o in outcomes)
        assert len(outcomes) == 2
    finally:
        fleet.close()
    for thread in threads:
        thread.join(10)
    assert not errors, errors


@pytest.mark.parametrize(("node_id", "security", "error"), [
    ("intruder", lambda m: _client(m, "intruder"), "PERMISSION_DENIED: node 'intruder' is not in the authorized"),
    ("node-0", lambda m: _client(m, "node-1"), "UNAUTHENTICATED: bad signature"),  # node-1's key, node-0's id
    ("node-0", lambda m: ClientSecurity(root_ca=(m / "ca.crt").read_bytes()), "UNAUTHENTICATED: unsigned request"),
])
def test_a_node_with_refused_credentials_stops_with_a_clear_error(material: Path, node_id, security, error) -> None:
    fleet = _fleet(material)
    try:
        with pytest.raises(node_loop.CredentialsRefused, match=error):
            node_loop.run(Shift(), f"localhost:{fleet.port}", node_id=node_id, connect_timeout=5,
                          security=security(material))
        assert fleet.wait_for_nodes(1, 0) == []
    finally:
        fleet.close()


def test_mutual_tls_binds_the_certificate_to_the_node(material: Path) -> None:
    fleet = _fleet(material, mutual=True)
    try:
        with pytest.raises(node_loop.CredentialsRefused, match="client certificate for 'node-1'"):
            node_loop.run(Shift(), f"localhost:{fleet.port}", node_id="node-0", connect_timeout=5,
                          security=_client(material, "node-0", cert_of="node-1"))
        with pytest.raises(node_loop.CoordinatorUnreachable):  # no client certificate: the handshake fails
            node_loop.run(Shift(), f"localhost:{fleet.port}", node_id="node-0", connect_timeout=1,
                          security=_client(material, "node-0"))
    finally:
        fleet.close()


def test_a_node_that_does_not_trust_the_coordinator_never_connects(material: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    keys.create(other, nodes=["node-0"])
    fleet = _fleet(material)
    try:
        with pytest.raises(node_loop.CoordinatorUnreachable, match="UNAVAILABLE"):
            node_loop.run(Shift(), f"localhost:{fleet.port}", node_id="node-0", connect_timeout=1,
                          security=ClientSecurity.from_files(root_ca=other / "ca.crt",
                                                             node_key=material / "nodes/node-0/node.key"))
        assert fleet.wait_for_nodes(1, 0) == []
    finally:
        fleet.close()


# ----------------------------------------------------------------- raw signed calls


class Raw:
    """Unary calls with hand-made bytes and metadata, over TLS."""

    def __init__(self, material: Path, port: int):
        credentials = grpc.ssl_channel_credentials(root_certificates=(material / "ca.crt").read_bytes())
        self.channel = grpc.secure_channel(f"localhost:{port}", credentials)
        self.key = keys.load_signing_key(material / "nodes/node-0/node.key")

    def call(self, name: str, payload: bytes, metadata) -> bytes:
        return self.channel.unary_unary(f"{SERVICE}/{name}")(payload, metadata=metadata, timeout=10)

    def signed(self, name: str, message, node_id: str = "node-0", **kw) -> tuple[bytes, list]:
        payload = message.SerializeToString()
        return payload, signing.sign(self.key, f"{SERVICE}/{name}", node_id, payload, **kw)


@pytest.fixture
def raw(material: Path) -> Iterator[tuple[GrpcFleet, Raw]]:
    fleet = _fleet(material, rate=10, burst=5)
    yield fleet, Raw(material, fleet.port)
    fleet.close()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_replay_and_identity_theft_are_refused(raw) -> None:
    fleet, peer = raw
    payload, metadata = peer.signed("Register", pb.RegisterRequest(node_id="node-0"))
    reply = pb.RegisterReply.FromString(peer.call("Register", payload, metadata))
    assert _code(lambda: peer.call("Register", payload, metadata)) == (
        grpc.StatusCode.UNAUTHENTICATED, "replayed request from node 'node-0' (nonce seen before)")
    # node-0's valid signature on a request that speaks for node-1
    payload, metadata = peer.signed("Heartbeat", pb.NodeRef(node_id="node-1", session=reply.session))
    code, details = _code(lambda: peer.call("Heartbeat", payload, metadata))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "on behalf of 'node-1'" in details
    payload, metadata = peer.signed("Heartbeat", pb.NodeRef(node_id="node-0", session=reply.session), now=0.0)
    code, details = _code(lambda: peer.call("Heartbeat", payload, metadata))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "clock skew" in details
    assert fleet.registry.alive_ids() == ["node-0"]  # only the one good call registered it


def test_rate_limit_refuses_a_flood_and_recovers(raw) -> None:
    fleet, peer = raw
    payload, metadata = peer.signed("Register", pb.RegisterRequest(node_id="node-0"))
    session = pb.RegisterReply.FromString(peer.call("Register", payload, metadata)).session
    codes = []
    for _ in range(8):  # burst 5, one already spent on Register, 10 tokens/s: the 5th or 6th call is refused
        payload, metadata = peer.signed("Heartbeat", pb.NodeRef(node_id="node-0", session=session))
        try:
            peer.call("Heartbeat", payload, metadata)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
    assert codes[:4] == ["OK"] * 4 and "RESOURCE_EXHAUSTED" in codes, codes
    deadline = time.monotonic() + 5
    while True:  # tokens come back at 10/s: the node is served again, its session intact
        payload, metadata = peer.signed("Heartbeat", pb.NodeRef(node_id="node-0", session=session))
        try:
            assert not pb.HeartbeatReply.FromString(peer.call("Heartbeat", payload, metadata)).finished
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.05)  # polling with a deadline
    assert fleet.registry.alive_ids() == ["node-0"]


def test_a_rate_limited_node_slows_down_and_finishes(material: Path, caplog) -> None:
    fleet = _fleet(material, rate=10, burst=10)
    errors: list = []
    try:
        with pytest.raises(signing.AuthError):  # drain node-0's bucket: its first calls will be refused
            for _ in range(11):
                fleet.servicer.guard.limiter.take("node-0")
        thread = _run_node(fleet, "node-0", _client(material, "node-0"), errors)
        assert fleet.wait_for_nodes(1, 10) == ["node-0"]
        outcomes = list(fleet.run(Instruction("fit", 1, WEIGHTS, {}), ["node-0"], timeout=20))
        assert isinstance(outcomes[0], FitRes), outcomes
    finally:
        fleet.close()
    thread.join(15)
    assert not errors, errors
    assert any("rate limit" in r.getMessage() and r.name == "fedloom.node" for r in caplog.records)


def test_a_rate_too_low_for_heartbeats_is_refused(material: Path) -> None:
    with pytest.raises(ValueError, match="rate"):
        GrpcFleet(heartbeat_interval=0.2, heartbeat_timeout=1.5, poll_wait=0.2, rate=5)
