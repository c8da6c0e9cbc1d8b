"""Secure aggregation (SecAgg+) as fleet rounds: the coordinator only ever sees masked vectors and their sum.

`secure_fit` plays one SecAgg+ round (Bell et al. 2020) over any Fleet with four broadcast ``fit`` instructions
(advertise keys, share keys, masked input, unmask; the wire layout is in `fedloom.client.secure_trainer`), so the
transports need no change. Nodes run `SecureTrainer`. A node that fails at any stage has dropped out; the round
goes on while every neighbourhood keeps its threshold, otherwise it fails cleanly and the global model is kept.

Result: the example-weighted mean of the survivors' weights (FedAvg's aggregate), computed as
global + (sum of n'_i * clip(w_i - global)) / (sum of n'_i), with per-coordinate error at most `error_bound`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fedloom.client import secure_trainer as wire
from fedloom.fleet import Fleet
from fedloom.secagg.coordinator import SecAggCoordinator, default_degree
from fedloom.secagg.messages import InsufficientParticipants, KeyAdvert, MaskedInput, ProtocolViolation, SecAggError
from fedloom.secagg.quantize import QuantSpec
from fedloom.secagg.quantize import error_bound as sum_error
from fedloom.strategies.pipeline import SecureAggregation, Strategy, check_finite, check_structure, is_check
from fedloom.strategies.pipeline import weighted_mean as _weighted_mean
from fedloom.tensors import NamedTensors
from fedloom.types import FitRes, Instruction

log = logging.getLogger("fedloom.secure")

_MEAN = type(_weighted_mean())


@dataclass(frozen=True)
class SecureFit:
    """One secure round, as the driver sees it: no individual update, only the aggregate."""

    weights: NamedTensors | None  # the example-weighted mean of the survivors' weights; None if the round failed
    count: int  # survivors (clients whose update is in the sum)
    total_weight: float  # their (capped) example count
    failures: dict[str, str]
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def degree(settings: SecureAggregation, n: int) -> int:
    """The communication graph's degree for n participants (even when n is odd, as a regular graph needs)."""
    k = default_degree(n) if settings.neighbours == 0 else min(settings.neighbours, n - 1)
    return k - 1 if k % 2 and n % 2 else k


def threshold(settings: SecureAggregation, k: int) -> int:
    """Shares needed to unmask: more than ``threshold_fraction`` of a neighbourhood of k + 1."""
    return min(k + 1, math.floor(settings.threshold_fraction * (k + 1)) + 1)


def error_bound(settings: SecureAggregation, *, participants: int, survivors: int, total_examples: float) -> float:
    """Largest per-coordinate error of the secure mean against the exact weighted mean of the clipped deltas.

    With e = survivors / (2 * scale) the error of each coordinate of the quantized sum, a = sum of weighted deltas
    and b = clip * total / max_examples the count coordinate: |a'/b' - a/b| * clip <= clip * e * (1 + |a/b|) / (b - e)
    and |a/b| <= 1.
    """
    spec = QuantSpec(bits=settings.bits, clip=settings.clip, max_summands=participants)
    e = sum_error(spec, survivors)
    b = settings.clip * total_examples / settings.max_examples
    return math.inf if b <= e else settings.clip * 2 * e / (b - e)


def check_strategy(strategy: Strategy, fleet: Fleet | None = None) -> None:
    """Refuse what secure aggregation cannot do: it yields a weighted mean and never an individual update."""
    if not isinstance(strategy.aggregate, _MEAN):
        kind = "linear" if getattr(strategy.aggregate, "linear", False) else "robust (non-linear)"
        raise ValueError(f"strategy {strategy.name!r}: secure aggregation computes FedAvg's weighted mean; a {kind} "
                         "aggregator needs the individual updates it hides")
    bad = [type(p).__name__ for p in strategy.pre if not is_check(p)]
    if bad or hasattr(strategy.post, "preprocess") or hasattr(strategy.post, "broadcast"):
        raise ValueError(f"strategy {strategy.name!r}: steps {bad or [type(strategy.post).__name__]} need individual "
                         "updates, which secure aggregation hides (structure and finite checks run on the clients)")
    if getattr(fleet, "reduce_linear", False):
        raise ValueError("secure aggregation needs every client's own masked reply: turn off reduce_linear")


class FleetBroke(SecAggError):
    """The fleet itself failed during a stage."""


