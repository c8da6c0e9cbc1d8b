"""Simulation throughput: a raw PyTorch loop vs fedloom's Ray fleet vs Flower's simulation, side by side.

    python benchmarks/simulation.py            # N=100 and N=1000 with every client, N=1000 with 10%
    python benchmarks/simulation.py --quick    # a tiny run
    python benchmarks/simulation.py --no-flower

Identical workload for all: the digits CNN, the same per-client data (IID
split of the fixed training set), 1 local epoch, batch 32, plain SGD lr 0.05,
the same number of clients per round, example-weighted averaging and a
centralized evaluation on the test set after every round. Each system runs in
its own subprocess; the parent samples the PSS of that process tree. Round
times are medians over rounds 2.. (round 1 includes building the clients).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import psutil

FIT = {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.0}
SYSTEMS = ("raw", "fedloom", "flower")


# ---------------------------------------------------------------- workers (one per subprocess)


def _workload(n: int):
    from fedloom import workloads

    return workloads.digits(n, scheme="iid", seed=0)


def _local_sgd(model, x, y, *, lr: float, batch_size: int) -> float:
    """One epoch of plain SGD; the same code for the raw loop and Flower's clients."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    order = torch.randperm(len(x))
    total = 0.0
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += float(loss) * len(idx)
    return total / max(len(x), 1)


def _accuracy(model, x, y) -> float:
    import torch

    with torch.no_grad():
        model.eval()
        return float((model(x).argmax(1) == y).float().mean())


def run_raw(n: int, fraction: float, rounds: int) -> dict:
    """No framework: a loop over the sampled clients and a weighted average in numpy."""
    import numpy as np
    import torch

    from fedloom.strategies import UniformSampler

    begin = time.perf_counter()
    work = _workload(n)
    data = [(torch.from_numpy(d.x), torch.from_numpy(d.y)) for d in (work.client_data(i) for i in range(n))]
    xt, yt = torch.from_numpy(work.test.x), torch.from_numpy(work.test.y)
    torch.manual_seed(0)
    model = work.model_fn()
    glob = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    sampler = UniformSampler(fraction, 1)
    ids = [str(i) for i in range(n)]
    times, acc, first = [], 0.0, 0.0
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        sums = {k: np.zeros(v.shape, np.float64) for k, v in glob.items()}
        total = 0
        for cid in sampler.select(0, rnd, ids):
            x, y = data[int(cid)]
            model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in glob.items()})
            model.train()
            _local_sgd(model, x, y, lr=FIT["lr"], batch_size=FIT["batch_size"])
            for k, v in model.state_dict().items():
                sums[k] += v.numpy() * len(x)
            total += len(x)
        glob = {k: (s / total).astype(np.float32) for k, s in sums.items()}
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in glob.items()})
        acc = _accuracy(model, xt, yt)
        times.append(time.perf_counter() - start)
        first = first if rnd > 1 else time.perf_counter() - begin
    return {"startup": 0.0, "first_round_done": first, "rounds": times, "accuracy": acc}


def run_fedloom(n: int, fraction: float, rounds: int, *, reduce: bool = False) -> dict:
    """fedloom.simulate's machinery: a RayFleet and the Driver (or, with reduce, a fold of per-actor means)."""
    from fedloom.server.driver import Driver, RunConfig
    from fedloom.simulations.ray_fleet import RayFleet
    from fedloom.strategies import fedavg

    start = time.perf_counter()
    work = _workload(n)
    fleet = RayFleet(work.trainer, num_clients=n, reduce_linear=reduce, max_cached_clients=None)
    fleet.wait_for_nodes(n, 600)
    startup = time.perf_counter() - start
    evaluate = work.evaluator()
    try:
        if reduce:
            times, acc = _reduced_rounds(fleet, work, fraction, rounds, evaluate)
        else:
            config = RunConfig(rounds=rounds, fraction=fraction, seed=0, fit_config=FIT)
            history = Driver(fleet, fedavg(), work.initial_weights(0), config, evaluate=evaluate).run()
            times, acc = [r.seconds for r in history.rounds], history.rounds[-1].metrics["accuracy"]
    finally:
        fleet.close()
    first = startup + times[0]
    return {"startup": startup, "first_round_done": first, "rounds": times, "accuracy": acc, "actors": fleet.num_actors}


