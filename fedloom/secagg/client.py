"""The client side of SecAgg / SecAgg+: one object per client per round, advanced stage by stage.

The client never sends its input in the clear: the coordinator receives only x + PRG(b_u) + sum_v +-PRG(s_uv)
mod 2^bits, and later, for each peer, either a share of its self-mask seed b (peer survived) or a share of its
mask key s (peer dropped), never both.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping

import numpy as np

from fedloom.secagg import crypto, shamir
from fedloom.secagg.messages import (
    EncryptedShare,
    InsufficientParticipants,
    KeyAdvert,
    MaskedInput,
    ProtocolViolation,
    RevealedShare,
    RevealRefused,
    RoundSetup,
    UnmaskRequest,
    UnmaskResponse,
)
from fedloom.secagg.quantize import quantize

SHARE_BYTES = shamir.share_size(crypto.KEY_BYTES)
_HEADER = struct.Struct(">II")  # sender, recipient inside the plaintext too


def mask_sign(u: int, v: int) -> int:
    """+1 if u adds PRG(s_uv), -1 if it subtracts it: the lower slot adds, so each pair cancels in the sum."""
    return 1 if u < v else -1


class SecAggClient:
    """Explicit per-round client state; each stage method may be called once, in order (unmask may repeat)."""

    def __init__(
        self,
        setup: RoundSetup,
        slot: int,
        *,
        entropy: crypto.Entropy = os.urandom,
        signing_key: bytes | None = None,
        verify_keys: Mapping[int, bytes] | None = None,
    ) -> None:
        self.setup, self.slot = setup, slot
        self._neighbours = frozenset(setup.neighbours_of(slot))
        self._entropy, self._signing_key, self._verify_keys = entropy, signing_key, verify_keys
        self._enc_sk, self._enc_pk = crypto.keypair(entropy)
        mask_sk, self._mask_pk = crypto.keypair(entropy)
        self._mask_sk: bytes | None = mask_sk
        self._seed: bytes | None = None
        self._book: dict[int, KeyAdvert] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner -> (seed share, mask-key share)
        self._revealed: dict[int, str] = {}  # owner -> "seed" | "key"
        self._stage = 1

    def _enter(self, stage: int) -> None:
        if self._stage != stage:
            raise ProtocolViolation(f"slot {self.slot}: stage {stage} requested while at stage {self._stage}")
        self._stage = stage + 1

    def advertise(self) -> KeyAdvert:
        """Stage 1: publish both public keys, signed when a signing key was given."""
        self._enter(1)
        signature = b""
        if self._signing_key is not None:
            payload = crypto.advert_payload(
                self.setup.session, self.setup.round, self.slot, self._enc_pk, self._mask_pk
            )
            signature = crypto.sign(self._signing_key, payload)
        return KeyAdvert(self.slot, self._enc_pk, self._mask_pk, signature)

    def _accept_book(self, book: Iterable[KeyAdvert]) -> None:
        seen_keys = {self._enc_pk, self._mask_pk}
        for advert in book:
            if advert.slot == self.slot:
                continue
            if advert.slot not in self._neighbours or advert.slot in self._book:
                raise ProtocolViolation(f"slot {self.slot}: unexpected or repeated advert from {advert.slot}")
            if self._verify_keys is not None:
                payload = crypto.advert_payload(
                    self.setup.session, self.setup.round, advert.slot, advert.enc_key, advert.mask_key
                )
                key = self._verify_keys.get(advert.slot)
                if key is None or not crypto.verify(key, advert.signature, payload):
                    raise ProtocolViolation(f"slot {self.slot}: bad signature on the advert of {advert.slot}")
            if advert.enc_key in seen_keys or advert.mask_key in seen_keys or advert.enc_key == advert.mask_key:
                raise ProtocolViolation(f"slot {self.slot}: repeated public key in the advert of {advert.slot}")
            seen_keys.update((advert.enc_key, advert.mask_key))
            self._book[advert.slot] = advert

    def share_keys(self, book: Iterable[KeyAdvert]) -> tuple[EncryptedShare, ...]:
        """Stage 2: Shamir-share b_u and s_u among the advertised neighbours and itself (as in SecAgg, the
        holder set includes the owner, so a survivor's own share counts towards the threshold); the
        neighbours' shares are sealed for them."""
        self._enter(2)
        self._accept_book(book)
        t = self.setup.threshold
        if len(self._book) + 1 < t:
            raise InsufficientParticipants("share keys", len(self._book) + 1, t, f"neighbourhood of slot {self.slot}")
        self._seed = self._entropy(crypto.KEY_BYTES)
        mask_sk = self._mask_sk
        assert mask_sk is not None
        holders = [*sorted(self._book), self.slot]
        seed_shares = shamir.split_bytes(self._seed, threshold=t, xs=holders, entropy=self._entropy)
        key_shares = shamir.split_bytes(mask_sk, threshold=t, xs=holders, entropy=self._entropy)
        self._held[self.slot] = (seed_shares[self.slot], key_shares[self.slot])
        out = []
        for v in holders[:-1]:
            plaintext = _HEADER.pack(self.slot, v) + seed_shares[v] + key_shares[v]
            nonce = self._entropy(crypto.NONCE_BYTES)
            key = self._pair_key(b"enc", self._enc_sk, self._book[v].enc_key, v)
            ad = crypto.share_ad(self.setup.session, self.setup.round, self.slot, v)
            out.append(EncryptedShare(self.slot, v, nonce, crypto.seal(key, nonce, plaintext, ad)))
        return tuple(out)

    def _pair_key(self, purpose: bytes, private: bytes, peer_public: bytes, peer: int) -> bytes:
        return crypto.agree(
            private,
            peer_public,
            purpose=purpose,
            session=self.setup.session,
            round_=self.setup.round,
            a=self.slot,
            b=peer,
        )

    def _receive(self, delivered: Iterable[EncryptedShare]) -> None:
        for share in delivered:
            sender = share.sender
            if share.recipient != self.slot or sender not in self._book or sender in self._held:
                raise ProtocolViolation(f"slot {self.slot}: misrouted or repeated share from {sender}")
            key = self._pair_key(b"enc", self._enc_sk, self._book[sender].enc_key, sender)
            ad = crypto.share_ad(self.setup.session, self.setup.round, sender, self.slot)
            plaintext = crypto.open_sealed(key, share.nonce, share.ciphertext, ad)
            if len(plaintext) != _HEADER.size + 2 * SHARE_BYTES or _HEADER.unpack_from(plaintext) != (
                sender,
                self.slot,
            ):
                raise ProtocolViolation(f"slot {self.slot}: malformed share from {sender}")
            body = plaintext[_HEADER.size :]
            self._held[sender] = (body[:SHARE_BYTES], body[SHARE_BYTES:])

    def mask_input(self, delivered: Iterable[EncryptedShare], x: np.ndarray) -> MaskedInput:
        """Stage 3: decrypt the shares routed here, then mask x with b_u and with s_uv for every sender v."""
        self._enter(3)
        self._receive(delivered)
        t = self.setup.threshold
        if len(self._held) < t:
            raise InsufficientParticipants("masked input", len(self._held), t, f"neighbourhood of slot {self.slot}")
        spec = self.setup.quant
        y = quantize(x, spec)
        if y.size != self.setup.length:
            raise ValueError(f"input has {y.size} elements, the round expects {self.setup.length}")
        seed, mask_sk = self._seed, self._mask_sk
        assert seed is not None and mask_sk is not None
        y += crypto.prg(seed, y.size, spec.dtype)
        for v in sorted(self._held.keys() - {self.slot}):
            pair_seed = self._pair_key(b"mask", mask_sk, self._book[v].mask_key, v)
            if mask_sign(self.slot, v) > 0:
                y += crypto.prg(pair_seed, y.size, spec.dtype)
            else:
                y -= crypto.prg(pair_seed, y.size, spec.dtype)
        y &= spec.dtype.type(spec.mask)
        self._seed = self._mask_sk = None  # no longer needed: only the neighbours' shares hold them now
        return MaskedInput(self.slot, y.tobytes())

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Stage 4: reveal seed shares of survivors and key shares of dropped peers, never both for one peer."""
        if self._stage not in (4, 5):
            raise ProtocolViolation(f"slot {self.slot}: unmask requested while at stage {self._stage}")
        self._stage = 5
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise RevealRefused(f"slot {self.slot}: peers {sorted(survivors & dropped)} listed as survivor and dropped")
        if self.slot not in survivors:
            raise RevealRefused(f"slot {self.slot}: not listed among the survivors")
        if len(survivors) < self.setup.threshold:
            raise InsufficientParticipants("unmask", len(survivors), self.setup.threshold)
        wanted = {v: "seed" for v in survivors & self._held.keys()} | {v: "key" for v in dropped & self._held.keys()}
        clash = sorted(v for v, kind in wanted.items() if self._revealed.get(v, kind) != kind)
        if clash:
            raise RevealRefused(f"slot {self.slot}: already revealed the other share of peers {clash}")
        self._revealed.update(wanted)
        seeds = tuple(RevealedShare(v, self._held[v][0]) for v, k in sorted(wanted.items()) if k == "seed")
        keys = tuple(RevealedShare(v, self._held[v][1]) for v, k in sorted(wanted.items()) if k == "key")
        return UnmaskResponse(self.slot, seeds, keys)
