"""The node's side of secure aggregation (SecAgg+) over ordinary fit instructions, and the bytes it exchanges.

`SecureTrainer(inner)` wraps a user's trainer. The coordinator (`fedloom.server.secure`) runs four stages, each
an ordinary broadcast ``fit`` instruction with ``config["secagg_stage"]`` set; the stage's public data travels in
the uint8 tensor ``secagg/data`` of the instruction (every node gets all of it and picks what is addressed to
it). A node's answer is laid, as raw bytes behind an 8-byte length, over the tensors of the instruction it
answers, so a reply always has its instruction's names, dtypes and shapes (the gRPC fleet insists on that):

    advertise  in: nothing               out: the node's two public keys
    share      in: round setup, adverts  out: its key shares, sealed for its neighbours
    mask       in: model, routed shares  out: masked [clip(w - global) * n', n' * clip] / max_examples, n' = min(n, max)
    unmask     in: survivors, dropped    out: the shares the coordinator needs to remove the masks of the sum

The trainer object keeps the round's `SecAggClient` between stages (it persists on the node and in a Ray actor).
A plain ``fit`` (no stage) is refused unless ``allow_plain=True``: the update would leave the node in the clear.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from fedloom.client.trainer import Trainer
from fedloom.secagg import crypto
from fedloom.secagg.client import SHARE_BYTES, SecAggClient
from fedloom.secagg.coordinator import plan_round
from fedloom.secagg.messages import (
    EncryptedShare,
    KeyAdvert,
    ProtocolViolation,
    RevealedShare,
    RoundSetup,
    UnmaskRequest,
    UnmaskResponse,
)
from fedloom.tensors import NamedTensors
from fedloom.types import Config, Metrics

DATA = "secagg/data"
STAGE, SESSION = "secagg_stage", "secagg_session"
ADVERTISE, SHARE, MASK, UNMASK = "advertise", "share", "mask", "unmask"
ADVERT_BYTES = 2 * crypto.KEY_BYTES
_LEN = struct.Struct("<Q")
_SETUP = struct.Struct("<IIIIdQQ")  # n, degree, threshold, bits, clip, length, max_examples
_PAIR = struct.Struct("<II")
SHARE_ROW = np.dtype([("sender", "<u4"), ("recipient", "<u4"), ("nonce", "u1", (crypto.NONCE_BYTES,)),
                      ("ciphertext", "u1", (8 + 2 * SHARE_BYTES + 16,))])  # header, two shares, Poly1305 tag
REVEAL_ROW = np.dtype([("owner", "<u4"), ("share", "u1", (SHARE_BYTES,))])


# ----------------------------------------------------------------- carrying bytes in tensors


def data_tensor(payload: bytes, *, reply: int, room: int = 0) -> np.ndarray:
    """The ``secagg/data`` tensor: ``payload`` behind its length, sized so the instruction can carry a reply of
    ``reply`` bytes, given ``room`` bytes of other (model) tensors beside it."""
    size = max(_LEN.size + len(payload), _LEN.size + reply - room, _LEN.size)
    out = np.zeros(size, np.uint8)
    out[: _LEN.size + len(payload)] = np.frombuffer(_LEN.pack(len(payload)) + payload, np.uint8)
    return out


def read_data(tensors: NamedTensors) -> bytes:
    return _read_prefixed(np.ascontiguousarray(tensors[DATA]).tobytes(), DATA)


def capacity(tensors: NamedTensors) -> int:
    """Bytes a reply shaped like ``tensors`` can carry (bool tensors carry nothing: only 0/1 are valid)."""
    return sum(a.nbytes for a in tensors.values() if a.dtype != np.bool_) - _LEN.size


def pack_reply(template: NamedTensors, payload: bytes) -> NamedTensors:
    """``payload`` laid over tensors with the names, dtypes and shapes of ``template``."""
    room = capacity(template)
    if len(payload) > room:
        raise ValueError(f"a reply of {len(payload)} bytes does not fit the {room} bytes of its instruction")
    buffer = np.zeros(room + _LEN.size, np.uint8)
    buffer[: _LEN.size + len(payload)] = np.frombuffer(_LEN.pack(len(payload)) + payload, np.uint8)
    out, offset = [], 0
    for name, array in template.items():
        if array.dtype == np.bool_:
            out.append((name, np.zeros(array.shape, np.bool_)))
            continue
        out.append((name, buffer[offset : offset + array.nbytes].view(array.dtype).reshape(array.shape)))
        offset += array.nbytes
    return NamedTensors(out)


def unpack_reply(tensors: NamedTensors) -> bytes:
    raw = b"".join(np.ascontiguousarray(a).tobytes() for a in tensors.values() if a.dtype != np.bool_)
    return _read_prefixed(raw, "reply")


def _read_prefixed(raw: bytes, what: str) -> bytes:
    if len(raw) < _LEN.size:
        raise ProtocolViolation(f"{what} is too short")
    (size,) = _LEN.unpack_from(raw)
    if size > len(raw) - _LEN.size:
        raise ProtocolViolation(f"{what} claims {size} bytes but carries {len(raw) - _LEN.size}")
    return raw[_LEN.size : _LEN.size + size]


# ----------------------------------------------------------------- stage messages


@dataclass(frozen=True)
class SetupParams:
    """What the share stage tells every node about the round (the graph follows from it and the session)."""

    num_clients: int
    degree: int
    threshold: int
    bits: int
    clip: float
    length: int
    max_examples: int

    def plan(self, session: bytes, round_: int) -> RoundSetup:
        return _plan(self, session, round_)


@functools.lru_cache(maxsize=4)
def _plan(params: SetupParams, session: bytes, round_: int) -> RoundSetup:
    """The round's public setup; cached, as every client of a Ray actor or an in-process fleet computes the same."""
    p = params
    return plan_round(p.num_clients, threshold=p.threshold, length=p.length, degree=p.degree, bits=p.bits,
                      clip=p.clip, round_=round_, seed=graph_seed(session), session=session)