def _reduced_rounds(fleet, work, fraction: float, rounds: int, evaluate) -> tuple[list[float], float]:
    """Rounds with in-actor reduction: the same sampling and FedAvg fold, fed per-actor means."""
    from fedloom.strategies import UniformSampler, Update, weighted_mean
    from fedloom.types import FitRes, Instruction

    sampler, agg = UniformSampler(fraction, 1), weighted_mean()
    weights, times, acc = work.initial_weights(0), [], 0.0
    ids = fleet.wait_for_nodes(1, 60)
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        acc_state = agg.begin(weights)
        instruction = Instruction("fit", rnd, weights, {**FIT, "seed": 0})
        for o in fleet.run(instruction, sampler.select(0, rnd, ids), timeout=600):
            if isinstance(o, FitRes):
                acc_state = agg.fold(acc_state, Update(o.node_id, o.weights, o.num_examples, o.metrics))
        weights = agg.result(acc_state)[0]
        acc = evaluate(weights)["accuracy"]
        times.append(time.perf_counter() - start)
    return times, acc


def run_flower(n: int, fraction: float, rounds: int) -> dict:
    """Flower's simulation runtime (ServerApp + ClientApp on its Ray backend) with FedAvg."""
    import logging

    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    start = time.perf_counter()
    work = _workload(n)
    xt, yt = torch.from_numpy(work.test.x), torch.from_numpy(work.test.y)
    torch.manual_seed(0)
    eval_model = work.model_fn()
    keys = list(eval_model.state_dict())
    initial = [v.detach().numpy().copy() for v in eval_model.state_dict().values()]
    marks: list[float] = []
    result = {"accuracy": 0.0}

    class Client(NumPyClient):
        def __init__(self, cid: int):
            d = work.client_data(cid)
            self.x, self.y = torch.from_numpy(d.x), torch.from_numpy(d.y)
            self.model = work.model_fn()

        def fit(self, parameters, config):
            self.model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in zip(keys, parameters, strict=False)})
            self.model.train()
            loss = _local_sgd(self.model, self.x, self.y, lr=FIT["lr"], batch_size=FIT["batch_size"])
            return [v.numpy().copy() for v in self.model.state_dict().values()], len(self.x), {"loss": loss}

    def client_fn(context: Context):
        torch.set_num_threads(1)
        return Client(int(context.node_config["partition-id"])).to_client()

    def central(server_round, parameters, config):
        eval_model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in zip(keys, parameters, strict=False)})
        result["accuracy"] = _accuracy(eval_model, xt, yt)
        marks.append(time.perf_counter())
        return 0.0, {"accuracy": result["accuracy"]}

    def server_fn(context: Context):
        k = max(1, int(round(fraction * n)))
        strategy = FedAvg(fraction_fit=fraction, fraction_evaluate=0.0, min_fit_clients=k, min_evaluate_clients=0,
                          min_available_clients=n, initial_parameters=ndarrays_to_parameters(initial),
                          evaluate_fn=central)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=n, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    if len(marks) != rounds + 1:
        raise RuntimeError(f"Flower ran {len(marks) - 1} of {rounds} rounds")
    times = [b - a for a, b in itertools.pairwise(marks)]
    # Flower starts its Ray backend while the server evaluates round 0, so its start-up shows in round 1
    return {"startup": float("nan"), "first_round_done": marks[1] - start, "rounds": times,
            "accuracy": result["accuracy"]}


# ---------------------------------------------------------------- orchestration


