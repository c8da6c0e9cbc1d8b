"""Request signatures: what is signed, and every way a request is refused."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedloom.security import signing
from fedloom.security.ratelimit import RateLimiter
from fedloom.security.signing import NODE, NONCE, SIGNATURE, TIMESTAMP, AuthError, Verifier

KEY = ed25519.Ed25519PrivateKey.generate()
OTHER = ed25519.Ed25519PrivateKey.generate()
METHOD = "/fedloom.protos.Fleet/PullTask"
PAYLOAD = b"\x0a\x02n0"


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _verifier(clock: Clock, **kw) -> Verifier:
    return Verifier({"n0": KEY.public_key(), "n1": OTHER.public_key()}, clock=clock, **kw)


def test_the_signed_message_is_the_nul_joined_fields() -> None:
    payload_hash = hashlib.sha256(PAYLOAD).hexdigest()
    expected = b"fedloom-request-v1\0" + METHOD.encode() + b"\0n0\0" + b"12.500\0" + b"ab" * 16 + b"\0" + \
        payload_hash.encode()
    assert signing.message(METHOD, "n0", "12.500", "ab" * 16, signing.digest(PAYLOAD)) == expected
    metadata = dict(signing.sign(KEY, METHOD, "n0", PAYLOAD, now=12.5))
    assert metadata[TIMESTAMP] == "12.500" and len(metadata[NONCE]) == 32
    KEY.public_key().verify(bytes.fromhex(metadata[SIGNATURE]),
                            signing.message(METHOD, "n0", "12.500", metadata[NONCE], payload_hash))


def test_a_good_request_passes_once_and_its_replay_is_refused() -> None:
    clock = Clock()
    verifier = _verifier(clock)
    metadata = signing.sign(KEY, METHOD, "n0", PAYLOAD, now=clock.now)
    assert verifier.verify(METHOD, metadata, PAYLOAD) == "n0"
    with pytest.raises(AuthError, match="replayed") as info:
        verifier.verify(METHOD, metadata, PAYLOAD)
    assert info.value.code == "UNAUTHENTICATED"


def _tampered(case: str, clock: Clock) -> tuple[str, list, bytes]:
    metadata = dict(signing.sign(KEY, METHOD, "n0", PAYLOAD, now=clock.now))
    method, payload = METHOD, PAYLOAD
    if case == "other payload":
        payload = PAYLOAD + b"\x00"
    elif case == "other method":
        method = "/fedloom.protos.Fleet/Register"
    elif case == "flipped signature":
        sig = bytearray.fromhex(metadata[SIGNATURE])
        sig[5] ^= 1
        metadata[SIGNATURE] = sig.hex()
    elif case == "other node claims it":
        metadata[NODE] = "n1"
    elif case == "restamped":
        metadata[TIMESTAMP] = f"{clock.now + 1:.3f}"
    elif case == "unknown node":
        metadata = dict(signing.sign(KEY, METHOD, "stranger", PAYLOAD, now=clock.now))
    elif case == "missing signature":
        del metadata[SIGNATURE]
    elif case == "non-hex signature":
        metadata[SIGNATURE] = "zz"
    elif case == "short nonce":
        metadata[NONCE] = "ab"
    elif case in ("61 s early", "61 s late", "NaN"):
        stamp = {"61 s early": clock.now + 61, "61 s late": clock.now - 61, "NaN": float("nan")}[case]
        metadata = dict(signing.sign(KEY, METHOD, "n0", PAYLOAD, now=stamp))
    elif case == "duplicated field":
        return method, [*metadata.items(), (NODE, "n0")], payload
    return method, list(metadata.items()), payload


CASES = {
    "other payload": ("UNAUTHENTICATED", "bad signature"),
    "other method": ("UNAUTHENTICATED", "bad signature"),
    "flipped signature": ("UNAUTHENTICATED", "bad signature"),
    "other node claims it": ("UNAUTHENTICATED", "bad signature"),
    "restamped": ("UNAUTHENTICATED", "bad signature"),
    "unknown node": ("PERMISSION_DENIED", "not in the authorized keys"),
    "missing signature": ("UNAUTHENTICATED", "missing x-fedloom-sig"),
    "non-hex signature": ("UNAUTHENTICATED", "malformed"),
    "short nonce": ("UNAUTHENTICATED", "malformed nonce"),
    "61 s early": ("UNAUTHENTICATED", r"\+61.0s"),
    "61 s late": ("UNAUTHENTICATED", "-61.0s"),
    "NaN": ("UNAUTHENTICATED", "clock skew"),
    "duplicated field": ("UNAUTHENTICATED", "more than once"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_requests_are_refused(case: str) -> None:
    clock = Clock()
    method, metadata, payload = _tampered(case, clock)
    with pytest.raises(AuthError, match=CASES[case][1]) as info:
        _verifier(clock).verify(method, metadata, payload)
    assert info.value.code == CASES[case][0]


@pytest.mark.parametrize(("skew", "ok"), [(-60.0, True), (60.0, True), (-60.01, False), (60.01, False)])
def test_the_window_is_inclusive_at_60_seconds(skew: float, ok: bool) -> None:
    clock = Clock()
    metadata = signing.sign(KEY, METHOD, "n0", PAYLOAD, now=clock.now + skew)
    if ok:
        assert _verifier(clock).verify(METHOD, metadata, PAYLOAD) == "n0"
    else:
        with pytest.raises(AuthError, match="allowed ±60s"):
            _verifier(clock).verify(METHOD, metadata, PAYLOAD)


def test_nonces_are_forgotten_once_their_stamp_leaves_the_window() -> None:
    clock = Clock()
    verifier = _verifier(clock, window=10)
    for _ in range(5):
        verifier.verify(METHOD, signing.sign(KEY, METHOD, "n0", PAYLOAD, now=clock.now), PAYLOAD)
    assert verifier.cached("n0") == 5
    clock.now += 10  # stamps are exactly at the window's edge: still remembered (they could still be replayed)
    verifier.verify(METHOD, signing.sign(KEY, METHOD, "n0", PAYLOAD, now=clock.now), PAYLOAD)
    assert verifier.cached("n0") == 6
    clock.now += 0.01  # the first five are now too old to be accepted, so they need not be remembered
    verifier.verify(METHOD, signing.sign(KEY, METHOD, "n0", PAYLOAD, now=clock.now), PAYLOAD)
    assert verifier.cached("n0") == 2


def test_the_nonce_cache_is_bounded_per_node() -> None:
    clock = Clock()
    verifier = _verifier(clock, max_nonces=3)
    for _ in range(3):
        verifier.verify(METHOD, signing.sign(KEY, METHOD, "n0", PAYLOAD, now=clock.now), PAYLOAD)
    with pytest.raises(AuthError, match="more than 3 requests") as info:
        verifier.verify(METHOD, signing.sign(KEY, METHOD, "n0", PAYLOAD, now=clock.now), PAYLOAD)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert verifier.verify(METHOD, signing.sign(OTHER, METHOD, "n1", PAYLOAD, now=clock.now), PAYLOAD) == "n1"


def test_a_rate_limited_request_does_not_use_up_its_nonce() -> None:
    clock = Clock()
    verifier = _verifier(clock)
    limiter = RateLimiter(rate=1, burst=1, clock=clock)
    verifier.verify(METHOD, signing.sign(KEY, METHOD, "n0", PAYLOAD, now=clock.now), PAYLOAD, admit=limiter.take)
    metadata = signing.sign(KEY, METHOD, "n0", PAYLOAD, now=clock.now)
    with pytest.raises(AuthError, match="rate limit"):
        verifier.verify(METHOD, metadata, PAYLOAD, admit=limiter.take)
    assert verifier.cached("n0") == 1
    clock.now += 1.0  # one token back: the same request may now go through
    assert verifier.verify(METHOD, metadata, PAYLOAD, admit=limiter.take) == "n0"


@pytest.mark.parametrize(("elapsed", "allowed"), [(0.0, 0), (0.24, 0), (0.25, 1), (0.5, 2), (1.0, 3), (10.0, 3)])
def test_token_bucket_refills_at_the_rate_up_to_the_burst(elapsed: float, allowed: int) -> None:
    clock = Clock()
    limiter = RateLimiter(rate=4, burst=3, clock=clock)  # a token every 0.25 s, at most 3 banked
    for _ in range(3):
        limiter.take("n0")
    with pytest.raises(AuthError, match=r"retry in 0.25s") as info:
        limiter.take("n0")
    assert info.value.code == "RESOURCE_EXHAUSTED"
    clock.now += elapsed
    taken = 0
    while taken < 10:
        try:
            limiter.take("n0")
        except AuthError:
            break
        taken += 1
    assert taken == allowed
    limiter.take("n1")  # buckets are per node


def test_bucket_memory_is_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=2, clock=clock, max_buckets=2)
    limiter.take("a")
    limiter.take("b")
    with pytest.raises(AuthError, match="too many distinct callers"):
        limiter.take("c")
    clock.now += 1.0  # a and b have refilled: they are forgotten to make room
    limiter.take("c")
