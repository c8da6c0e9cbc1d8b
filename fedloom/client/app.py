"""``fedloom client``: a node that trains one partition of the default workload."""

from __future__ import annotations

import logging
from pathlib import Path

from fedloom.buffers import tune_allocator
from fedloom.client.node import ClientSecurity, CoordinatorUnreachable, CredentialsRefused, run


def run_node(*, server: str, partition: int, num_partitions: int, seed: int, node_id: str,
             connect_timeout: float, security: ClientSecurity | None = None,
             secure_aggregation: bool = False, val_fraction: float = 0.0, pretrained: str | Path | None = None,
             freeze: str = "", local: str = "", personal_dir: str | Path = "personal") -> int:
    """Train partition ``partition`` of ``num_partitions`` for the coordinator at ``server``; returns tasks done."""
    from fedloom import workloads  # torch and the data: only once the arguments are known to be sane
    from fedloom.transfer import start

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tune_allocator(mmap_threshold=32 << 20)  # message buffers and training tensors are reused, not faulted in again
    work = workloads.digits(num_partitions, seed=seed)
    work.val_fraction = val_fraction  # held out on this node for federated evaluation
    # the same starting weights as the coordinator's: frozen parameters must agree everywhere
    split, full = start(work.initial_weights(seed), pretrained=pretrained, freeze=freeze, local=local)
    personal = Path(personal_dir) / f"{node_id}.safetensors" if split.local else None
    trainer = work.trainer(partition, split=split, initial=full, personal_path=personal)
    if secure_aggregation:  # the node then refuses any round that would reveal its individual update
        from fedloom.client.secure_trainer import SecureTrainer

        trainer = SecureTrainer(trainer)
    try:
        done = run(trainer, server, node_id=node_id, connect_timeout=connect_timeout, security=security)
    except (CoordinatorUnreachable, CredentialsRefused) as exc:
        raise ValueError(str(exc)) from None  # the CLI prints ValueErrors as a clean error and exits 2
    print(f"node {node_id}: run finished after {done} task(s)", flush=True)
    return done
