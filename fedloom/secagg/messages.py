"""Messages and errors of secure aggregation (SecAgg, SecAgg+).

Participants of a round are numbered 1..n ("slots"); a slot is also the participant's Shamir evaluation point.
Every message a fleet carries is a frozen dataclass of ints and bytes (plus tuples of them).

Flow of one round (client -> coordinator -> client):

    RoundSetup (coordinator to all)
    1. KeyAdvert                    -> coordinator sends each client its neighbours' adverts
    2. tuple[EncryptedShare, ...]   -> coordinator routes each share to its recipient
    3. MaskedInput                  -> coordinator folds it into a running sum, then sends one UnmaskRequest
    4. UnmaskResponse               -> coordinator reconstructs secrets and removes the masks
"""

from __future__ import annotations

from dataclasses import dataclass

from fedloom.secagg.quantize import QuantSpec


class SecAggError(Exception):
    """The round cannot complete securely."""


class InsufficientParticipants(SecAggError):
    """Fewer than `threshold` participants (or shares) remain at some stage."""

    def __init__(self, stage: str, have: int, need: int, detail: str = "") -> None:
        self.stage, self.have, self.need = stage, have, need
        extra = f" ({detail})" if detail else ""
        super().__init__(f"secure aggregation aborted at stage {stage!r}: {have} remain, threshold is {need}{extra}")


class ProtocolViolation(SecAggError):
    """A message is malformed, forged, tampered with or inconsistent with the round."""


class RevealRefused(ProtocolViolation):
    """A client was asked to reveal both its self-mask share and its mask-key share for one peer."""


@dataclass(frozen=True)
class RoundSetup:
    """Stage 0: public parameters of one round, chosen by the coordinator.

    neighbours[i] lists the slots adjacent to slot i+1 in the (symmetric) communication graph; a complete graph is
    classic SecAgg, a sparse k-regular one SecAgg+. A client's secrets are shared among itself and its neighbours,
    `threshold` of whom must survive to recover them. `session` is fresh per round and bound into every key
    derivation, signature and ciphertext, so messages cannot be replayed across rounds.
    """

    session: bytes
    round: int
    threshold: int
    neighbours: tuple[tuple[int, ...], ...]
    length: int
    quant: QuantSpec

    def __post_init__(self) -> None:
        n = len(self.neighbours)
        if len(self.session) < 16:
            raise ValueError("session must be at least 16 random bytes")
        if self.length < 1:
            raise ValueError("length must be positive")
        for slot, adjacent in enumerate(self.neighbours, start=1):
            if slot in adjacent or len(set(adjacent)) != len(adjacent):
                raise ValueError(f"slot {slot} has a self-loop or a repeated neighbour")
            for v in adjacent:
                if not 1 <= v <= n or slot not in self.neighbours[v - 1]:
                    raise ValueError(f"edge {slot}-{v} is out of range or not symmetric")
        holders = 1 + min((len(a) for a in self.neighbours), default=0)  # a client and its neighbours
        if not 1 <= self.threshold <= holders:
            raise ValueError(f"threshold must be in 1..{holders} (smallest neighbourhood + 1), got {self.threshold}")
        if self.quant.max_summands < n:
            raise ValueError("quantization headroom must cover all participants")

    @property
    def num_clients(self) -> int:
        return len(self.neighbours)

    def neighbours_of(self, slot: int) -> tuple[int, ...]:
        if not 1 <= slot <= self.num_clients:
            raise ProtocolViolation(f"unknown slot {slot}")
        return self.neighbours[slot - 1]


@dataclass(frozen=True)
class KeyAdvert:
    """Stage 1: a client's two X25519 public keys (c: encryption, s: masking), optionally Ed25519-signed."""

    slot: int
    enc_key: bytes
    mask_key: bytes
    signature: bytes = b""


@dataclass(frozen=True)
class EncryptedShare:
    """Stage 2: the sender's shares of its self-mask seed and mask key, sealed for one recipient."""

    sender: int
    recipient: int
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class MaskedInput:
    """Stage 3: y = x + PRG(b) + sum_v +-PRG(s_uv) mod 2^bits, as little-endian unsigned integers."""

    slot: int
    data: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 4: who sent a masked input (survivors) and who shared keys but did not (dropped)."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class RevealedShare:
    owner: int
    share: bytes


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 4: self-mask-seed shares of survivors and mask-key shares of dropped peers."""

    slot: int
    seed_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]
