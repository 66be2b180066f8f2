"""One command, end to end: the MCP tools under load against the naive one-request-at-a-time path, same model.

    python -m benchmarks.bench --preset tiny              # CPU: a tiny random checkpoint written on the fly
    python -m benchmarks.bench --preset demo              # CPU: the embedded shapes-world model (once installed)
    python -m benchmarks.bench --preset nextchat-7b-336   # GPU: the published model's full shape, random bf16 weights
    python -m benchmarks.bench --preset auto              # demo when installed, else tiny (``make bench``)

Every request calls ``locate_objects`` then ``segment_object`` on its own image, with fixed-length answers
(:mod:`benchmarks.workload`). Batched path: the real server through the in-memory MCP client, ``c`` callers in a
closed loop for each concurrency ``c`` (:mod:`benchmarks.batched`). Naive path: the same model object, one request at
a time, no batching and no caching (:mod:`benchmarks.naive`).

The two paths alternate in ``--rounds`` rounds (a naive chunk, then a chunk of every batched point), so a drift in the
machine's speed reaches both; each path's throughput is its requests over the wall time of its own chunks.

Prints p50/p95 latency and throughput of both paths, writes JSON and a PNG plot to ``--out``
(:mod:`benchmarks.report`, :mod:`benchmarks.plot`); the last line printed is the throughput ratio at concurrency 8.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import anyio
import torch

from benchmarks import report
from benchmarks.batched import run_point, tool_request
from benchmarks.naive import NaivePath, run_naive
from benchmarks.presets import PRESETS, load_preset, resolve_preset
from benchmarks.timings import Timings
from benchmarks.workload import IMAGE_SIDE, Rounds, plan, prompt_text_tokens
from mcp_server.runner import NextChatRunner, default_cpu_threads
from mcp_server.server import create_server
from mcp_server.settings import Settings
from nextchat.loading import resolve_device


async def run_rounds(
    runner: NextChatRunner, settings: Settings, naive: NaivePath, rounds: Rounds, device: str, threads: dict[str, int]
) -> tuple[Timings, dict[int, Timings]]:
    """Both paths, round by round, in one process on one model object; torch's thread count switches with the path."""
    from mcp import Client

    naive_timings, batched = Timings(), {c: Timings() for c in rounds.batched[0]}
    cpu = not device.startswith("cuda")

    def on_the_model_thread() -> NextChatRunner:
        # torch's thread count is per thread (each thread takes the count set when it first runs a parallel op):
        # the server's worker thread sets its own, as NextChatRunner.load does, or it would run with every core.
        if cpu:
            torch.set_num_threads(threads["batched"])
        return runner

    server = create_server(settings, runner_factory=on_the_model_thread)
    try:
        async with Client(server) as client:
            naive.request(rounds.warmup[0], None)
            await tool_request(client, rounds.warmup[1], None)  # the executor's start, first-call costs
            for naive_items, points in zip(rounds.naive, rounds.batched, strict=True):
                if cpu:
                    torch.set_num_threads(threads["naive"])
                run_naive(naive, naive_items, naive_timings, device)  # the server is idle meanwhile
                if cpu:
                    torch.set_num_threads(threads["batched"])
                for concurrency, items in points.items():
                    await run_point(client, items, concurrency, batched[concurrency], device)
    finally:
        server.app.executor.stop()
    return naive_timings, batched


def parser() -> argparse.ArgumentParser:
    """The command line (``--concurrency`` must include 8: the reported ratio is there)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="auto", help="auto: demo when installed, else tiny")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="batched-path caller counts")
    p.add_argument(
        "--requests",
        type=int,
        default=96,
        help="requests per batched point over all rounds (each round's chunk is at least 4 × callers)",
    )
    p.add_argument("--naive-requests", type=int, default=64, help="requests on the naive path over all rounds")
    p.add_argument("--rounds", type=int, default=4, help="naive and batched chunks alternate this many times")
    p.add_argument("--new-tokens", type=int, default=24, help="tokens every answer generates (fixed length)")
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's --max-wait-ms")
    p.add_argument("--no-cuda-graphs", action="store_true", help="the server's --no-cuda-graphs (GPU: eager decode)")
    p.add_argument("--out", type=Path, default=report.ROOT / "benchmarks" / "results", help="where JSON and PNG go")
    return p


def torch_threads(device: str) -> dict[str, int]:
    """Each path's best CPU thread count.

    The naive path has the process to itself (torch's default, every core); the server keeps a core for its event
    loop, as :meth:`NextChatRunner.load` does. On a GPU the count hardly matters and stays the default.
    """
    threads = {"naive": torch.get_num_threads(), "batched": torch.get_num_threads()}
    if not device.startswith("cuda"):
        threads["batched"] = default_cpu_threads()
    return threads


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print its table, write its JSON and plot, and print the ratio at concurrency 8 last."""
    p = parser()
    args = p.parse_args(argv)
    if 8 not in args.concurrency:
        p.error("--concurrency must include 8 (the reported ratio is at concurrency 8)")
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    device = str(resolve_device(args.device))
    preset = resolve_preset(args.preset)
    rounds = max(1, args.rounds)

    with tempfile.TemporaryDirectory(prefix="nextchat-bench-") as workdir:
        net, tokenizer, label = load_preset(preset, device, Path(workdir))
        runner = NextChatRunner(net, tokenizer, fixed_new_tokens=args.new_tokens, cuda_graphs=not args.no_cuda_graphs)
        work = plan(runner.pipeline, rounds, args.concurrency, args.requests, args.naive_requests)
        settings = Settings(model=preset, device=device, max_batch=args.max_batch,
                            max_queue=max(256, 2 * max(work.chunk)), max_wait_ms=args.max_wait_ms,
                            request_timeout_s=3600.0, ready_wait_s=600.0, fixed_new_tokens=args.new_tokens)  # fmt: skip
        threads = torch_threads(device)
        print(
            f"{rounds} rounds of: {len(work.naive[0])} naive requests one at a time, then "
            + ", ".join(f"{n} batched at {c}" for c, n in work.chunk.items())
            + " ...",
            flush=True,
        )
        naive_path = NaivePath(net, tokenizer, args.new_tokens)
        naive, batched = anyio.run(run_rounds, runner, settings, naive_path, work, device, threads)

    example = work.naive[0][0].query
    result = report.build_report(
        preset=preset,
        label=label,
        device=device,
        dtype=net.dtype,
        workload={
            "image_side_px": IMAGE_SIDE,
            "prompt_text_tokens": prompt_text_tokens(runner.pipeline, example),
            "image_tokens": net.config.image_token_len,
            "new_tokens": args.new_tokens,
            "tools": ["locate_objects", "segment_object(object_id)"],
            "example_query": example,
        },
        server={"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "decode": runner.decode_mode},
        rounds=rounds,
        threads=threads,
        naive=naive,
        batched=batched,
    )
    stem = report.write(result, args.out)
    report.print_table(result)
    print(f"wrote {stem}.json and {stem}.png")
    print(f"throughput ratio at concurrency 8 (batched/naive): {report.throughput_ratio(result, 8):.2f}")


if __name__ == "__main__":
    main()
