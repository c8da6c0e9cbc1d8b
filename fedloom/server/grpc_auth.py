"""The coordinator's gate: who may call, how often, and over what channel.

``Guard.check`` runs before any handler touches a request. With authorized
keys it verifies the request's signature (``fedloom.security.signing``) and
that the signer is the node the request speaks for; with mutual TLS it also
requires the client certificate's common name to be that node. Every caller
is rate-limited per node id. Refusals are logged with the peer address and
answered with UNAUTHENTICATED, PERMISSION_DENIED or RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from fedloom.security import keys
from fedloom.security.ratelimit import RateLimiter
from fedloom.security.signing import AuthError, Verifier
from fedloom.server.registry import Refused

log = logging.getLogger("fedloom.auth")


@dataclass(frozen=True)
class ServerSecurity:
    """How the coordinator listens: TLS (or plaintext when ``insecure``) and whom it admits."""

    tls: keys.TlsFiles | None = None  # cert + key; ca set: clients must present a certificate it signed
    authorized_keys: dict | None = None  # node id -> Ed25519 public key; None: no request signing
    window: float = 60.0

    @classmethod
    def from_files(cls, *, tls_cert: str | None, tls_key: str | None, client_ca: str | None = None,
                   authorized_keys: str | None, insecure: bool = False, window: float = 60.0) -> ServerSecurity:
        """Load and check the files; KeyFileError/ValueError with a clear message when something is off."""
        if insecure:
            if tls_cert or tls_key or client_ca:
                raise ValueError("--insecure serves plaintext: drop --tls-cert, --tls-key and --client-ca")
            tls = None
        else:
            if not tls_cert or not tls_key:
                raise ValueError("TLS is on by default: pass --tls-cert and --tls-key (see `fedloom keys`), "
                                 "or --insecure for a local experiment")
            if not authorized_keys:
                raise ValueError("a TLS coordinator admits only known nodes: pass --authorized-keys "
                                 "(see `fedloom keys`), or --insecure for a local experiment")
            cert, key = keys.load_tls_pair(tls_cert, tls_key, "server TLS")
            ca = keys.load_certificate(client_ca, "client CA")[0] if client_ca else None
            tls = keys.TlsFiles(cert=cert, key=key, ca=ca)
        authorized = keys.load_authorized_keys(authorized_keys) if authorized_keys else None
        return cls(tls=tls, authorized_keys=authorized, window=window)

    def credentials(self) -> grpc.ServerCredentials | None:
        if self.tls is None:
            return None
        return grpc.ssl_server_credentials([(self.tls.key, self.tls.cert)], root_certificates=self.tls.ca,
                                           require_client_auth=self.tls.ca is not None)


class Guard:
    """Authenticates and rate-limits every request; thread-safe."""

    def __init__(self, security: ServerSecurity | None = None, *, rate: float = 50.0, burst: float = 100.0):
        security = security or ServerSecurity()
        self.verifier = Verifier(security.authorized_keys, window=security.window) \
            if security.authorized_keys is not None else None
        self.mutual_tls = security.tls is not None and security.tls.ca is not None
        self.limiter = RateLimiter(rate=rate, burst=burst)

    def check(self, method: str, context, payload: bytes | memoryview, claimed: str) -> None:
        """Refused unless the request may proceed on behalf of node ``claimed``."""
        try:
            if self.verifier is None:
                self.limiter.take(claimed)
                return
            signer = self.verifier.verify(method, context.invocation_metadata(), payload, admit=self.limiter.take)
            if signer != claimed:
                raise AuthError("PERMISSION_DENIED", f"node {signer!r} signed a request on behalf of {claimed[:128]!r}")
            if self.mutual_tls:
                names = (context.auth_context() or {}).get("x509_common_name", [])
                if signer.encode() not in names:
                    raise AuthError("PERMISSION_DENIED", f"node {signer!r} presented a client certificate for "
                                                         f"{b','.join(names).decode(errors='replace')[:128]!r}")
        except AuthError as exc:
            log.warning("refused %s from %s: %s: %s", method.rsplit("/", 1)[-1], _peer(context), exc.code,
                        exc.message)
            raise Refused(exc.code, exc.message) from None


def _peer(context) -> str:
    try:
        return context.peer()
    except Exception:  # a peer we cannot name is still refused
        return "?"