def pss_tree(proc: psutil.Process) -> int:
    """Proportional set size of a process and all its descendants, in bytes."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


def measure(system: str, n: int, fraction: float, rounds: int) -> dict:
    """Run one system in a fresh subprocess while sampling its tree's PSS."""
    cmd = [sys.executable, __file__, "--worker", system, "--clients", str(n), "--fraction", str(fraction),
           "--rounds", str(rounds)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, stop = 0, threading.Event()
    watched = psutil.Process(proc.pid)

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, pss_tree(watched))
            except psutil.NoSuchProcess:
                return
            stop.wait(1.0)  # reading smaps costs CPU; sample sparsely to disturb the run little

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (err.strip().splitlines() or ["no output"])[-1][:200]}
    result = json.loads(lines[-1])
    result["pss_mib"] = peak / 2**20
    later = result["rounds"][1:] or result["rounds"]
    result["round_s"] = statistics.median(later)
    return result


def table(rows: list[tuple[str, int, float, dict]]) -> str:
    head = (f"{'system':<16}{'N':>6}{'frac':>6}{'round s':>10}{'x raw':>8}{'flower/x':>10}"
            f"{'ready s':>9}{'1st rnd s':>10}{'PSS MiB':>9}{'acc':>7}")
    out = [head, "-" * len(head)]
    for system, n, frac, r in rows:
        if "error" in r:
            out.append(f"{system:<16}{n:>6}{frac:>6.1f}  error: {r['error']}")
            continue
        out.append(f"{system:<16}{n:>6}{frac:>6.1f}{r['round_s']:>10.3f}{r.get('x_raw', float('nan')):>8.2f}"
                   f"{r.get('flower_speedup', float('nan')):>10.2f}{r['startup']:>9.2f}"
                   f"{r['first_round_done']:>10.2f}{r['pss_mib']:>9.0f}"
                   f"{r['accuracy']:>7.3f}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny run: 20 clients, 3 rounds")
    parser.add_argument("--no-flower", action="store_true", help="skip Flower")
    parser.add_argument("--reduce", action="store_true", help="also time fedloom with in-actor reduction")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--worker", choices=(*SYSTEMS, "fedloom-reduce"), help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = {"raw": run_raw, "fedloom": run_fedloom, "flower": run_flower,
               "fedloom-reduce": lambda n, f, r: run_fedloom(n, f, r, reduce=True)}[args.worker]
        import torch

        torch.set_num_threads(1)  # every process alike: on a loaded 2-core box, 2 OpenMP threads spin and stall
        print(json.dumps(run(args.clients, args.fraction, args.rounds)), flush=True)
        return
    rounds = args.rounds or (3 if args.quick else 5)
    scenarios = [(20, 1.0)] if args.quick else [(100, 1.0), (1000, 1.0), (1000, 0.1)]
    systems = [s for s in SYSTEMS if not (args.no_flower and s == "flower")]
    if args.reduce:
        systems.insert(2, "fedloom-reduce")
    rows = []
    for n, frac in scenarios:
        results = {s: measure(s, n, frac, rounds) for s in systems}
        for s, r in results.items():
            if "error" in r:
                continue
            if "error" not in results["raw"]:
                r["x_raw"] = r["round_s"] / results["raw"]["round_s"]
            if "flower" in results and "error" not in results["flower"]:
                r["flower_speedup"] = results["flower"]["round_s"] / r["round_s"]
            print(f"[{s} N={n} fraction={frac}] {json.dumps({k: v for k, v in r.items() if k != 'rounds'})}",
                  file=sys.stderr, flush=True)
        rows += [(s, n, frac, results[s]) for s in systems]
    print(f"rounds per run: {rounds}; per-round time = median of rounds 2..{rounds}; cores: {os.cpu_count()}")
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([{"system": s, "n": n, "fraction": fr, **r} for s, n, fr, r in rows], f, indent=1)


if __name__ == "__main__":
    main()