def graph_seed(session: bytes) -> int:
    return int.from_bytes(session[:8], "little")


def encode_setup(params: SetupParams, adverts: Iterable[KeyAdvert]) -> bytes:
    p = params
    head = _SETUP.pack(p.num_clients, p.degree, p.threshold, p.bits, p.clip, p.length, p.max_examples)
    return head + b"".join(a.enc_key + a.mask_key for a in sorted(adverts, key=lambda a: a.slot))


def decode_setup(data: bytes) -> tuple[SetupParams, list[KeyAdvert]]:
    if len(data) < _SETUP.size:
        raise ProtocolViolation("truncated round setup")
    params = SetupParams(*_SETUP.unpack_from(data))
    table = data[_SETUP.size :]
    if len(table) != params.num_clients * ADVERT_BYTES:
        raise ProtocolViolation("the advert table does not match the number of participants")
    adverts = [KeyAdvert(s + 1, table[i : i + 32], table[i + 32 : i + 64])
               for s, i in enumerate(range(0, len(table), ADVERT_BYTES))]
    return params, adverts


def encode_shares(shares: Iterable[EncryptedShare]) -> bytes:
    shares = list(shares)
    rows = np.zeros(len(shares), SHARE_ROW)
    for row, s in zip(rows, shares, strict=True):
        if len(s.ciphertext) != SHARE_ROW["ciphertext"].shape[0]:
            raise ProtocolViolation("unexpected ciphertext size")
        row["sender"], row["recipient"] = s.sender, s.recipient
        row["nonce"] = np.frombuffer(s.nonce, np.uint8)
        row["ciphertext"] = np.frombuffer(s.ciphertext, np.uint8)
    return rows.tobytes()


def decode_shares(data: bytes, *, recipient: int | None = None) -> list[EncryptedShare]:
    """The shares in ``data`` (only those for ``recipient`` when given)."""
    if len(data) % SHARE_ROW.itemsize:
        raise ProtocolViolation("share table of a malformed size")
    rows = np.frombuffer(data, SHARE_ROW)
    if recipient is not None:
        rows = rows[rows["recipient"] == recipient]
    return [EncryptedShare(int(r["sender"]), int(r["recipient"]), r["nonce"].tobytes(), r["ciphertext"].tobytes())
            for r in rows]


