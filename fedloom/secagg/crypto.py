"""Cryptographic primitives of secure aggregation, all from the `cryptography` package.

- key agreement: X25519, the shared secret stretched by HKDF-SHA256 with a label that binds purpose, session,
  round and the (unordered) pair of slots;
- authenticated encryption: ChaCha20-Poly1305 with associated data binding session, round, sender, recipient;
- pseudorandom generator: the ChaCha20 keystream under a 32-byte seed (each seed expands exactly one mask);
- optional signatures on key adverts: Ed25519.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedloom.secagg.messages import ProtocolViolation

Entropy = Callable[[int], bytes]
KEY_BYTES = 32
NONCE_BYTES = 12
_PRG_NONCE = bytes(16)  # fixed: a PRG seed is never reused


def keypair(entropy: Entropy) -> tuple[bytes, bytes]:
    """A fresh X25519 (private, public) pair as raw bytes."""
    private = X25519PrivateKey.from_private_bytes(entropy(KEY_BYTES))
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _label(purpose: bytes, session: bytes, round_: int, a: int, b: int) -> bytes:
    lo, hi = min(a, b), max(a, b)
    return (
        b"fedloom/secagg/" + purpose + struct.pack(">H", len(session)) + session + struct.pack(">qII", round_, lo, hi)
    )


def agree(private: bytes, peer_public: bytes, *, purpose: bytes, session: bytes, round_: int, a: int, b: int) -> bytes:
    """32-byte key shared by slots a and b: HKDF(X25519(private, peer_public)) under a binding label."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:  # malformed or low-order public key
        raise ProtocolViolation(f"bad public key in agreement between slots {a} and {b}") from err
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_label(purpose, session, round_, a, b))
    return hkdf.derive(shared)


def share_ad(session: bytes, round_: int, sender: int, recipient: int) -> bytes:
    """Associated data of an encrypted share: the ciphertext only opens for this session, round and direction."""
    return b"fedloom/secagg/share" + session + struct.pack(">qII", round_, sender, recipient)


def seal(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def open_sealed(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """Decrypt and authenticate; any tampering with key, nonce, ciphertext or associated data raises."""
    if len(nonce) != NONCE_BYTES:
        raise ProtocolViolation("bad nonce length")
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, ad)
    except InvalidTag as err:
        raise ProtocolViolation("encrypted share failed authentication (tampered or misrouted)") from err


def prg(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """`length` pseudorandom integers of `dtype` from the ChaCha20 keystream keyed by `seed`."""
    if len(seed) != KEY_BYTES:
        raise ValueError("PRG seed must be 32 bytes")
    nbytes = length * dtype.itemsize
    stream = Cipher(algorithms.ChaCha20(seed, _PRG_NONCE), mode=None).encryptor().update(bytes(nbytes))
    return np.frombuffer(stream, dtype=dtype).copy()


def advert_payload(session: bytes, round_: int, slot: int, enc_key: bytes, mask_key: bytes) -> bytes:
    return b"fedloom/secagg/advert" + session + struct.pack(">qI", round_, slot) + enc_key + mask_key


def sign(signing_key: bytes, payload: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(signing_key).sign(payload)


def verify(verify_key: bytes, signature: bytes, payload: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(verify_key).verify(signature, payload)
    except (InvalidSignature, ValueError):
        return False
    return True


def signing_public(signing_key: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(signing_key).public_key().public_bytes_raw()
