"""The ``fedloom`` command line: server, client, simulate."""

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
    run_dir: Path = typer.Option(Path("runs/server"), help="Where metrics.jsonl and model.safetensors go."),
) -> None:
    """Run a coordinator serving the default workload (digits CNN) over plaintext gRPC."""
    from fedloom.server.app import serve

    try:
        serve(address=address, rounds=rounds, min_clients=min_clients, fraction=fraction,
              min_results=min_results, round_timeout=round_timeout, wait_timeout=wait_timeout, seed=seed,
              fit_config={"epochs": epochs, "lr": lr, "batch_size": batch_size}, run_dir=run_dir)
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
) -> None:
    """Run a node that trains the default workload's partition and dials out to the coordinator."""
    from fedloom.client.app import run_node

    if partition >= num_partitions:
        _fail(f"--partition {partition} must be below --num-partitions {num_partitions}")
    try:
        run_node(server=server, partition=partition, num_partitions=num_partitions, seed=seed,
                 node_id=node_id or f"node-{partition}", connect_timeout=connect_timeout)
    except ValueError as exc:
        _fail(str(exc))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
