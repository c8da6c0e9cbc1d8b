"""Request signing: every call a node makes carries an Ed25519 signature in its metadata.

The signature covers a domain tag, the RPC method, the node id, a timestamp,
a random nonce and the SHA-256 of the request payload (for a client stream:
of its first message, the result header, which names the task). The
coordinator accepts a request only from a node listed in its authorized keys,
with a valid signature, a timestamp within ``window`` seconds of its own clock
and a nonce it has not seen in that window.
"""

from __future__ import annotations

import hashlib
import heapq
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

NODE = "x-fedloom-node"
TIMESTAMP = "x-fedloom-ts"
NONCE = "x-fedloom-nonce"
SIGNATURE = "x-fedloom-sig"
KEYS = (NODE, TIMESTAMP, NONCE, SIGNATURE)
TAG = b"fedloom-request-v1"
MAX_NODE_ID = 128
NONCE_HEX = 32  # 16 random bytes
MAX_NONCES = 100_000  # per node: a hard bound even if the rate limit is set very high


class AuthError(Exception):
    """A refused request; ``code`` is the name of the gRPC status to answer with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def check_node_id(node_id: str) -> str:
    if not isinstance(node_id, str) or not node_id or len(node_id) > MAX_NODE_ID or not node_id.isprintable() \
            or any(c.isspace() for c in node_id):
        raise ValueError(f"node id must be 1..{MAX_NODE_ID} printable characters without spaces, "
                         f"got {str(node_id)[:MAX_NODE_ID]!r}")
    return node_id


def digest(payload: bytes | memoryview) -> str:
    return hashlib.sha256(payload).hexdigest()


def message(method: str, node_id: str, timestamp: str, nonce: str, payload_digest: str) -> bytes:
    """The exact bytes that are signed; fields cannot contain NUL, so the encoding is unambiguous."""
    return b"\0".join(s.encode() if isinstance(s, str) else s
                      for s in (TAG, method, node_id, timestamp, nonce, payload_digest))


def sign(key: ed25519.Ed25519PrivateKey, method: str, node_id: str, payload: bytes,
         *, now: float | None = None) -> list[tuple[str, str]]:
    """The metadata to send with one request."""
    timestamp = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(NONCE_HEX // 2)
    signature = key.sign(message(method, node_id, timestamp, nonce, digest(payload)))
    return [(NODE, node_id), (TIMESTAMP, timestamp), (NONCE, nonce), (SIGNATURE, signature.hex())]


def identify(metadata: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """The signing fields of ``metadata``; AuthError when one is missing, repeated or malformed."""
    found: dict[str, str] = {}
    for key, value in metadata or ():
        if key in KEYS:
            if key in found:
                raise AuthError("UNAUTHENTICATED", f"metadata {key} appears more than once")
            if not isinstance(value, str) or len(value) > 256:
                raise AuthError("UNAUTHENTICATED", f"metadata {key} is malformed")
            found[key] = value
    missing = [k for k in KEYS if k not in found]
    if missing:
        raise AuthError("UNAUTHENTICATED", f"unsigned request: missing {', '.join(missing)} "
                                           "(is the node running with --node-key?)")
    return found


@dataclass
class _Seen:
    """The nonces of one node still inside the window, expiring in order."""

    nonces: set[str] = field(default_factory=set)
    expiry: list[tuple[float, str]] = field(default_factory=list)

    def purge(self, now: float) -> None:
        while self.expiry and self.expiry[0][0] < now:
            _, nonce = heapq.heappop(self.expiry)
            self.nonces.discard(nonce)

    def add(self, nonce: str, expires: float) -> None:
        self.nonces.add(nonce)
        heapq.heappush(self.expiry, (expires, nonce))


class Verifier:
    """Checks signed requests against authorized keys; thread-safe.

    ``admit(node_id)`` (e.g. a rate limiter) runs after the signature checks
    and before the nonce is remembered, so only authenticated, admitted
    requests take room in the nonce cache.
    """

    def __init__(self, authorized: Mapping[str, ed25519.Ed25519PublicKey], *, window: float = 60.0,
                 max_nonces: int = MAX_NONCES, clock: Callable[[], float] = time.time):
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.authorized = dict(authorized)
        self.window = window
        self.max_nonces = max_nonces
        self.clock = clock
        self._seen: dict[str, _Seen] = {}
        self._lock = threading.Lock()

    def verify(self, method: str, metadata, payload: bytes | memoryview,
               admit: Callable[[str], None] | None = None) -> str:
        """The authenticated node id of a request; AuthError (or what ``admit`` raises) otherwise."""
        fields = identify(metadata)
        node_id = fields[NODE]
        key = self.authorized.get(node_id)
        if key is None:
            raise AuthError("PERMISSION_DENIED", f"node {node_id[:MAX_NODE_ID]!r} is not in the authorized keys")
        try:
            stamp = float(fields[TIMESTAMP])
            signature = bytes.fromhex(fields[SIGNATURE])
        except ValueError:
            raise AuthError("UNAUTHENTICATED", f"malformed timestamp or signature from node {node_id!r}") from None
        nonce = fields[NONCE]
        if len(nonce) != NONCE_HEX or any(c not in "0123456789abcdef" for c in nonce):
            raise AuthError("UNAUTHENTICATED", f"malformed nonce from node {node_id!r}")
        try:
            key.verify(signature, message(method, node_id, fields[TIMESTAMP], nonce, digest(payload)))
        except InvalidSignature:
            raise AuthError("UNAUTHENTICATED", f"bad signature from node {node_id!r} on {method} (is its --node-key "
                                               "the key listed for it in the authorized keys?)") from None
        now = self.clock()
        if not abs(now - stamp) <= self.window:  # also refuses NaN
            raise AuthError("UNAUTHENTICATED", f"request from node {node_id!r} is stamped {stamp - now:+.1f}s from "
                                               f"the coordinator's clock; allowed ±{self.window:g}s (clock skew?)")
        with self._lock:
            seen = self._seen.setdefault(node_id, _Seen())
            seen.purge(now)
            if nonce in seen.nonces:
                raise AuthError("UNAUTHENTICATED", f"replayed request from node {node_id!r} (nonce seen before)")
            if len(seen.nonces) >= self.max_nonces:
                raise AuthError("RESOURCE_EXHAUSTED", f"node {node_id!r} sent more than {self.max_nonces} requests "
                                                      f"within {self.window:g}s")
            if admit is not None:
                admit(node_id)
            seen.add(nonce, stamp + self.window)  # a nonce is acceptable until its stamp leaves the window
        return node_id

    def cached(self, node_id: str) -> int:
        """How many nonces of ``node_id`` are remembered (for tests and monitoring)."""
        with self._lock:
            seen = self._seen.get(node_id)
            return 0 if seen is None else len(seen.nonces)
