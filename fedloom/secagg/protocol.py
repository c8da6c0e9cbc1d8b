"""Secure aggregation (SecAgg, Bonawitz et al. CCS 2017; SecAgg+, Bell et al. CCS 2020), transport-free.

Stages of one round; a fleet carries the messages of `fedloom.secagg.messages` between
`SecAggClient` (one per participant) and `SecAggCoordinator`:

    0 setup      plan_round -> RoundSetup to every participant
    1 advertise  client.advertise() -> KeyAdvert;  coordinator.collect_adverts(...) -> key book per client
    2 share      client.share_keys(book) -> sealed shares;  coordinator.route_shares(...) -> shares per recipient
    3 mask       client.mask_input(shares, x) -> MaskedInput;  coordinator.add_masked(...) as each arrives
    4 unmask     coordinator.unmask_request() to survivors; client.unmask(req) -> UnmaskResponse;
                 coordinator.finish(responses) -> SecAggResult (the float sum of the survivors' inputs)

A client that misses a stage has dropped out: it takes no part in later stages. `run_secagg` plays a whole
round in memory, with dropouts, for tests and benchmarks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Set
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from fedloom.secagg import crypto
from fedloom.secagg.client import SecAggClient
from fedloom.secagg.coordinator import SecAggCoordinator, plan_round
from fedloom.secagg.messages import InsufficientParticipants, RoundSetup

T = TypeVar("T")

ADVERTISE, SHARE, MASK, UNMASK = 1, 2, 3, 4
STAGES = {ADVERTISE: "advertise keys", SHARE: "share keys", MASK: "masked input", UNMASK: "unmask"}


@dataclass(frozen=True)
class SimulationResult:
    total: np.ndarray  # dequantized sum of the survivors' inputs
    survivors: tuple[Hashable, ...]  # ids whose inputs are in the sum
    masked: dict[Hashable, np.ndarray]  # what the coordinator received at stage 3 (its whole view of inputs)
    setup: RoundSetup
    timings: dict[str, float] = field(default_factory=dict)  # seconds per 'clients:<stage>' / 'coordinator:<stage>'


class _Round:
    """Book-keeping of one simulated round: who is still online, and per-stage wall time."""

    def __init__(self, clients: dict[int, SecAggClient], dropouts: Mapping[int, Set[int]]) -> None:
        self.clients, self.dropouts = clients, dropouts
        self.online = set(clients)
        self.timings: dict[str, float] = {}

    def active(self, stage: int) -> list[int]:
        self.online -= self.dropouts.get(stage, set())
        return sorted(self.online)

    def call(self, slot: int, fn: Callable[..., T], *args: object) -> T | None:
        """Run one client step; a client that aborts for lack of peers simply drops out."""
        try:
            return fn(*args)
        except InsufficientParticipants:
            self.online.discard(slot)
            return None


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def run_secagg(
    inputs: Mapping[Hashable, np.ndarray],
    *,
    threshold: int,
    neighbours: int | None = None,
    dropouts_at_stage: Mapping[int, Set[Hashable]] | None = None,
    seed: int = 0,
    bits: int = 32,
    clip: float = 1.0,
    signed: bool = False,
) -> SimulationResult:
    """Simulate one round in memory. neighbours=None is classic SecAgg (complete graph), else SecAgg+ with
    that degree. dropouts_at_stage[s] lists ids that go silent at stage s (1..4) and stay silent afterwards.
    Raises InsufficientParticipants when too few remain to finish.
    """
    ids = sorted(inputs)
    slot_of = {node: i for i, node in enumerate(ids, start=1)}
    length = int(np.asarray(inputs[ids[0]]).size)
    setup = plan_round(len(ids), threshold=threshold, length=length, degree=neighbours, bits=bits, clip=clip, seed=seed)
    signing = {s: os.urandom(32) for s in slot_of.values()} if signed else {}
    verify = {s: crypto.signing_public(k) for s, k in signing.items()} if signed else None
    clients = {s: SecAggClient(setup, s, signing_key=signing.get(s), verify_keys=verify) for s in slot_of.values()}
    drops = {st: {slot_of[i] for i in who} for st, who in (dropouts_at_stage or {}).items()}
    rnd, coord = _Round(clients, drops), SecAggCoordinator(setup, verify_keys=verify)
    t = rnd.timings
    with _timed(t, "clients:advertise"):
        adverts = [clients[s].advertise() for s in rnd.active(ADVERTISE)]
    with _timed(t, "coordinator:advertise"):
        books = coord.collect_adverts(adverts)
    with _timed(t, "clients:share"):
        bundles = {s: rnd.call(s, clients[s].share_keys, books.get(s, ())) for s in rnd.active(SHARE)}
    with _timed(t, "coordinator:share"):
        routed = coord.route_shares({s: b for s, b in bundles.items() if b is not None})
    masked: dict[Hashable, np.ndarray] = {}
    for s in rnd.active(MASK):
        with _timed(t, "clients:mask"):
            m = rnd.call(s, clients[s].mask_input, routed.get(s, ()), np.asarray(inputs[ids[s - 1]]))
        if m is not None:
            with _timed(t, "coordinator:mask"):
                coord.add_masked(m)
            masked[ids[s - 1]] = np.frombuffer(m.data, dtype=setup.quant.dtype)
    request = coord.unmask_request()
    with _timed(t, "clients:unmask"):
        responses = [clients[s].unmask(request) for s in rnd.active(UNMASK) if s in set(request.survivors)]
    with _timed(t, "coordinator:unmask"):
        result = coord.finish(responses)
    shape = np.asarray(inputs[ids[0]]).shape
    survivors = tuple(ids[s - 1] for s in result.survivors)
    return SimulationResult(result.total.reshape(shape), survivors, masked, setup, t)
