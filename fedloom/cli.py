"""The ``fedloom`` command line: server, client, keys, simulate."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="fedloom: federated training with a gRPC coordinator, PyTorch nodes and Ray simulation.")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def server(
    address: str = typer.Option("127.0.0.1:9091", help="HOST:PORT to listen on."),
    rounds: int = typer.Option(10, min=1, help="Number of rounds."),
    min_clients: int = typer.Option(2, min=1, help="Nodes that must be connected before a round starts."),
    fraction: float = typer.Option(1.0, min=0.0, max=1.0, help="Fraction of connected nodes sampled per round."),
    min_results: int = typer.Option(1, min=1, help="Results needed for a round to update the model."),
    round_timeout: float = typer.Option(120.0, min=0.1, help="Seconds a round waits for results."),
    wait_timeout: float = typer.Option(300.0, min=0.0, help="Seconds to wait for --min-clients nodes."),
    seed: int = typer.Option(0, help="Run seed: sampling, initial weights and client training."),
    epochs: int = typer.Option(5, min=1, help="Local epochs per round (sent to nodes)."),
    lr: float = typer.Option(0.05, min=0.0, help="Client learning rate (sent to nodes)."),
    batch_size: int = typer.Option(32, min=1, help="Client batch size (sent to nodes)."),
    run_dir: Path = typer.Option(Path("runs/server"), help="Where metrics.jsonl, model.safetensors and the run "
                                                           "state go."),
    resume: Path = typer.Option(None, help="Continue the crashed or stopped run in this run directory."),
    tls_cert: Path = typer.Option(None, help="The coordinator's TLS certificate (PEM; `fedloom keys` makes one)."),
    tls_key: Path = typer.Option(None, help="Its private key (PEM)."),
    client_ca: Path = typer.Option(None, help="Require client certificates signed by this CA (mutual TLS)."),
    authorized_keys: Path = typer.Option(None, help="Admit only nodes whose Ed25519 key is listed in this file."),
    insecure: bool = typer.Option(False, "--insecure", help="Serve plaintext gRPC (local experiments only)."),
    strategy: str = typer.Option("fedavg", help="Strategy by name (docs/strategies.md), e.g. fedprox, fedadam."),
    param: list[str] = typer.Option(None, "--param", "-p", help="Strategy hyperparameter KEY=VALUE (repeat)."),
    sampler: str = typer.Option("uniform", help="Client selection: uniform, weighted or availability."),
    validate_norms: float = typer.Option(0.0, help="Reject updates whose norm's robust z-score exceeds this."),
    eval_fraction: float = typer.Option(0.0, min=0.0, max=1.0, help="Federated evaluation on this fraction of "
                                                                    "nodes (they need --val-fraction)."),
    early_stopping: str = typer.Option(None, help="Stop when this metric (e.g. accuracy, loss) stops improving."),
    patience: int = typer.Option(5, min=1, help="Rounds without improvement before stopping."),
    pretrained: Path = typer.Option(None, help="Start from this checkpoint (.safetensors or a torch state_dict)."),
    freeze: str = typer.Option("", help="Comma-separated parameter patterns that never train (same on nodes)."),
    local: str = typer.Option("", help="Comma-separated parameter patterns that stay on nodes (same on nodes)."),
    stream_uploads: bool = typer.Option(True, help="Fold uploads into the aggregate tensor by tensor as they "
                                                   "arrive (strategies that allow it; docs/benchmarks.md)."),
) -> None:
    """Run a coordinator serving the default workload (digits CNN) over TLS (or plaintext with --insecure)."""
    from fedloom.server.app import serve
    from fedloom.server.evaluation import Watch
    from fedloom.server.grpc_auth import ServerSecurity
    from fedloom.strategies import registry

    try:
        chosen = registry.build(strategy, registry.parse_params(list(param or [])))
        if validate_norms > 0:
            chosen = registry.with_norm_check(chosen, z_threshold=validate_norms)
        security = ServerSecurity.from_files(tls_cert=tls_cert, tls_key=tls_key, client_ca=client_ca,
                                             authorized_keys=authorized_keys, insecure=insecure)
        serve(address=address, rounds=rounds, min_clients=min_clients, fraction=fraction,
              min_results=min_results, round_timeout=round_timeout, wait_timeout=wait_timeout, seed=seed,
              fit_config={"epochs": epochs, "lr": lr, "batch_size": batch_size}, run_dir=resume or run_dir,
              security=security, resume=resume is not None, strategy=chosen, sampler=sampler,
              eval_fraction=eval_fraction, watch=Watch.create(early_stopping=early_stopping, patience=patience),
              pretrained=pretrained, freeze=freeze, local=local, stream_uploads=stream_uploads)
    except ValueError as exc:
        _fail(str(exc))


@app.command()
def client(
    server: str = typer.Option("127.0.0.1:9091", help="Coordinator HOST:PORT to dial."),
    partition: int = typer.Option(0, min=0, help="Which partition of the default data this node holds."),
    num_partitions: int = typer.Option(2, min=1, help="Into how many partitions the data is split."),
    seed: int = typer.Option(0, help="Partitioning seed (all nodes of a run must agree)."),
    node_id: str = typer.Option("", help="Node id (default: node-<partition>)."),
    connect_timeout: float = typer.Option(60.0, min=0.0, help="Give up after this many seconds without a coordinator."),
    root_ca: Path = typer.Option(None, help="The CA certificate that signed the coordinator's (ca.crt)."),
    node_key: Path = typer.Option(None, help="This node's Ed25519 signing key (nodes/<id>/node.key)."),
    tls_cert: Path = typer.Option(None, help="Client certificate for mutual TLS (nodes/<id>/tls.crt)."),
    tls_key: Path = typer.Option(None, help="Its private key (nodes/<id>/tls.key)."),
    tls_server_name: str = typer.Option(None, help="Name to expect in the coordinator's certificate, if the "
                                                   "address differs."),
    insecure: bool = typer.Option(False, "--insecure", help="Dial plaintext gRPC (local experiments only)."),
    secure_aggregation: bool = typer.Option(False, "--secure-aggregation",
                                            help="Take part only in SecAgg+ rounds (server --strategy secagg_fedavg)."),
    val_fraction: float = typer.Option(0.0, min=0.0, max=0.9, help="Share of this node's data held out for "
                                                                   "federated evaluation."),
    pretrained: Path = typer.Option(None, help="The coordinator's starting checkpoint (for frozen parameters)."),
    freeze: str = typer.Option("", help="Comma-separated parameter patterns that never train (as the coordinator)."),
    local: str = typer.Option("", help="Comma-separated parameter patterns kept on this node (as the coordinator)."),
    personal_dir: Path = typer.Option(Path("personal"), help="Where this node saves its local parameters."),
) -> None:
    """Run a node that trains the default workload's partition and dials out to the coordinator."""
    from fedloom.client.app import run_node
    from fedloom.client.node import ClientSecurity

    if partition >= num_partitions:
        _fail(f"--partition {partition} must be below --num-partitions {num_partitions}")
    try:
        security = ClientSecurity.from_files(root_ca=root_ca, node_key=node_key, tls_cert=tls_cert, tls_key=tls_key,
                                             insecure=insecure, server_name=tls_server_name)
        run_node(server=server, partition=partition, num_partitions=num_partitions, seed=seed,
                 node_id=node_id or f"node-{partition}", connect_timeout=connect_timeout, security=security,
                 secure_aggregation=secure_aggregation, val_fraction=val_fraction, pretrained=pretrained,
                 freeze=freeze, local=local, personal_dir=personal_dir)
    except ValueError as exc:
        _fail(str(exc))


