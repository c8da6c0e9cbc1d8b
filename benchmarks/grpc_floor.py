"""The transport's floor: the same bytes, nodes and processes over plain gRPC streams, nothing else.

Each node downloads the model's worth of 4 MiB messages (one prebuilt bytes
object, sent again and again) and uploads as much back, ``rounds`` times.
No codec, no checks, no aggregation, no registry: what Python gRPC itself costs
on this machine, which is what fedloom's transport is measured against.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc

CHUNK = 4 << 20
OPTIONS = [("grpc.max_receive_message_length", 2 * CHUNK), ("grpc.max_send_message_length", 2 * CHUNK)]


def serve(model_bytes: int, nodes: int, rounds: int) -> tuple[grpc.Server, int, dict]:
    """A server whose downloads and uploads move ``model_bytes`` each; ``stats`` gets the first and last times."""
    message = bytes(CHUNK)
    count = -(-model_bytes // CHUNK)
    stats: dict = {"first": None, "uploads": 0, "done": threading.Event()}
    lock = threading.Lock()

    def down(request: bytes, context):
        with lock:
            stats["first"] = stats["first"] or time.perf_counter()
        for _ in range(count):
            yield message

    def up(messages, context) -> bytes:
        received = sum(len(m) for m in messages)
        with lock:
            stats["uploads"] += 1
            if stats["uploads"] == nodes * rounds:
                stats["last"] = time.perf_counter()
                stats["done"].set()
        return str(received).encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2 * nodes + 4), options=OPTIONS)
    identity = {"request_deserializer": None, "response_serializer": None}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Floor", {
        "Down": grpc.unary_stream_rpc_method_handler(down, **identity),
        "Up": grpc.stream_unary_rpc_method_handler(up, **identity),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, stats


def nodes_main(server: str, nodes: int, model_bytes: int, rounds: int) -> None:
    """``nodes`` threads, each on its own channel: download, then upload, ``rounds`` times."""
    message = bytes(CHUNK)
    count = -(-model_bytes // CHUNK)

    def node() -> None:
        channel = grpc.insecure_channel(server, options=OPTIONS)
        grpc.channel_ready_future(channel).result(timeout=60)
        down, up = channel.unary_stream("/floor.Floor/Down"), channel.stream_unary("/floor.Floor/Up")
        for _ in range(rounds):
            for _chunk in down(b""):
                pass
            up(message for _ in range(count))
        channel.close()

    threads = [threading.Thread(target=node) for _ in range(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure(here: str, model_bytes: int, nodes: int, rounds: int, per_process: int) -> float:
    """Seconds per round (every node down and up once) over plain gRPC, nodes in processes of ``per_process``."""
    server, port, stats = serve(model_bytes, nodes, rounds)
    sizes = [min(per_process, nodes - i) for i in range(0, nodes, per_process)]
    procs = [subprocess.Popen([sys.executable, here, "--role", "floor-nodes", "--server", f"127.0.0.1:{port}",
                               "--nodes", str(k), "--model-bytes", str(model_bytes), "--rounds", str(rounds)])
             for k in sizes]
    try:
        if not stats["done"].wait(600):
            raise SystemExit("the gRPC floor did not finish")
    finally:
        for p in procs:
            p.wait(60)
        server.stop(0)
    return (stats["last"] - stats["first"]) / rounds
