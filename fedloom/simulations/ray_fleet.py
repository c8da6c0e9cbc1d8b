"""The Ray fleet: many virtual clients on a pool of long-lived Ray actors.

Client ``i`` (node id ``str(i)``) lives on actor ``i % num_actors``. An actor
builds a client's trainer once with the user's ``trainer_factory(i)`` and keeps
it across rounds (least recently used first out, past ``max_cached_clients``).
Each round the global weights go into the object store once; every actor gets
its whole batch of clients in one call and runs each through
``fedloom.client.trainer.execute``, so a client that raises is a Failure, and
an actor that dies is a Failure for each of its clients.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayError

from fedloom.client.trainer import Trainer, execute
from fedloom.fleet import FleetError
from fedloom.tensors import NamedTensors
from fedloom.types import Config, Failure, FitRes, Instruction, Outcome

TrainerFactory = Callable[[int], Trainer]


def node_id(client: int) -> str:
    """The node id of virtual client ``client``."""
    return str(client)


class ClientPool:
    """An actor's body: the trainers of its clients and the loop that runs them."""

    def __init__(self, factory: TrainerFactory, *, max_cached_clients: int | None, threads: int):
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:  # a trainer without torch
            pass
        self._factory = factory
        self._max = max_cached_clients
        self._trainers: OrderedDict[int, Trainer] = OrderedDict()

    def ready(self) -> int:
        return os.getpid()

    def cached(self) -> list[int]:
        return list(self._trainers)

    def _trainer(self, client: int) -> Trainer:
        trainer = self._trainers.pop(client, None)
        if trainer is None:
            trainer = self._factory(client)
        self._trainers[client] = trainer
        if self._max is not None:
            while len(self._trainers) > self._max:
                self._trainers.popitem(last=False)
        return trainer

    def run(self, kind: str, round_: int, weights: NamedTensors, config: Config, clients: Sequence[int],
            reduce: bool) -> list[Outcome]:
        instruction = Instruction(kind, round_, weights, config)  # type: ignore[arg-type]
        outcomes = []
        for client in clients:
            nid = node_id(client)
            try:
                trainer = self._trainer(client)
            except Exception as exc:  # a factory that raises fails this client only
                outcomes.append(Failure(nid, f"trainer_factory failed: {type(exc).__name__}: {exc}"))
                continue
            outcomes.append(execute(trainer, nid, instruction))
        return reduce_fit(outcomes) if reduce and kind == "fit" else outcomes