@app.command()
def keys(
    out: Path = typer.Option(..., help="Directory to create the key material in."),
    nodes: str = typer.Option("node-0,node-1", help="Comma-separated node ids to make credentials for."),
    hosts: str = typer.Option("localhost,127.0.0.1", help="Hostnames/IPs the coordinator certificate is valid for."),
    days: int = typer.Option(365, min=1, help="Validity of the certificates in days."),
) -> None:
    """Create a CA, a coordinator TLS certificate and per-node keys (private keys are written 0600)."""
    from fedloom.security.keys import create

    try:
        written = create(out, nodes=[n.strip() for n in nodes.split(",") if n.strip()],
                         hosts=[h.strip() for h in hosts.split(",") if h.strip()], days=days)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {len(written)} files under {out}:")
    for path in written:
        typer.echo(f"  {path}")


@app.command()
def simulate(
    num_clients: int = typer.Option(None, min=1, help="Virtual clients. (default: 100)"),
    rounds: int = typer.Option(None, min=1, help="Rounds. (default: 50)"),
    fraction: float = typer.Option(None, min=0.0, max=1.0, help="Fraction of clients per round. (default: 0.1)"),
    partition: str = typer.Option(None, help="iid, dirichlet, shards or quantity. (default: dirichlet)"),
    alpha: float = typer.Option(None, help="Dirichlet concentration (smaller: more skew). (default: 0.5)"),
    classes_per_client: int = typer.Option(None, help="Classes per client for shards. (default: 2)"),
    seed: int = typer.Option(None, help="Run seed: partition, sampling, training. (default: 0)"),
    run_dir: Path = typer.Option(None, help="Where metrics.jsonl and model.safetensors go. (default: runs/simulate)"),
    epochs: int = typer.Option(None, min=1, help="Local epochs. (default: the workload's, 5 for digits)"),
    lr: float = typer.Option(None, min=0.0, help="Client learning rate. (default: the workload's, 0.05)"),
    batch_size: int = typer.Option(None, min=1, help="Client batch size. (default: 32)"),
    fleet: str = typer.Option(None, help="ray or inprocess. (default: ray)"),
    ray_address: str = typer.Option(None, help="Join this Ray cluster instead of starting a local one."),
    num_cpus: float = typer.Option(None, help="CPUs per Ray actor (sets the number of actors). (default: 1)"),
    num_gpus: float = typer.Option(None, help="GPUs (may be fractional) per Ray actor. (default: 0)"),
    dataset: str = typer.Option(None, help="digits, synthetic or npz. (default: digits)"),
    data: Path = typer.Option(None, help="For --dataset npz: an .npz file with arrays x and y."),
    synthetic_alpha: float = typer.Option(None, help="Synthetic(alpha, beta): model heterogeneity. (default: 1)"),
    synthetic_beta: float = typer.Option(None, help="Synthetic(alpha, beta): data heterogeneity. (default: 1)"),
    normalize: str = typer.Option(None, help="Tabular data: standard, minmax or none (federated statistics)."),
    strategy: str = typer.Option(None, help="Strategy by name, e.g. fedavg, fedprox, fedadam, krum, fedbuff."),
    param: list[str] = typer.Option(None, "--param", "-p", help="Strategy hyperparameter KEY=VALUE (repeat)."),
    sampler: str = typer.Option(None, help="Client selection: uniform, weighted or availability."),
    eval_fraction: float = typer.Option(None, help="Federated evaluation on this fraction of clients. [default: 0]"),
    val_fraction: float = typer.Option(None, help="Share of each client's data held out for evaluation."),
    early_stopping: str = typer.Option(None, help="Stop when this metric (e.g. accuracy, loss) stops improving."),
    patience: int = typer.Option(None, help="Rounds without improvement before stopping. [default: 5]"),
    min_delta: float = typer.Option(None, help="Smallest change that counts as improvement. [default: 0]"),
    best_metric: str = typer.Option(None, help="Metric that picks best.safetensors. [default: accuracy]"),
    pretrained: Path = typer.Option(None, help="Start from this checkpoint (.safetensors or a torch state_dict)."),
    freeze: str = typer.Option(None, help="Comma-separated parameter patterns that never train, e.g. '0.*,3.*'."),
    local: str = typer.Option(None, help="Comma-separated parameter patterns kept on each client (FedPer/FedBN)."),
    cross_site: int = typer.Option(None, help="After the run, a cross-site table over this many clients."),
    validate_norms: float = typer.Option(None, help="Reject updates whose norm's robust z-score exceeds this."),
    config: Path = typer.Option(None, help="A TOML file of options (flag names with underscores); flags win."),
) -> None:
    """Simulate a federation of virtual clients (default: digits CNN, 100 clients, Dirichlet 0.5) on Ray.

    Strategies: fedloom simulate --strategy fedprox --param mu=0.1 (see docs/strategies.md).
    """
    from fedloom.simulations.app import load_options, run_simulation

    flags = {k: v for k, v in locals().items() if k not in ("config", "load_options", "run_simulation")}
    try:
        options = load_options(config, **flags)
    except ValueError as exc:
        _fail(str(exc))
    try:
        run_simulation(options)
    except ValueError as exc:
        _fail(str(exc))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
