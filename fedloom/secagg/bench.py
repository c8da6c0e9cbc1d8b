"""Wall time of each secure-aggregation stage, all clients in one process: python -m fedloom.secagg.bench

Client time is the mean per client (clients run in parallel in a deployment); coordinator time is the total.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedloom.secagg.coordinator import default_degree
from fedloom.secagg.protocol import STAGES, run_secagg

_KEYS = ("advertise", "share", "mask", "unmask")


def bench_one(n: int, *, length: int, sparse: bool, dropout: float, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    inputs = {i: rng.uniform(-1, 1, length).astype(np.float32) for i in range(n)}
    k = default_degree(n) if sparse else n - 1
    t = k // 2 + 1
    dropped = set(range(int(dropout * n)))  # go silent after sharing keys: the costly case for the coordinator
    start = time.perf_counter()
    result = run_secagg(inputs, threshold=t, neighbours=k if sparse else None, dropouts_at_stage={3: dropped})
    wall = time.perf_counter() - start
    exact = sum(inputs[i].astype(np.float64) for i in result.survivors)
    assert np.max(np.abs(result.total - exact)) < 1e-3
    row = {"k": k, "t": t, "wall": wall}
    for key in _KEYS:
        row[f"client {key}"] = result.timings.get(f"clients:{key}", 0.0) / n
        row[f"coord {key}"] = result.timings.get(f"coordinator:{key}", 0.0)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--length", type=int, default=100_000)
    parser.add_argument("--dropout", type=float, default=0.1, help="fraction silent after sharing keys")
    args = parser.parse_args(argv)
    print(f"vector length {args.length}, {args.dropout:.0%} dropped after stage 2; seconds; stages: {STAGES}")
    head = ["mode", "n", "k", "t", "wall"] + [f"client {s}" for s in _KEYS] + [f"coord {s}" for s in _KEYS]
    print(" | ".join(f"{h:>16}" if i > 1 else f"{h:>7}" for i, h in enumerate(head)))
    for n in args.clients:
        for sparse in (False, True):
            row = bench_one(n, length=args.length, sparse=sparse, dropout=args.dropout)
            cells = ["SecAgg+" if sparse else "SecAgg", str(n)] + [
                str(row[h]) if h in ("k", "t") else f"{row[h]:.3f}" for h in head[2:]
            ]
            print(" | ".join(f"{c:>16}" if i > 1 else f"{c:>7}" for i, c in enumerate(cells)), flush=True)


if __name__ == "__main__":
    main()
