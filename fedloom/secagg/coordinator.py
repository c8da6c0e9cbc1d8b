"""The coordinator side of SecAgg / SecAgg+: round planning, message routing, folding and unmasking.

The coordinator sees public keys, ciphertexts it cannot open, masked vectors (folded into one running sum as
they arrive) and, at the end, enough shares to remove the masks of the sum, never of a single input.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedloom.secagg import crypto, shamir
from fedloom.secagg.client import SHARE_BYTES, mask_sign
from fedloom.secagg.messages import (
    EncryptedShare,
    InsufficientParticipants,
    KeyAdvert,
    MaskedInput,
    ProtocolViolation,
    RoundSetup,
    UnmaskRequest,
    UnmaskResponse,
)
from fedloom.secagg.quantize import QuantSpec, dequantize_sum


def default_degree(n: int) -> int:
    """SecAgg+ neighbourhood size k ~ 2 log2(n), even, capped at the complete graph n-1."""
    k = 2 * math.ceil(math.log2(max(n, 2)))
    return min(k, n - 1)


def harary_graph(n: int, k: int, *, seed: int) -> tuple[tuple[int, ...], ...]:
    """A k-regular graph on slots 1..n: a Harary graph over a seeded random permutation of the slots.

    Position i is joined to positions i +- 1..k//2 (mod n), and for odd k (needs even n) to i + n/2.
    With k = n-1 it is the complete graph. The graph is public, so a seeded numpy permutation is fine here.
    """
    if not 1 <= k <= n - 1:
        raise ValueError(f"degree must be in 1..{n - 1}, got {k}")
    if k % 2 and n % 2:
        raise ValueError(f"no {k}-regular graph on {n} nodes (odd degree needs an even count)")
    order = [int(s) + 1 for s in np.random.default_rng(seed).permutation(n)]
    adjacent: dict[int, set[int]] = {s: set() for s in order}
    offsets = list(range(1, k // 2 + 1)) + ([n // 2] if k % 2 else [])
    for i, slot in enumerate(order):
        for d in offsets:
            for j in (i + d, i - d):
                adjacent[slot].add(order[j % n])
    return tuple(tuple(sorted(adjacent[s])) for s in range(1, n + 1))


def plan_round(
    num_clients: int,
    *,
    threshold: int,
    length: int,
    degree: int | None = None,
    bits: int = 32,
    clip: float = 1.0,
    round_: int = 0,
    seed: int = 0,
    session: bytes | None = None,
) -> RoundSetup:
    """Stage 0: graph, threshold and quantization of one round. degree None -> classic SecAgg (complete graph)."""
    k = num_clients - 1 if degree is None else degree
    return RoundSetup(
        session=os.urandom(16) if session is None else session,
        round=round_,
        threshold=threshold,
        neighbours=harary_graph(num_clients, k, seed=seed),
        length=length,
        quant=QuantSpec(bits=bits, clip=clip, max_summands=num_clients),
    )


@dataclass(frozen=True)
class SecAggResult:
    total: np.ndarray  # float64 sum of the survivors' (clipped, quantized) inputs
    raw: np.ndarray  # the same sum in Z_{2^bits}
    survivors: tuple[int, ...]  # slots whose inputs are in the sum


class SecAggCoordinator:
    """Explicit per-round coordinator state; call the stage methods in order."""

    def __init__(self, setup: RoundSetup, *, verify_keys: Mapping[int, bytes] | None = None) -> None:
        self.setup, self._verify_keys = setup, verify_keys
        self._adverts: dict[int, KeyAdvert] = {}
        self._masked_with: dict[int, set[int]] = {}  # u -> senders whose shares reached u (u's pair masks)
        self._sharers: set[int] = set()
        self._received: set[int] = set()
        self._sum = np.zeros(setup.length, dtype=setup.quant.dtype)
        self._request: UnmaskRequest | None = None

    def _require(self, stage: str, have: int) -> None:
        if have < self.setup.threshold:
            raise InsufficientParticipants(stage, have, self.setup.threshold)

    def collect_adverts(self, adverts: Iterable[KeyAdvert]) -> dict[int, tuple[KeyAdvert, ...]]:
        """Stage 1 -> 2: keep valid adverts; returns, per advertiser, its advertised neighbours' adverts."""
        for a in adverts:
            self.setup.neighbours_of(a.slot)
            if a.slot in self._adverts:
                raise ProtocolViolation(f"repeated advert from slot {a.slot}")
            if self._verify_keys is not None:
                payload = crypto.advert_payload(self.setup.session, self.setup.round, a.slot, a.enc_key, a.mask_key)
                key = self._verify_keys.get(a.slot)
                if key is None or not crypto.verify(key, a.signature, payload):
                    raise ProtocolViolation(f"bad signature on the advert of slot {a.slot}")
            self._adverts[a.slot] = a
        self._require("advertise keys", len(self._adverts))
        return {
            u: tuple(self._adverts[v] for v in self.setup.neighbours_of(u) if v in self._adverts)
            for u in sorted(self._adverts)
        }

    def route_shares(self, bundles: Mapping[int, Iterable[EncryptedShare]]) -> dict[int, tuple[EncryptedShare, ...]]:
        """Stage 2 -> 3: bundles keyed by sender; returns, per recipient, the sealed shares addressed to it."""
        routed: dict[int, list[EncryptedShare]] = {u: [] for u in self._adverts}
        for sender, shares in bundles.items():
            if sender not in self._adverts or sender in self._sharers:
                raise ProtocolViolation(f"unexpected share bundle from slot {sender}")
            self._sharers.add(sender)
            for s in shares:
                if s.sender != sender or s.recipient not in self._adverts:
                    raise ProtocolViolation(f"slot {sender} sent a share for slot {s.recipient} under another name")
                if s.recipient not in self.setup.neighbours_of(sender):
                    raise ProtocolViolation(f"slot {sender} sent a share to non-neighbour {s.recipient}")
                routed[s.recipient].append(s)
        self._require("share keys", len(self._sharers))
        for u, shares in routed.items():
            self._masked_with[u] = {s.sender for s in shares}
        return {u: tuple(shares) for u, shares in routed.items()}

    def add_masked(self, masked: MaskedInput) -> None:
        """Stage 3: fold one masked vector into the running sum (memory stays one vector)."""
        if self._request is not None:
            raise ProtocolViolation("masked input after the unmask request was sent")
        if masked.slot not in self._sharers or masked.slot in self._received:
            raise ProtocolViolation(f"unexpected or repeated masked input from slot {masked.slot}")
        dtype = self.setup.quant.dtype
        if len(masked.data) != self.setup.length * dtype.itemsize:
            raise ProtocolViolation(f"masked input of slot {masked.slot} has the wrong size")
        self._sum += np.frombuffer(masked.data, dtype=dtype)
        self._received.add(masked.slot)

    def unmask_request(self) -> UnmaskRequest:
        """Stage 3 -> 4: close the input set; the same request goes to every survivor."""
        if self._request is None:
            self._require("masked input", len(self._received))
            dropped = tuple(sorted(self._sharers - self._received))
            self._request = UnmaskRequest(tuple(sorted(self._received)), dropped)
        return self._request

    def _gather(
        self, responses: Iterable[UnmaskResponse]
    ) -> tuple[dict[int, dict[int, bytes]], dict[int, dict[int, bytes]]]:
        """Shares by owner and holder: seed shares of survivors, key shares of dropped peers."""
        request = self.unmask_request()
        survivors, dropped = set(request.survivors), set(request.dropped)
        seeds: dict[int, dict[int, bytes]] = {u: {} for u in survivors}
        keys: dict[int, dict[int, bytes]] = {v: {} for v in dropped}
        responders: set[int] = set()
        for r in responses:
            if r.slot not in survivors or r.slot in responders:
                raise ProtocolViolation(f"unexpected or repeated unmask response from slot {r.slot}")
            responders.add(r.slot)
            for kind, table, shares in (("seed", seeds, r.seed_shares), ("key", keys, r.key_shares)):
                for s in shares:
                    holds = s.owner == r.slot or s.owner in self._masked_with.get(r.slot, ())
                    if s.owner not in table or not holds:
                        raise ProtocolViolation(f"slot {r.slot} revealed an unrequested {kind} share of {s.owner}")
                    if len(s.share) != SHARE_BYTES:
                        raise ProtocolViolation(f"slot {r.slot} revealed a malformed share of {s.owner}")
                    table[s.owner][r.slot] = s.share
        self._require("unmask", len(responders))
        return seeds, keys

    def _reconstruct(self, owner: int, shares: dict[int, bytes], what: str) -> bytes:
        t = self.setup.threshold
        if len(shares) < t:
            raise InsufficientParticipants("unmask", len(shares), t, f"shares of the {what} of slot {owner}")
        chosen = {x: shares[x] for x in sorted(shares)[:t]}
        try:
            return shamir.reconstruct_bytes(chosen, length=crypto.KEY_BYTES)
        except ValueError as err:
            raise ProtocolViolation(f"shares of the {what} of slot {owner} are inconsistent") from err

    def finish(self, responses: Iterable[UnmaskResponse]) -> SecAggResult:
        """Stage 4: reconstruct b_u of survivors and s_v of dropped peers; strip every mask from the sum."""
        seeds, keys = self._gather(responses)
        spec, setup = self.setup.quant, self.setup
        total = self._sum.copy()
        for u in sorted(seeds):
            total -= crypto.prg(self._reconstruct(u, seeds[u], "self-mask seed"), setup.length, spec.dtype)
        for v in sorted(keys):
            mask_sk = self._reconstruct(v, keys[v], "mask key")
            if crypto.public_of(mask_sk) != self._adverts[v].mask_key:
                raise ProtocolViolation(f"reconstructed mask key of slot {v} does not match its advert")
            for u in sorted(seeds):
                if v not in self._masked_with.get(u, ()):
                    continue
                pair_seed = crypto.agree(
                    mask_sk,
                    self._adverts[u].mask_key,
                    purpose=b"mask",
                    session=setup.session,
                    round_=setup.round,
                    a=u,
                    b=v,
                )
                mask = crypto.prg(pair_seed, setup.length, spec.dtype)
                total = total - mask if mask_sign(u, v) > 0 else total + mask
        total &= spec.dtype.type(spec.mask)
        survivors = tuple(sorted(seeds))
        return SecAggResult(dequantize_sum(total, count=len(survivors), spec=spec), total, survivors)
