"""Server settings: command-line options, each with a ``NEXTCHAT_*`` environment twin (the option wins)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Everything the server is configured with."""

    model: str = "demo"
    device: str = "auto"
    dtype: str = "auto"
    allow_dirs: tuple[Path, ...] = ()
    allow_urls: bool = True
    allow_http: bool = False
    transport: str = "stdio"
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = field(default=None, repr=False)
    max_queue: int = 64
    max_batch: int = 16
    max_wait_ms: float = 5.0
    request_timeout_s: float = 60.0
    ready_wait_s: float = 20.0
    handle_ttl_s: float = 3600.0
    drain_timeout_s: float = 30.0
    fixed_new_tokens: int | None = None
    cpu_threads: int | None = None
    cuda_graphs: bool = True


def _env_bool(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().lower() in {"1", "true", "yes", "on"}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parser() -> argparse.ArgumentParser:
    """The ``nextchat-mcp`` serve options."""
    p = argparse.ArgumentParser(
        prog="nextchat-mcp",
        description="MCP server: NExT-Chat grounding tools (locate_objects, segment_object, describe_region, "
        "visual_qa). Serves over stdio by default. `nextchat-mcp call TOOL JSON` runs one tool and prints its result.",
    )
    env = os.environ.get
    p.add_argument(
        "--model",
        default=env("NEXTCHAT_MODEL", "demo"),
        help="checkpoint directory, Hugging Face hub id, or 'demo' (default; the embedded shapes-world model)",
    )
    p.add_argument("--device", default=env("NEXTCHAT_DEVICE", "auto"), help="auto (cuda, mps, cpu), cpu, cuda, cuda:1")
    p.add_argument("--dtype", default=env("NEXTCHAT_DTYPE", "auto"), help="auto (bf16 on CUDA, fp32 elsewhere)")
    dirs = [d for d in env("NEXTCHAT_ALLOW_DIRS", "").split(os.pathsep) if d]
    p.add_argument(
        "--allow-dir",
        action="append",
        default=dirs,
        metavar="DIR",
        help="a directory whose images may be read (repeatable; NEXTCHAT_ALLOW_DIRS, ':'-separated); "
        "with none, no local file is readable",
    )
    p.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        default=bool(_env_bool("NEXTCHAT_NO_CUDA_GRAPHS")),
        help="on a GPU, run decode steps eagerly instead of replaying captured CUDA graphs (for debugging and "
        "comparison; graphs are faster)",
    )
    p.add_argument(
        "--no-urls",
        action="store_true",
        default=bool(_env_bool("NEXTCHAT_NO_URLS")),
        help="never fetch https:// images",
    )
    p.add_argument(
        "--allow-http",
        action="store_true",
        default=bool(_env_bool("NEXTCHAT_ALLOW_HTTP")),
        help="also fetch plain http:// images",
    )
    p.add_argument("--transport", choices=["stdio", "streamable-http"], default=env("NEXTCHAT_TRANSPORT", "stdio"))
    p.add_argument("--host", default=env("NEXTCHAT_HOST", "127.0.0.1"), help="HTTP bind address")
    p.add_argument("--port", type=int, default=int(env("NEXTCHAT_PORT", "8000")), help="HTTP port")
    p.add_argument(
        "--token",
        default=env("NEXTCHAT_TOKEN"),
        help="bearer token HTTP clients must send (required when --host is not loopback)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=int(env("NEXTCHAT_MAX_QUEUE", "64")),
        help="requests allowed to wait; more are refused with a retry hint",
    )
    p.add_argument(
        "--max-batch", type=int, default=int(env("NEXTCHAT_MAX_BATCH", "16")), help="requests decoded together"
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=float(env("NEXTCHAT_MAX_WAIT_MS", "5")),
        help="how long an idle model waits for more requests to batch",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=float(env("NEXTCHAT_TIMEOUT", "60")),
        help="seconds a request may take before it is dropped",
    )
    p.add_argument(
        "--ready-wait",
        type=float,
        default=float(env("NEXTCHAT_READY_WAIT", "20")),
        help="seconds a call made while the model loads waits (with progress) before 'warming up, retry'",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=float(env("NEXTCHAT_DRAIN_TIMEOUT", "30")),
        help="on SIGTERM, seconds admitted requests get to finish before the server exits",
    )
    optional_counts = {
        "--fixed-new-tokens": "benchmarking only: every generated answer is exactly N tokens (end-of-answer is "
        "suppressed), so runs compare; answers are then cut or padded with whatever the model says next",
        "--cpu-threads": "torch threads when the model runs on the CPU (default: the usable cores less one, which the "
        "protocol side needs: with every core in torch's pool, each decode step waits for a core the event loop holds)",
    }
    for option, text in optional_counts.items():
        twin = env("NEXTCHAT_" + option.removeprefix("--").replace("-", "_").upper())
        default = _positive_int(twin) if twin else None
        p.add_argument(option, type=_positive_int, default=default, metavar="N", help=text)
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from parsed options."""
    return Settings(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        allow_dirs=tuple(Path(d).expanduser() for d in args.allow_dir),
        allow_urls=not args.no_urls,
        allow_http=args.allow_http,
        transport=args.transport,
        host=args.host,
        port=args.port,
        token=args.token,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        request_timeout_s=args.timeout,
        ready_wait_s=args.ready_wait,
        drain_timeout_s=args.drain_timeout,
        fixed_new_tokens=args.fixed_new_tokens,
        cpu_threads=args.cpu_threads,
        cuda_graphs=not args.no_cuda_graphs,
    )
