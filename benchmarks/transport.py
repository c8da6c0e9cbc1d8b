"""Transport benchmark: a ~100M-parameter model to N nodes and back over loopback gRPC.

    python benchmarks/transport.py            # 25 x 4M float32 (~420 MB) to 4 and to 16 nodes
    python benchmarks/transport.py --quick    # a small model, to check the benchmark still runs

It runs the real stack: ``GrpcFleet`` + ``Driver`` + ``fedavg(precision="native")``
in a coordinator process, and the real node loop in separate node processes
(several nodes per process) running an echo trainer that returns the weights it
got. Per round it reports the effective rate (bytes down + up / round wall
time) and the coordinator's peak RSS as a multiple of the model size, sampled
in the coordinator's own process. Side by side, in the same run, it moves the
same bytes between the same processes over plain gRPC streams (``grpc_floor.py``):
the floor, and fedloom's rate as a fraction of it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading

import grpc_floor
import numpy as np
import psutil

HERE = os.path.abspath(__file__)


class Echo:
    """Returns the weights it got (one example, so FedAvg's mean is exact)."""

    def fit(self, weights, config):
        return weights, 1, {}

    def evaluate(self, weights, config):
        return 1, {}


def _nodes_main(server: str, ids: list[str]) -> None:
    from fedloom.buffers import tune_allocator
    from fedloom.client.node import run

    tune_allocator(mmap_threshold=32 << 20)  # as `fedloom client` does

    threads = [threading.Thread(target=run, args=(Echo(), server), kwargs={"node_id": i, "connect_timeout": 120})
               for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class PeakRss:
    """Samples this process's RSS in a background thread."""

    def __init__(self, interval: float = 0.005):
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def reset(self) -> None:
        self.peak = self.process.memory_info().rss

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _coordinator_main(args: argparse.Namespace) -> None:
    from fedloom.buffers import tune_allocator
    from fedloom.server.driver import Driver, RunConfig
    from fedloom.server.grpc_fleet import GrpcFleet
    from fedloom.strategies import fedavg
    from fedloom.tensors import NamedTensors

    tune_allocator()  # as `fedloom server` does
    fleet = GrpcFleet(max_decodes=args.max_decodes, stream_uploads=not args.no_stream_uploads)
    port = fleet.start("127.0.0.1:0")
    ids = [f"node-{i}" for i in range(args.nodes)]
    per = args.nodes_per_process
    procs = [subprocess.Popen([sys.executable, HERE, "--role", "nodes", "--server", f"127.0.0.1:{port}",
                               "--ids", ",".join(ids[i:i + per])]) for i in range(0, len(ids), per)]
    baseline = psutil.Process().memory_info().rss
    sampler = PeakRss()
    initial = NamedTensors({f"layer{i:02d}": np.full(args.numel, i, np.float32) for i in range(args.tensors)})
    model_bytes = initial.nbytes
    try:
        if len(fleet.wait_for_nodes(args.nodes, 120)) < args.nodes:
            raise SystemExit("nodes did not connect")
        config = RunConfig(rounds=args.rounds, min_clients=args.nodes, min_results=args.nodes, round_timeout=600)
        driver = Driver(fleet, fedavg(precision="native"), initial, config)
        del initial  # the benchmark keeps no copy of its own: the driver's weights are all the model there is
        history = driver.run()
    finally:
        fleet.close()
        for p in procs:
            p.wait(60)
    peak = sampler.stop()
    final = history.weights  # echo + mean: every tensor must still hold its index everywhere
    ok = (len(final) == args.tensors and all((a == i).all() for i, a in enumerate(final.values()))
          and all(r.num_results == args.nodes for r in history.rounds))
    seconds = [r.seconds for r in history.rounds]
    print(json.dumps({"nodes": args.nodes, "model_bytes": model_bytes, "seconds": seconds, "peak_rss": peak,
                      "baseline_rss": baseline, "ok": ok,
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)


def _cpu_ticks() -> tuple[int, int] | None:
    """(ticks stolen by the hypervisor, all ticks) so far, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
        return ticks[7], sum(ticks[:8])  # guest time is already counted in user time
    except (OSError, ValueError, IndexError):
        return None


def _stolen(since: tuple[int, int] | None) -> str:
    """The share of CPU time the hypervisor took from this VM since ``since``: runs that lost much are slower."""
    now = _cpu_ticks()
    if since is None or now is None or now[1] == since[1]:
        return ""
    return f" | {100 * (now[0] - since[0]) / (now[1] - since[1]):.0f} % of CPU stolen by the hypervisor"


def _report(result: dict) -> str:
    model, n = result["model_bytes"], result["nodes"]
    moved = 2 * n * model
    best = min(result["seconds"])
    median = statistics.median(result["seconds"])
    return (f"{n:>3} nodes | {model / 1e6:7.1f} MB model | round {median:6.2f} s (best {best:5.2f}, "
            f"first {result['seconds'][0]:5.2f}) | "
            f"{moved / median / 1e9:5.2f} GB/s (best {moved / best / 1e9:5.2f}) | "
            f"peak RSS {result['peak_rss'] / model:4.2f}x model "
            f"({(result['peak_rss'] - result['baseline_rss']) / model:4.2f}x above the "
            f"{result['baseline_rss'] / 1e6:.0f} MB baseline) | {'weights ok' if result['ok'] else 'WEIGHTS WRONG'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model and few nodes (a smoke test)")
    parser.add_argument("--nodes", type=int, nargs="*", help="node counts (default: 4 16; quick: 2 4)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--tensors", type=int, default=None)
    parser.add_argument("--numel", type=int, default=None, help="float32 elements per tensor")
    parser.add_argument("--nodes-per-process", type=int, default=4)
    parser.add_argument("--max-decodes", type=int, default=2)
    parser.add_argument("--no-stream-uploads", action="store_true",
                        help="decode each update whole before folding it (the path of non-streaming strategies)")
    parser.add_argument("--role", choices=["main", "coordinator", "nodes", "floor", "floor-nodes"], default="main",
                        help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--model-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "nodes":
        _nodes_main(args.server, args.ids.split(","))
        return 0
    if args.role == "floor-nodes":
        grpc_floor.nodes_main(args.server, args.nodes[0], args.model_bytes, args.rounds)
        return 0
    tensors = args.tensors or (4 if args.quick else 25)
    numel = args.numel or (1 << 18 if args.quick else 1 << 22)
    rounds = args.rounds or (2 if args.quick else 5)
    if args.role == "coordinator":
        args.tensors, args.numel, args.rounds = tensors, numel, rounds
        args.nodes = args.nodes[0]
        _coordinator_main(args)
        return 0
    if args.role == "floor":
        seconds = grpc_floor.measure(HERE, tensors * numel * 4, args.nodes[0], rounds, args.nodes_per_process)
        print(json.dumps({"seconds": seconds}), flush=True)
        return 0
    counts = args.nodes or ([2, 4] if args.quick else [4, 16])
    print(f"transport benchmark: {tensors} x {numel} float32 = {tensors * numel * 4 / 1e6:.1f} MB, {rounds} rounds, "
          f"max_decodes={args.max_decodes}, {'decoded whole' if args.no_stream_uploads else 'streamed'} uploads; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB", flush=True)
    failed = False
    for n in counts:
        ticks = _cpu_ticks()
        out = subprocess.run([sys.executable, HERE, "--role", "coordinator", "--nodes", str(n),
                              "--tensors", str(tensors), "--numel", str(numel), "--rounds", str(rounds),
                              "--max-decodes", str(args.max_decodes),
                              "--nodes-per-process", str(args.nodes_per_process),
                              *(["--no-stream-uploads"] if args.no_stream_uploads else [])],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        failed |= not result["ok"]
        print(_report(result) + _stolen(ticks), flush=True)
        ticks = _cpu_ticks()
        out = subprocess.run([sys.executable, HERE, "--role", "floor", "--nodes", str(n), "--tensors", str(tensors),
                              "--numel", str(numel), "--rounds", str(rounds),
                              "--nodes-per-process", str(args.nodes_per_process)],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        floor = json.loads(out.strip().splitlines()[-1])["seconds"]
        moved = 2 * n * result["model_bytes"]
        ratio = floor / statistics.median(result["seconds"])
        print(f"{n:>3} nodes | plain gRPC streams, same bytes: round {floor:6.2f} s | {moved / floor / 1e9:5.2f} GB/s "
              f"| fedloom reaches {ratio:.2f}x of it{_stolen(ticks)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
