"""Key material for a federation, made with ``cryptography``: ``fedloom keys --out DIR``.

Layout of ``DIR`` (private keys are written with mode 0600)::

    ca.crt, ca.key              the federation's certificate authority (self-signed)
    server.crt, server.key      the coordinator's TLS certificate for the given hostnames/IPs
    authorized_keys             one line per node: "<node id> ed25519 <base64 public key>"
    nodes/<id>/node.key         the node's Ed25519 signing key (PKCS#8 PEM)
    nodes/<id>/node.pub         its public key (the authorized_keys line)
    nodes/<id>/tls.crt, tls.key a client certificate signed by the CA, for optional mutual TLS (CN = node id)
    nodes/<id>/ca.crt           a copy of the CA certificate the node trusts

Loaders raise ``KeyFileError`` naming the file and what is wrong with it.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_TYPE = "ed25519"
MAX_KEY_FILE = 1 << 20
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


class KeyFileError(ValueError):
    """A key, certificate or authorized-keys file that is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes for one side of a TLS connection."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None


# ----------------------------------------------------------------- writing


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Create ``path`` (refusing to overwrite), 0600 for private keys, 0644 otherwise."""
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it; a private key must not be wider


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedloom"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, public_key, issuer: x509.Name, signer, *, days: int, ca: bool,
                 usage: ExtendedKeyUsageOID | None = None, hosts: Sequence[str] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def public_key_line(node_id: str, public: ed25519.Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"{node_id} {KEY_TYPE} {base64.b64encode(raw).decode()}"


def create(out: str | Path, *, nodes: Sequence[str], hosts: Sequence[str] = DEFAULT_HOSTS,
           days: int = 365) -> list[Path]:
    """Write a CA, a coordinator certificate for ``hosts`` and credentials for ``nodes`` under ``out``."""
    from fedloom.security.signing import check_node_id

    out = Path(out)
    if not hosts:
        raise ValueError("the coordinator certificate needs at least one hostname or IP")
    for node_id in nodes:
        check_node_id(node_id)
        if "/" in node_id or node_id in (".", ".."):
            raise ValueError(f"node id {node_id!r} cannot name a directory")
    if len(set(nodes)) != len(nodes):
        raise ValueError("duplicate node ids")
    out.mkdir(parents=True, exist_ok=True)
    clashes = [p for p in ("ca.key", "server.key", "authorized_keys") if (out / p).exists()]
    if clashes:
        raise ValueError(f"{out} already holds {', '.join(clashes)}; refusing to overwrite keys")
    written: list[Path] = []

    def put(rel: str, data: bytes, private: bool = False) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, data, private=private)
        written.append(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("fedloom CA", ca_key.public_key(), _name("fedloom CA"), ca_key, days=days, ca=True)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    put("ca.key", _pem_key(ca_key), private=True)
    put("ca.crt", ca_pem)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _certificate(hosts[0], server_key.public_key(), ca_cert.subject, ca_key, days=days, ca=False,
                               usage=ExtendedKeyUsageOID.SERVER_AUTH, hosts=hosts)
    put("server.key", _pem_key(server_key), private=True)
    put("server.crt", server_cert.public_bytes(serialization.Encoding.PEM))
    lines = []
    for node_id in nodes:
        signing = ed25519.Ed25519PrivateKey.generate()
        line = public_key_line(node_id, signing.public_key())
        lines.append(line)
        tls_key = ec.generate_private_key(ec.SECP256R1())
        tls_cert = _certificate(node_id, tls_key.public_key(), ca_cert.subject, ca_key, days=days, ca=False,
                                usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        put(f"nodes/{node_id}/node.key", _pem_key(signing), private=True)
        put(f"nodes/{node_id}/node.pub", (line + "\n").encode())
        put(f"nodes/{node_id}/tls.key", _pem_key(tls_key), private=True)
        put(f"nodes/{node_id}/tls.crt", tls_cert.public_bytes(serialization.Encoding.PEM))
        put(f"nodes/{node_id}/ca.crt", ca_pem)
    put("authorized_keys", "".join(line + "\n" for line in lines).encode())
    return written


# ----------------------------------------------------------------- reading


def read_file(path: str | Path, what: str) -> bytes:
    """The bytes of ``path``; KeyFileError naming ``what`` when missing, unreadable, empty or huge."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_KEY_FILE:
            raise KeyFileError(f"{what} {path} is larger than {MAX_KEY_FILE} bytes; not a key file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(f"{what} {path} is a directory, not a file") from None
    except PermissionError:
        raise KeyFileError(f"{what} {path} is not readable (permission denied)") from None
    except OSError as exc:
        raise KeyFileError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if not data.strip():
        raise KeyFileError(f"{what} {path} is empty")
    return data


def load_certificate(path: str | Path, what: str) -> tuple[bytes, x509.Certificate]:
    data = read_file(path, what)
    try:
        return data, x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise KeyFileError(f"{what} {path} is not a PEM certificate: {exc}") from None


def load_private_key(path: str | Path, what: str):
    data = read_file(path, what)
    try:
        return data, serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{what} {path} is not an unencrypted PEM private key: {exc}") from None


def load_tls_pair(cert_path: str | Path, key_path: str | Path, what: str) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM), checked to belong together."""
    cert_pem, cert = load_certificate(cert_path, f"{what} certificate")
    key_pem, key = load_private_key(key_path, f"{what} key")
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise KeyFileError(f"{what} key {key_path} does not match the certificate {cert_path}")
    return cert_pem, key_pem


def load_signing_key(path: str | Path) -> ed25519.Ed25519PrivateKey:
    _, key = load_private_key(path, "node key")
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"node key {path} is a {type(key).__name__}, not an Ed25519 signing key")
    return key


def parse_public_key(text: str) -> ed25519.Ed25519PublicKey:
    raw = base64.b64decode(text, validate=True)
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def load_authorized_keys(path: str | Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """node id -> public key from lines ``<node id> ed25519 <base64>``; '#' starts a comment."""
    from fedloom.security.signing import check_node_id

    text = read_file(path, "authorized keys file").decode("utf-8", errors="replace")
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"authorized keys file {path}, line {number}"
        if len(parts) != 3 or parts[1] != KEY_TYPE:
            raise KeyFileError(f"{where}: expected '<node id> {KEY_TYPE} <base64 key>'")
        try:
            check_node_id(parts[0])
            key = parse_public_key(parts[2])
        except ValueError as exc:
            raise KeyFileError(f"{where}: {exc}") from None
        if parts[0] in keys:
            raise KeyFileError(f"{where}: node {parts[0]!r} is listed twice")
        keys[parts[0]] = key
    if not keys:
        raise KeyFileError(f"authorized keys file {path} lists no node")
    return keys