def encode_request(request: UnmaskRequest) -> bytes:
    ids = np.asarray([*request.survivors, *request.dropped], "<u4")
    return _PAIR.pack(len(request.survivors), len(request.dropped)) + ids.tobytes()


def decode_request(data: bytes) -> UnmaskRequest:
    survivors, dropped = _PAIR.unpack_from(data) if len(data) >= _PAIR.size else (-1, -1)
    if len(data) != _PAIR.size + 4 * (survivors + dropped) or survivors < 0:
        raise ProtocolViolation("malformed unmask request")
    ids = np.frombuffer(data, "<u4", offset=_PAIR.size).tolist()
    return UnmaskRequest(tuple(ids[:survivors]), tuple(ids[survivors:]))


def encode_response(response: UnmaskResponse) -> bytes:
    shares = [*response.seed_shares, *response.key_shares]
    rows = np.zeros(len(shares), REVEAL_ROW)
    for row, s in zip(rows, shares, strict=True):
        row["owner"], row["share"] = s.owner, np.frombuffer(s.share, np.uint8)
    return _PAIR.pack(len(response.seed_shares), len(response.key_shares)) + rows.tobytes()


def decode_response(slot: int, data: bytes) -> UnmaskResponse:
    seeds, keys = _PAIR.unpack_from(data) if len(data) >= _PAIR.size else (-1, -1)
    if seeds < 0 or len(data) != _PAIR.size + REVEAL_ROW.itemsize * (seeds + keys):
        raise ProtocolViolation(f"malformed unmask response from slot {slot}")
    rows = np.frombuffer(data, REVEAL_ROW, offset=_PAIR.size)
    shares = [RevealedShare(int(r["owner"]), r["share"].tobytes()) for r in rows]
    return UnmaskResponse(slot, tuple(shares[:seeds]), tuple(shares[seeds:]))


# ----------------------------------------------------------------- the trainer


def contribution(model: NamedTensors, trained: NamedTensors, num_examples: int, *, clip: float,
                 max_examples: int) -> np.ndarray:
    """[clip(w - global, +-clip) * n', n' * clip] with n' = min(n, max_examples) / max_examples: every entry lies
    in [-clip, clip], and the sum over clients gives FedAvg's mean as sum[:-1] * clip / sum[-1]."""
    if list(trained) != list(model) or any(trained[k].shape != a.shape or trained[k].dtype != a.dtype
                                           for k, a in model.items()):
        raise ValueError("the trained weights do not have the model's names, shapes and dtypes")
    if num_examples <= 0:
        raise ValueError(f"num_examples must be positive, got {num_examples}")
    weight = min(num_examples, max_examples) / max_examples
    parts = [np.asarray(trained[k], np.float64).ravel() - np.asarray(a, np.float64).ravel() for k, a in model.items()]
    delta = np.concatenate([*parts, [0.0]]) if parts else np.zeros(1)
    if not np.all(np.isfinite(delta)):
        raise ValueError("the trained weights are not finite")
    np.clip(delta, -clip, clip, out=delta)
    delta *= weight
    delta[-1] = weight * clip
    return delta


def _primed(first: list[bytes], fallback: crypto.Entropy) -> crypto.Entropy:
    """Entropy that yields ``first`` (the private keys advertised earlier) before falling back."""
    pending = list(first)

    def draw(n: int) -> bytes:
        return pending.pop(0) if pending and len(pending[0]) == n else fallback(n)

    return draw


@dataclass
class _Round:
    session: bytes
    keys: list[bytes]  # private encryption and mask keys, in the order SecAggClient draws them
    advert: bytes
    stage: str = ADVERTISE
    client: SecAggClient | None = None
    params: SetupParams | None = None


