"""``fedloom client``: a node that trains one partition of the default workload."""

from __future__ import annotations

import logging

from fedloom.client.node import ClientSecurity, CoordinatorUnreachable, CredentialsRefused, run


def run_node(*, server: str, partition: int, num_partitions: int, seed: int, node_id: str,
             connect_timeout: float, security: ClientSecurity | None = None,
             secure_aggregation: bool = False) -> int:
    """Train partition ``partition`` of ``num_partitions`` for the coordinator at ``server``; returns tasks done."""
    from fedloom import workloads  # torch and the data: only once the arguments are known to be sane

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trainer = workloads.digits(num_partitions, seed=seed).trainer(partition)
    if secure_aggregation:  # the node then refuses any round that would reveal its individual update
        from fedloom.client.secure_trainer import SecureTrainer

        trainer = SecureTrainer(trainer)
    try:
        done = run(trainer, server, node_id=node_id, connect_timeout=connect_timeout, security=security)
    except (CoordinatorUnreachable, CredentialsRefused) as exc:
        raise ValueError(str(exc)) from None  # the CLI prints ValueErrors as a clean error and exits 2
    print(f"node {node_id}: run finished after {done} task(s)", flush=True)
    return done