class _Round:
    """The coordinator's state of one secure round; each stage narrows the set of nodes still in it."""

    def __init__(self, fleet: Fleet, instruction: Instruction, settings: SecureAggregation, timeout: float):
        self.fleet, self.instruction, self.settings, self.timeout = fleet, instruction, settings, timeout
        self.session = os.urandom(16)
        self.model = NamedTensors((k, a) for k, a in instruction.weights.items())
        if wire.DATA in self.model:
            raise ValueError(f"the model may not have a tensor named {wire.DATA!r}")
        self.length = sum(a.size for a in self.model.values()) + 1
        self.failures: dict[str, str] = {}
        self.slots: dict[str, int] = {}
        self.coordinator: SecAggCoordinator | None = None
        self.params: wire.SetupParams | None = None
        self.adverts: list[KeyAdvert] = []
        self.bytes_down = self.bytes_up = 0
        self.seconds: dict[str, float] = {}

    def stage(self, stage: str, nodes: Sequence[str], payload: bytes, *, reply: int,
              model: NamedTensors | None = None) -> Iterator[tuple[str, bytes]]:
        """Broadcast one stage to ``nodes``; yields (node, reply bytes) as replies arrive, records failures."""
        room = wire.capacity(model) + 8 if model else 0
        tensors = NamedTensors({**(model or {}), wire.DATA: wire.data_tensor(payload, reply=reply, room=room)})
        config = {**self.instruction.config, wire.STAGE: stage, wire.SESSION: self.session.hex(),
                  "secagg_round": self.instruction.round}
        start = time.monotonic()
        self.bytes_down += tensors.nbytes * len(nodes)
        outcomes = self.fleet.run(Instruction("fit", self.instruction.round, tensors, config), nodes,
                                  timeout=self.timeout)
        while True:
            try:
                outcome = next(outcomes)
            except StopIteration:
                break
            except Exception as exc:  # the transport broke down: this round fails, not the run
                raise FleetBroke(f"the fleet failed at stage {stage!r}: {type(exc).__name__}: {exc}") from exc
            if not isinstance(outcome, FitRes):
                self.failures[outcome.node_id] = f"secure {stage}: {getattr(outcome, 'reason', 'not a fit result')}"
                continue
            self.bytes_up += outcome.weights.nbytes
            try:
                if outcome.weights.spec() != tensors.spec():
                    raise ProtocolViolation("the reply is not shaped like its instruction")
                data = wire.unpack_reply(outcome.weights)
            except ProtocolViolation as exc:
                self.failures[outcome.node_id] = f"secure {stage}: {exc}"
                continue
            node = outcome.node_id
            del outcome  # hold no reply beyond its bytes
            yield node, data
        self.seconds[stage] = time.monotonic() - start

    def drop(self, node: str, stage: str, reason: str) -> None:
        self.failures[node] = f"secure {stage}: {reason}"
        self.slots.pop(node, None)

    def advertise(self, selected: Sequence[str], min_clients: int) -> None:
        replies = dict(self.stage(wire.ADVERTISE, selected, b"", reply=wire.ADVERT_BYTES))
        for node in selected:
            if node in replies and len(replies[node]) != wire.ADVERT_BYTES:
                self.drop(node, wire.ADVERTISE, "malformed key advert")
                del replies[node]
        order = [node for node in selected if node in replies]  # slots follow the sampler's order: reproducible
        if len(order) < max(2, min_clients):
            raise InsufficientParticipants("advertise keys", len(order), max(2, min_clients), "clients in the round")
        self.slots = {node: slot for slot, node in enumerate(order, start=1)}
        k = degree(self.settings, len(order))
        s = self.settings
        self.params = wire.SetupParams(len(order), k, threshold(s, k), s.bits, s.clip, self.length, s.max_examples)
        self.coordinator = SecAggCoordinator(self.params.plan(self.session, self.instruction.round))
        self.adverts = [KeyAdvert(self.slots[n], replies[n][:32], replies[n][32:]) for n in order]
        self.coordinator.collect_adverts(self.adverts)

    def share(self) -> dict[int, bytes]:
        assert self.coordinator is not None
        setup, k = self.coordinator.setup, self.params.degree
        payload = wire.encode_setup(self.params, self.adverts)
        bundles = {}
        for node, data in self.stage(wire.SHARE, list(self.slots), payload, reply=k * wire.SHARE_ROW.itemsize):
            slot = self.slots[node]
            try:
                shares = wire.decode_shares(data)
            except ProtocolViolation as exc:
                self.drop(node, wire.SHARE, str(exc))
                continue
            if sorted(s.recipient for s in shares) != list(setup.neighbours_of(slot)) or \
                    any(s.sender != slot for s in shares):
                self.drop(node, wire.SHARE, "shares not addressed to exactly its neighbours")
                continue
            bundles[slot] = shares
        for node in [n for n, s in self.slots.items() if s not in bundles]:
            self.slots.pop(node)
        routed = self.coordinator.route_shares(bundles)
        return {u: wire.encode_shares(shares) for u, shares in routed.items()}

    def mask(self, routed: dict[int, bytes]) -> None:
        assert self.coordinator is not None
        payload = b"".join(routed[s] for s in sorted(routed))
        size = self.length * self.coordinator.setup.quant.dtype.itemsize
        received = set()
        for node, data in self.stage(wire.MASK, list(self.slots), payload, reply=size, model=self.model):
            if len(data) != size:
                self.failures[node] = "secure mask: masked input of the wrong size"
                continue
            self.coordinator.add_masked(MaskedInput(self.slots[node], data))  # folded as it arrives
            received.add(node)
        self.slots = {n: s for n, s in self.slots.items() if n in received}

    def unmask(self) -> np.ndarray:
        assert self.coordinator is not None and self.params is not None
        request = self.coordinator.unmask_request()
        reply = 8 + (self.params.degree + 1) * wire.REVEAL_ROW.itemsize
        responses = []
        for node, data in self.stage(wire.UNMASK, list(self.slots), wire.encode_request(request), reply=reply):
            try:
                responses.append(wire.decode_response(self.slots[node], data))
            except ProtocolViolation as exc:
                self.failures[node] = f"secure unmask: {exc}"
        return self.coordinator.finish(responses).total

    def mean(self, total: np.ndarray) -> tuple[NamedTensors, float]:
        """global + sum of weighted deltas / sum of weights, in the model's dtypes; and the total weight."""
        s = self.settings
        weight = float(total[-1])
        if not weight > 0:
            raise ProtocolViolation("the sum of the example counts is not positive")
        delta = total[:-1] * (s.clip / weight)
        out, offset = [], 0
        for name, array in self.model.items():
            new = np.asarray(array, np.float64) + delta[offset : offset + array.size].reshape(array.shape)
            offset += array.size
            out.append((name, (np.rint(new) if array.dtype.kind in "iub" else new).astype(array.dtype)))
        return NamedTensors(out), weight * s.max_examples / s.clip