def reduce_fit(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Fold the FitRes of a batch into one: example-weighted mean weights, summed examples.

    Failures pass through; the reduced result's metrics are example-weighted
    means, and its node id joins the ids of the clients it stands for with "+".
    """
    fits = [o for o in outcomes if isinstance(o, FitRes)]
    rest = [o for o in outcomes if not isinstance(o, FitRes)]
    if len(fits) <= 1:
        return list(outcomes)
    total = sum(f.num_examples for f in fits)
    if total <= 0:
        return list(outcomes)
    sums = {n: np.zeros(a.shape, np.float64) for n, a in fits[0].weights.items()}
    metrics: dict[str, float] = {}
    for f in fits:
        for n, s in sums.items():
            s += f.weights[n].astype(np.float64, copy=False) * f.num_examples
        for k, v in f.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v * f.num_examples / total
    mean = NamedTensors((n, _cast(s / total, fits[0].weights[n].dtype)) for n, s in sums.items())
    return [FitRes("+".join(f.node_id for f in fits), mean, total, metrics), *rest]


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return (np.rint(array) if dtype.kind in "iub" else array).astype(dtype)


class RayFleet:
    """A Fleet of ``num_clients`` virtual clients on Ray actors.

    ``ray_address=None`` starts a local Ray sized to this machine (and shuts it
    down on ``close``) unless Ray is already initialized in this process; an
    address joins that cluster and leaves it running. By default the number of
    actors is the cluster's CPUs divided by ``num_cpus`` (and GPUs by
    ``num_gpus``), at most one per client. With ``reduce_linear=True`` each
    actor returns one FitRes per round, the example-weighted mean of its
    clients (valid only for linear aggregation; results are then not bitwise
    those of the in-process fleet). ``ordered=True`` yields outcomes in the
    order of the node ids given, so float sums come out in the same bits as the
    in-process fleet's.
    """

    def __init__(self, trainer_factory: TrainerFactory, *, num_clients: int, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, num_actors: int | None = None, max_cached_clients: int | None = 1024,
                 ray_address: str | None = None, reduce_linear: bool = False, ordered: bool = True):
        if num_clients < 1:
            raise ValueError(f"num_clients must be at least 1, got {num_clients}")
        if num_cpus <= 0 or num_gpus < 0:
            raise ValueError(f"need num_cpus > 0 and num_gpus >= 0, got {num_cpus}, {num_gpus}")
        self.num_clients = num_clients
        self.reduce_linear = reduce_linear
        self.ordered = ordered
        self._owns_ray = _connect(ray_address)
        self.num_actors = num_actors or _default_actors(num_cpus, num_gpus)
        self.num_actors = max(1, min(self.num_actors, num_clients))
        self._actor_cls = ray.remote(ClientPool).options(num_cpus=num_cpus, num_gpus=num_gpus)
        self._actor_args = (ray.put(trainer_factory),)  # held here so a replacement actor can be built
        self._actor_kwargs = {"max_cached_clients": max_cached_clients, "threads": max(1, int(num_cpus))}
        self._actors = [self._spawn() for _ in range(self.num_actors)]
        self._ready = [a.ready.remote() for a in self._actors]

    def _spawn(self):
        return self._actor_cls.remote(*self._actor_args, **self._actor_kwargs)

    def wait_for_nodes(self, count: int, timeout: float) -> list[str]:
        if self._ready:
            try:
                ray.get(self._ready, timeout=max(timeout, 60.0))
            except (GetTimeoutError, RayError) as exc:
                raise FleetError(f"Ray actors did not start: {exc}") from exc
            self._ready = []
        return [node_id(i) for i in range(self.num_clients)]

    def actor_of(self, client: int) -> int:
        return client % self.num_actors

    def run(self, instruction: Instruction, node_ids: Sequence[str], *, timeout: float) -> Iterator[Outcome]:
        deadline = time.monotonic() + timeout
        batches: dict[int, list[int]] = {}
        early: list[Outcome] = []
        for nid in node_ids:
            client = _client_of(nid, self.num_clients)
            if client is None:
                early.append(Failure(nid, "unknown node"))
            else:
                batches.setdefault(self.actor_of(client), []).append(client)
        weights_ref = ray.put(instruction.weights)  # once per round, shared by every actor
        pending = {
            self._actors[a].run.remote(instruction.kind, instruction.round, weights_ref, dict(instruction.config),
                                       clients, self.reduce_linear): (a, clients)
            for a, clients in batches.items()
        }
        arrived = self._gather(pending, deadline, timeout)
        if not self.ordered or self.reduce_linear:
            yield from early
            for outcomes in arrived:
                yield from outcomes
            return
        yield from _in_order(node_ids, early, arrived)

    def _gather(self, pending: dict, deadline: float, timeout: float) -> Iterator[list[Outcome]]:
        """Each batch's outcomes as it arrives; failures for dead actors and missed deadlines."""
        while pending:
            left = deadline - time.monotonic()
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(left, 0.0))
            if not done:  # a late actor is replaced, so its backlog cannot delay the next round
                for actor, clients in pending.values():
                    ray.kill(self._actors[actor])
                    self._actors[actor] = self._spawn()
                    yield [Failure(node_id(c), f"late: no result within the {timeout:g}s deadline") for c in clients]
                return
            ref = done[0]
            actor, clients = pending.pop(ref)
            try:
                yield ray.get(ref)
            except RayError as exc:
                if isinstance(exc, ActorDiedError):  # its clients fail this round; a fresh actor takes them on
                    self._actors[actor] = self._spawn()
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                yield [Failure(node_id(c), f"actor failed: {type(exc).__name__}: {first}") for c in clients]

    def close(self) -> None:
        for actor in getattr(self, "_actors", []):
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self._actors = []
        if getattr(self, "_owns_ray", False) and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> RayFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _in_order(node_ids: Sequence[str], early: list[Outcome], arrived: Iterator[list[Outcome]]) -> Iterator[Outcome]:
    """Yield outcomes in the order of ``node_ids`` as soon as each prefix is complete."""
    ready: dict[str, Outcome] = {o.node_id: o for o in early}
    position = 0
    for outcomes in arrived:
        ready.update((o.node_id, o) for o in outcomes)
        while position < len(node_ids) and node_ids[position] in ready:
            yield ready.pop(node_ids[position])
            position += 1
    for nid in node_ids[position:]:
        yield ready.pop(nid, None) or Failure(nid, "no outcome")


def _client_of(nid: str, num_clients: int) -> int | None:
    if not nid.isdigit() or node_id(int(nid)) != nid:
        return None
    client = int(nid)
    return client if client < num_clients else None


def _connect(address: str | None) -> bool:
    """Initialize Ray if needed; True when this fleet started Ray (and so stops it)."""
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = logging.getLogger("ray")  # Ray's start-up notices (e.g. about token auth) are not the user's concern
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False,
                 logging_level="ERROR")
    finally:
        quiet.setLevel(level)
    return True


def _default_actors(num_cpus: float, num_gpus: float) -> int:
    """As many actors as the cluster's free CPUs (and GPUs) hold at these per-client resources."""
    total, free = ray.cluster_resources(), ray.available_resources()
    count = int(min(total.get("CPU", 1.0), free.get("CPU", 0.0)) / num_cpus + 1e-9)
    if num_gpus > 0:
        if total.get("GPU", 0.0) < num_gpus:
            raise ValueError(f"num_gpus={num_gpus} per client but the cluster has {total.get('GPU', 0.0):g} GPUs")
        count = min(count, int(free.get("GPU", 0.0) / num_gpus + 1e-9))
    return max(1, count)