class SecureTrainer:
    """Wraps a Trainer so it trains only under secure aggregation; see the module docstring."""

    def __init__(self, inner: Trainer, *, allow_plain: bool = False, entropy: crypto.Entropy = os.urandom):
        self.inner, self.allow_plain, self._entropy = inner, allow_plain, entropy
        self._round: _Round | None = None

    def evaluate(self, weights: NamedTensors, config: Config) -> tuple[int, Metrics]:
        return self.inner.evaluate(weights, config)

    def fit(self, weights: NamedTensors, config: Config) -> tuple[NamedTensors, int, Metrics]:
        stage = config.get(STAGE)
        if stage is None:
            if self.allow_plain:
                return self.inner.fit(weights, config)
            raise PermissionError("this node trains only under secure aggregation (got a plain fit)")
        steps: dict[object, Callable[[NamedTensors, Config], bytes]] = {
            ADVERTISE: self._advertise, SHARE: self._share, MASK: self._mask, UNMASK: self._unmask}
        if stage not in steps:
            raise ProtocolViolation(f"unknown secure aggregation stage {stage!r}")
        return pack_reply(weights, steps[stage](weights, config)), 1, {}  # no example count in the clear

    def _current(self, config: Config, after: tuple[str, ...], stage: str) -> _Round:
        rnd = self._round
        if rnd is None or rnd.session.hex() != config.get(SESSION) or rnd.stage not in after:
            self._round = None
            raise ProtocolViolation(f"stage {stage!r} out of order or for an unknown session")
        rnd.stage = stage
        return rnd

    def _advertise(self, weights: NamedTensors, config: Config) -> bytes:
        session = bytes.fromhex(str(config.get(SESSION, "")))
        keys = [self._entropy(crypto.KEY_BYTES), self._entropy(crypto.KEY_BYTES)]
        advert = b"".join(crypto.public_of(k) for k in keys)
        self._round = _Round(session, keys, advert)
        return advert

    def _share(self, weights: NamedTensors, config: Config) -> bytes:
        rnd = self._current(config, (ADVERTISE,), SHARE)
        params, adverts = decode_setup(read_data(weights))
        mine = [a.slot for a in adverts if a.enc_key + a.mask_key == rnd.advert]
        if len(mine) != 1:
            raise ProtocolViolation("this node's advert is missing from the round setup")
        if 2 * params.threshold <= min(params.degree, params.num_clients - 1) + 1:
            raise ProtocolViolation(f"threshold {params.threshold} is not a majority of a neighbourhood")
        setup = params.plan(rnd.session, int(config.get("secagg_round", 0)))
        client = SecAggClient(setup, mine[0], entropy=_primed(rnd.keys, self._entropy))
        own = client.advertise()
        if own.enc_key + own.mask_key != rnd.advert:
            raise ProtocolViolation("the SecAgg client did not adopt the advertised keys")
        rnd.client, rnd.params, rnd.keys = client, params, []
        return encode_shares(client.share_keys(adverts[v - 1] for v in setup.neighbours_of(mine[0])))

    def _mask(self, weights: NamedTensors, config: Config) -> bytes:
        rnd = self._current(config, (SHARE,), MASK)
        client, params = rnd.client, rnd.params
        assert client is not None and params is not None
        delivered = decode_shares(read_data(weights), recipient=client.slot)
        if len(delivered) + 1 < params.threshold:  # fail before training, not after
            raise ProtocolViolation(f"only {len(delivered)} peers shared keys with slot {client.slot}")
        model = NamedTensors((k, a) for k, a in weights.items() if k != DATA)
        inner_config = {k: v for k, v in config.items() if not k.startswith("secagg_")}
        trained, n, _ = self.inner.fit(model, inner_config)
        x = contribution(model, NamedTensors(trained), int(n), clip=params.clip, max_examples=params.max_examples)
        return client.mask_input(delivered, x).data

    def _unmask(self, weights: NamedTensors, config: Config) -> bytes:
        rnd = self._current(config, (MASK, UNMASK), UNMASK)
        assert rnd.client is not None
        return encode_response(rnd.client.unmask(decode_request(read_data(weights))))