def secure_fit(fleet: Fleet, instruction: Instruction, selected: Sequence[str], *, settings: SecureAggregation,
               timeout: float, min_clients: int = 2) -> SecureFit:
    """One SecAgg+ round of ``instruction`` (a fit of the global model) on ``selected`` nodes over ``fleet``.

    The round does not start (no node trains) unless ``min_clients`` (at least 2) advertise keys."""
    rnd = _Round(fleet, instruction, settings, timeout)
    try:
        rnd.advertise(selected, min_clients)
        rnd.mask(rnd.share())
        weights, total = rnd.mean(rnd.unmask())
    except SecAggError as exc:  # too many dropouts, or a message the round cannot go on with
        log.warning("round %d: secure aggregation failed: %s", instruction.round, exc)
        rnd.failures["*secure"] = f"{type(exc).__name__}: {exc}"
        return SecureFit(None, 0, 0.0, rnd.failures, rnd.bytes_down, rnd.bytes_up, rnd.seconds)
    return SecureFit(weights, len(rnd.slots), total, rnd.failures, rnd.bytes_down, rnd.bytes_up, rnd.seconds)


def secagg_fedavg(*, threshold_fraction: float = 0.5, neighbours: int = 0, bits: int = 32, clip: float = 1.0,
                  max_examples: int = 10_000) -> Strategy:
    """FedAvg under secure aggregation (SecAgg+): the coordinator never sees an individual update.

    Clients must run ``fedloom.client.secure_trainer.SecureTrainer``; see ``SecureAggregation`` for the settings.
    """
    secure = SecureAggregation(threshold_fraction=threshold_fraction, neighbours=neighbours, bits=bits, clip=clip,
                               max_examples=max_examples)
    return Strategy(name="secagg_fedavg", pre=(check_structure(), check_finite()), aggregate=_weighted_mean(),
                    secure=secure)


def secure(strategy: Strategy, settings: SecureAggregation | None = None) -> Strategy:
    """``strategy`` (e.g. ``fedadam()``) under secure aggregation; refuses what it cannot run."""
    out = replace(strategy, secure=settings or SecureAggregation())
    check_strategy(out)
    return out
