"""``fedloom.simulate``: a federation of virtual clients on one machine or a Ray cluster.

The same Driver and strategies as a deployment; only the fleet differs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedloom.client.trainer import Trainer
from fedloom.fleet import Fleet, InProcessFleet
from fedloom.rundir import RunDir
from fedloom.server.async_driver import make_driver
from fedloom.server.driver import EvaluateFn, RoundCallback, RunConfig, Sampler
from fedloom.server.evaluation import Watch
from fedloom.strategies import Strategy, fedavg
from fedloom.tensors import NamedTensors
from fedloom.types import Config, History, RoundRecord

FLEETS = ("ray", "inprocess")


def make_fleet(trainer_factory: Callable[[int], Trainer], *, num_clients: int, fleet: str = "ray",
               ray_address: str | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
               num_actors: int | None = None, max_cached_clients: int | None = 1024,
               reduce_linear: bool = False) -> Fleet:
    """A fleet of ``num_clients`` virtual clients (node ids ``"0"``, ``"1"``, ...)."""
    if fleet == "inprocess":
        return InProcessFleet(factory=lambda nid: trainer_factory(int(nid)),
                              node_ids=[str(i) for i in range(num_clients)])
    if fleet == "ray":
        from fedloom.simulations.ray_fleet import RayFleet

        return RayFleet(trainer_factory, num_clients=num_clients, ray_address=ray_address, num_cpus=num_cpus,
                        num_gpus=num_gpus, num_actors=num_actors, max_cached_clients=max_cached_clients,
                        reduce_linear=reduce_linear)
    raise ValueError(f"unknown fleet {fleet!r}; choose one of {', '.join(FLEETS)}")


def simulate(
    trainer_factory: Callable[[int], Trainer],
    *,
    num_clients: int,
    rounds: int,
    initial_weights: NamedTensors,
    strategy: Strategy | None = None,
    fraction: float = 1.0,
    min_clients: int | None = None,
    min_results: int = 1,
    seed: int = 0,
    evaluate: EvaluateFn | None = None,
    fit_config: Config | None = None,
    eval_fraction: float = 0.0,
    round_timeout: float = 3600.0,
    fleet: str | Fleet = "ray",
    ray_address: str | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    num_actors: int | None = None,
    max_cached_clients: int | None = 1024,
    run_dir: str | Path | None = None,
    on_round: RoundCallback | None = None,
    sampler: Sampler | None = None,
    watch: Watch | None = None,
) -> History:
    """Run ``rounds`` rounds over ``num_clients`` virtual clients and return the History.

    ``trainer_factory(i)`` builds client ``i``'s Trainer (once; it is kept
    across rounds). ``strategy`` defaults to FedAvg. ``fleet`` is ``"ray"``,
    ``"inprocess"`` or a ready Fleet (which the caller closes). With
    ``run_dir`` every round is appended to ``metrics.jsonl`` and the model is
    written to ``model.safetensors``. An asynchronous strategy (``fedbuff``)
    runs in the asynchronous driver; ``sampler`` and ``watch`` (early stopping,
    best model) apply to synchronous ones.
    """
    strategy = strategy if strategy is not None else fedavg()
    config = RunConfig(rounds=rounds, fraction=fraction, min_clients=min_clients or 1, min_results=min_results,
                       round_timeout=round_timeout, wait_timeout=round_timeout, seed=seed,
                       fit_config=dict(fit_config or {}), eval_fraction=eval_fraction)
    owned = isinstance(fleet, str)
    runner = make_fleet(trainer_factory, num_clients=num_clients, fleet=fleet, ray_address=ray_address,
                        num_cpus=num_cpus, num_gpus=num_gpus, num_actors=num_actors,
                        max_cached_clients=max_cached_clients) if owned else fleet
    try:
        extra = {} if strategy.asynchronous else {"sampler": sampler, "watch": watch}
        driver = make_driver(runner, strategy, initial_weights, config, evaluate=evaluate,
                             on_round=_callbacks(run_dir, on_round), **extra)
        return driver.run()
    finally:
        if owned:
            runner.close()


def _callbacks(run_dir: str | Path | None, on_round: RoundCallback | None) -> RoundCallback | None:
    if run_dir is None:
        return on_round
    out = RunDir(run_dir)

    def record(rec: RoundRecord, weights: NamedTensors) -> None:
        out.record(rec, weights)
        if on_round is not None:
            on_round(rec, weights)

    return record
