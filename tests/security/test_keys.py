"""`fedloom keys`: the files it writes, their permissions, and clear errors for bad key files."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from fedloom.cli import app
from fedloom.security import keys

NODES = ["node-0", "node-1"]


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    result = CliRunner().invoke(app, ["keys", "--out", str(out), "--nodes", ",".join(NODES),
                                      "--hosts", "localhost,127.0.0.1,coord.example"])
    assert result.exit_code == 0, result.output
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_private_keys_are_0600_and_the_rest_0644(material: Path) -> None:
    private = ["ca.key", "server.key", *(f"nodes/{n}/{f}" for n in NODES for f in ("node.key", "tls.key"))]
    for rel in private:
        assert stat.S_IMODE((material / rel).stat().st_mode) == 0o600, rel
    for rel in ["ca.crt", "server.crt", "authorized_keys", "nodes/node-0/tls.crt", "nodes/node-0/node.pub"]:
        assert stat.S_IMODE((material / rel).stat().st_mode) == 0o644, rel


def test_certificates_chain_to_the_ca_with_the_right_names_and_uses(material: Path) -> None:
    ca = _cert(material / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = _cert(material / "server.crt")
    server.verify_directly_issued_by(ca)  # raises when the signature or issuer is wrong
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coord.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    for node in NODES:
        cert = _cert(material / "nodes" / node / "tls.crt")
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == node
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH]
        assert (material / "nodes" / node / "ca.crt").read_bytes() == (material / "ca.crt").read_bytes()


def test_authorized_keys_hold_each_nodes_signing_key(material: Path) -> None:
    authorized = keys.load_authorized_keys(material / "authorized_keys")
    assert sorted(authorized) == NODES
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    for node in NODES:
        private = keys.load_signing_key(material / "nodes" / node / "node.key")
        assert private.public_key().public_bytes(*raw) == authorized[node].public_bytes(*raw)
        assert (material / "nodes" / node / "node.pub").read_text().split()[0] == node
    keys.load_tls_pair(material / "server.crt", material / "server.key", "server TLS")  # they belong together


def test_refuses_to_overwrite_existing_keys(material: Path) -> None:
    before = (material / "ca.key").read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite"):
        keys.create(material, nodes=["node-9"])
    assert (material / "ca.key").read_bytes() == before


@pytest.mark.parametrize(("nodes", "error"), [(["a b"], "without spaces"), (["x", "x"], "duplicate"),
                                              (["a/b"], "directory"), ([""], "node id")])
def test_bad_node_ids_are_refused(tmp_path: Path, nodes: list[str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        keys.create(tmp_path / "k", nodes=nodes)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _other_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "garbage cert", "mismatched key",
                                  "garbage key"])
def test_tls_pair_errors_name_the_file_and_the_problem(material: Path, tmp_path: Path, case: str) -> None:
    cert, key = material / "server.crt", material / "server.key"
    expected = {
        "missing": (tmp_path / "nope.crt", key, "does not exist"),
        "directory": (tmp_path, key, "is a directory"),
        "empty": (_write(tmp_path, "e.crt", b"\n"), key, "is empty"),
        "garbage cert": (_write(tmp_path, "g.crt", b"hello"), key, "not a PEM certificate"),
        "mismatched key": (cert, _write(tmp_path, "o.key", _other_key_pem()), "does not match"),
        "garbage key": (cert, _write(tmp_path, "g.key", b"-----BEGIN PRIVATE KEY-----\nxx\n"), "not an unencrypted"),
    }[case]
    with pytest.raises(keys.KeyFileError, match=expected[2]) as info:
        keys.load_tls_pair(expected[0], expected[1], "server TLS")
    assert "server TLS" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_reported(material: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, "secret.key", b"x")
    path.chmod(0)
    with pytest.raises(keys.KeyFileError, match="not readable"):
        keys.load_signing_key(path)


def test_a_tls_key_is_not_a_signing_key(material: Path) -> None:
    with pytest.raises(keys.KeyFileError, match="not an Ed25519 signing key"):
        keys.load_signing_key(material / "nodes" / "node-0" / "tls.key")


@pytest.mark.parametrize(("text", "error"), [
    ("node-0 rsa AAAA\n", "expected '<node id> ed25519"),
    ("node-0 ed25519 not-base64!\n", "line 1"),
    ("node-0 ed25519 AAAA\n", "line 1"),  # valid base64, wrong key length
    ("# only a comment\n", "lists no node"),
    ("node-0 ed25519 {k}\nnode-0 ed25519 {k}\n", "listed twice"),
])
def test_authorized_keys_errors(material: Path, tmp_path: Path, text: str, error: str) -> None:
    good = (material / "authorized_keys").read_text().splitlines()[0].split()[2]
    path = _write(tmp_path, "authorized_keys", text.format(k=good).encode())
    with pytest.raises(keys.KeyFileError, match=error):
        keys.load_authorized_keys(path)


def test_cli_reports_key_errors_cleanly(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["server", "--tls-cert", str(tmp_path / "none.crt"), "--tls-key",
                                      str(tmp_path / "none.key"), "--authorized-keys", str(tmp_path / "ak")])
    assert result.exit_code == 2 and "does not exist" in result.output, result.output
    result = CliRunner().invoke(app, ["server"])
    assert result.exit_code == 2 and "--insecure" in result.output, result.output
    result = CliRunner().invoke(app, ["client"])
    assert result.exit_code == 2 and "--root-ca" in result.output, result.output
