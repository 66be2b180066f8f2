"""``make bench-cluster``: the server on Ray Serve with one and with two model replicas, and the single-process server.

    python -m benchmarks.cluster [--rounds 3] [--requests 32] [--concurrency 16] [--new-tokens 16]

All three serve streamable HTTP on loopback and run the embedded demo model on the CPU with one torch thread per
model process: the single-process server (``nextchat-mcp --transport streamable-http --cpu-threads 1``, a subprocess),
and two Serve applications (``/one``: one model replica, ``/two``: two), each with its ingress and handles in a
redis-server started here. The workload is the standard one (:mod:`benchmarks.workload`: ``locate_objects`` then
``segment_object`` by id on distinct scenes, fixed-length answers), ``--concurrency`` callers in a closed loop
(:func:`benchmarks.batched.run_point`). The three targets alternate in ``--rounds`` rounds, so a busy machine's drift
reaches them all; each one's requests per second is its requests over the wall time of its own chunks.

Prints each target's throughput and latency, then the two ratios the cluster is judged by: two replicas against one
(goal ≥ 1.5×) and one replica against the single process (goal: within 20 %). Needs the cluster extra and
redis-server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from benchmarks import report
from benchmarks.batched import run_point, tool_request
from benchmarks.timings import Timings
from benchmarks.workload import Item, workload
from nextchat.pipeline import NextChatPipeline


TARGETS = ("single process", "1 replica", "2 replicas")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], name: str, timeout_s: float = 300) -> None:
    """Wait until something accepts connections on ``port`` (the process must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} did not start listening on port {port}")
        time.sleep(0.1)


@contextmanager
def subprocess_on_port(command: list[str], port: int) -> Iterator[None]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_for_port(port, process, Path(command[0]).name)
        yield
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def ray_serve(redis_url: str, new_tokens: int, max_batch: int) -> Iterator[dict[str, str]]:
    """Ray with the two applications; their MCP URLs by target name."""
    import ray
    from ray import serve

    from mcp_server.cluster.app import build_app

    port = free_port()
    ray.init(
        num_cpus=4, include_dashboard=False, log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        urls: dict[str, str] = {}
        for name, replicas in (("one", 1), ("two", 2)):
            options = {
                "model": "demo", "device": "cpu", "cpu_threads": 1, "model_replicas": replicas, "max_batch": max_batch,
                "redis_url": redis_url, "redis_prefix": f"bench-{name}", "fixed_new_tokens": new_tokens,
                "request_timeout_s": 3600,
            }  # fmt: skip
            serve.run(build_app(options), name=name, route_prefix=f"/{name}")
            urls[f"{replicas} replica{'s' if replicas > 1 else ''}"] = f"http://127.0.0.1:{port}/{name}/mcp"
        yield urls
    finally:
        serve.shutdown()
        ray.shutdown()


@asynccontextmanager
async def connected(url: str):
    async with httpx2.AsyncClient(timeout=3600) as http, Client(streamable_http_client(url, http_client=http)) as c:
        yield c


async def measure(urls: dict[str, str], chunks: list[dict[str, list[Item]]], warmup: Item, concurrency: int):
    """Each target's timings over the rounds, the targets alternating within each round."""
    timings = {target: Timings() for target in urls}
    for url in urls.values():  # first-call costs (imports, the first encodings) stay out of the figures
        async with connected(url) as client:
            await tool_request(client, warmup, None)
    for number, chunk in enumerate(chunks, start=1):
        for target, url in urls.items():
            async with connected(url) as client:
                await run_point(client, chunk[target], concurrency, timings[target], "cpu")
            rps = len(timings[target].request) / timings[target].wall_s
            print(f"round {number}: {target}: {rps:.2f} req/s so far", flush=True)
    return timings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=32, help="requests per target per round")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16, help="tokens every answer generates (fixed length)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    pipeline = NextChatPipeline.from_pretrained("demo")
    per_round = args.requests * len(TARGETS)
    items = workload(args.rounds * per_round + 1, seed=19, pipeline=pipeline)
    size = args.requests
    chunks = [
        {t: items[r * per_round + i * size : r * per_round + (i + 1) * size] for i, t in enumerate(TARGETS)}
        for r in range(args.rounds)
    ]
    redis_port, single_port = free_port(), free_port()
    redis_command = [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    single_command = [
        sys.executable, "-m", "mcp_server", "--transport", "streamable-http", "--port", str(single_port),
        "--cpu-threads", "1", "--fixed-new-tokens", str(args.new_tokens), "--max-batch", str(args.concurrency),
    ]  # fmt: skip
    with (
        tempfile.TemporaryDirectory() as workdir,
        subprocess_on_port([*redis_command, "--dir", workdir], redis_port),
        subprocess_on_port(single_command, single_port),
        ray_serve(f"redis://127.0.0.1:{redis_port}/0", args.new_tokens, args.concurrency) as cluster_urls,
    ):
        urls = {"single process": f"http://127.0.0.1:{single_port}/mcp", **cluster_urls}
        timings = anyio.run(measure, urls, chunks, items[-1], args.concurrency)
    print_results(args, timings)


def print_results(args: argparse.Namespace, timings: dict[str, Timings]) -> None:
    points = {target: report.summary(target, args.concurrency, t) for target, t in timings.items()}
    for target, point in points.items():
        latency = point["latency_ms"]
        print(
            f"{target:>15}: {point['throughput_rps']:.2f} req/s over {point['requests']} requests, "
            f"latency p50 {latency['p50']:.0f} ms, p95 {latency['p95']:.0f} ms"
        )
    rps = {target: point["throughput_rps"] for target, point in points.items()}
    scaling, overhead = rps["2 replicas"] / rps["1 replica"], rps["1 replica"] / rps["single process"]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        figures: dict[str, Any] = {"points": points, "scaling_2_vs_1": scaling, "one_replica_vs_single": overhead}
        figures["workload"] = {"concurrency": args.concurrency, "new_tokens": args.new_tokens, "rounds": args.rounds}
        figures["cpu"] = {"cores": os.cpu_count(), "model": report.device_name("cpu")}
        args.out.write_text(json.dumps(figures, indent=1))
    print(f"2 replicas / 1 replica at concurrency {args.concurrency}: {scaling:.2f}x (goal >= 1.5x)")
    print(f"1 replica / single process: {overhead:.2f}x (goal: within 20 %, 0.80x to 1.20x)")


if __name__ == "__main__":
    main()
