"""``fedloom server``: a coordinator serving the default workload (digits CNN) over gRPC.

The run state is written atomically to the run directory after every round;
``resume=True`` continues from it after a crash (same seed, strategy and
model, or it refuses), and nodes reconnect on their own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rich.console import Console

from fedloom.buffers import tune_allocator
from fedloom.progress import RoundProgress, summary_table
from fedloom.rundir import METRICS, MODEL, RunDir, atomic_write, save_model
from fedloom.server import faults, runstate
from fedloom.server.async_driver import make_driver
from fedloom.server.driver import RunConfig
from fedloom.server.evaluation import Watch
from fedloom.server.grpc_auth import ServerSecurity
from fedloom.server.grpc_fleet import GrpcFleet
from fedloom.strategies import Strategy, fedavg
from fedloom.strategies.sampling import SAMPLERS
from fedloom.tensors import NamedTensors
from fedloom.transfer import start
from fedloom.types import Config, History

log = logging.getLogger("fedloom.server")


def reconcile(out: RunDir, saved: runstate.RunState) -> None:
    """Make the run directory agree with the saved state after a crash.

    The state is written before a round's model and metrics line, so a crash in
    between leaves them one round behind; temporary files of a torn write are left over.
    """
    for leftover in out.path.glob(".*.safetensors.*"):
        leftover.unlink(missing_ok=True)
    lines = "".join(json.dumps(r.to_json()) + "\n" for r in saved.records)
    atomic_write(out.path / METRICS, lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))
    save_model(out.path / MODEL, saved.weights)


def serve(*, address: str, rounds: int, min_clients: int, fraction: float, min_results: int, round_timeout: float,
          wait_timeout: float, seed: int, fit_config: Config, run_dir: Path | str,
          heartbeat_interval: float = 2.0, heartbeat_timeout: float = 10.0,
          security: ServerSecurity | None = None, resume: bool = False, strategy: Strategy | None = None,
          sampler: str = "uniform", eval_fraction: float = 0.0, watch: Watch | None = None,
          pretrained: str | Path | None = None, freeze: str = "", local: str = "",
          stream_uploads: bool = True) -> History:
    """Listen on ``address``, run ``rounds`` of ``strategy`` (FedAvg by default) with central evaluation,
    then tell nodes to exit. Synchronous runs are checkpointed every round for ``--resume``."""
    from fedloom import workloads  # torch and the data: only once the arguments are known to be sane

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = RunConfig(rounds=rounds, fraction=fraction, min_clients=min_clients, min_results=min_results,
                       round_timeout=round_timeout, wait_timeout=wait_timeout, seed=seed, fit_config=dict(fit_config),
                       eval_fraction=eval_fraction)
    saved = runstate.load(run_dir) if resume else None  # before anything listens: a bad state fails fast
    workload = workloads.digits(1)
    tune_allocator()  # 4 MiB message buffers are reused; decoded updates above 9 MiB leave when freed
    out = RunDir(run_dir)
    console = Console(stderr=True)
    fleet = GrpcFleet(heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout, security=security,
                      stream_uploads=stream_uploads)
    progress = RoundProgress(rounds, console=console, inner=out.record)
    strategy = strategy or fedavg()
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    options = {} if strategy.asynchronous else {"checkpoint_dir": out.path, "watch": watch,
                                                 "sampler": SAMPLERS[sampler](fraction, min_clients)}
    if strategy.asynchronous and resume:
        raise ValueError(f"--resume is not supported for the asynchronous strategy {strategy.name!r}")
    split, full = start(workload.initial_weights(seed), pretrained=pretrained, freeze=freeze, local=local)
    evaluate = workload.evaluator()
    driver = make_driver(faults.install(fleet), strategy, split.federated(full), config,
                         evaluate=lambda w: evaluate(NamedTensors({**full, **w})), on_round=progress, **options)
    if saved is not None:
        driver.restore(saved)  # refuses another seed, strategy or model
        reconcile(out, saved)
        console.print(f"resuming {out.path} after round {saved.round}", highlight=False)
    port = fleet.start(address)
    host = address.rsplit(":", 1)[0]
    mode = "plaintext" if fleet.security.tls is None else "TLS"
    console.print(f"fedloom server listening on {host}:{port} ({mode}); waiting for {min_clients} node(s)",
                  highlight=False)
    try:
        with progress:
            history = driver.run()
    finally:
        fleet.close()
    console.print(summary_table(history.rounds, title=f"fedloom server ({rounds} rounds)"))
    print(f"run dir: {out.path}", flush=True)
    return history
