"""The run's report: a JSON summary (what ran where, at which commit, every point's figures), the table printed at
the end, and the files written to ``--out``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.plot import draw_plot
from benchmarks.timings import Timings


ROOT = Path(__file__).resolve().parents[1]


def milliseconds(values: Sequence[float]) -> dict[str, float]:
    """p50 and p95 of durations in seconds, in milliseconds."""
    return {f"p{q}": round(float(np.percentile(values, q)) * 1000, 2) for q in (50, 95)}


def summary(path: str, concurrency: int, timings: Timings) -> dict[str, Any]:
    """One point of the report: a path at a concurrency."""
    return {
        "path": path,
        "concurrency": concurrency,
        "requests": len(timings.request),
        "wall_s": round(timings.wall_s, 3),
        "throughput_rps": round(len(timings.request) / timings.wall_s, 3),
        "latency_ms": milliseconds(timings.request),
        "locate_ms": milliseconds(timings.locate),
        "segment_ms": milliseconds(timings.segment),
        "segmented_by": {"object_id": timings.segmented_by_id, "box": timings.segmented_by_box},
        "peak_gpu_mib": timings.peak_gpu_mib,
    }


def build_report(
    *,
    preset: str,
    label: str,
    device: str,
    dtype: torch.dtype,
    workload: dict[str, Any],
    server: dict[str, Any],
    rounds: int,
    threads: dict[str, int],
    naive: Timings,
    batched: dict[int, Timings],
) -> dict[str, Any]:
    """The JSON summary of a run.

    Args:
        preset: the preset that ran (``auto`` resolved).
        label: what the weights are (:func:`benchmarks.presets.load_preset`).
        device: the torch device string.
        dtype: the model's parameter dtype.
        workload: image, prompt and generation sizes, the tools called and an example query.
        server: the server settings that matter for speed, and how its decode steps ran.
        rounds: how many times the paths alternated.
        threads: torch's CPU thread count for each path.
        naive: the naive path's timings.
        batched: the batched path's timings at each concurrency.

    Returns:
        The report; ``results`` lists the naive point first, then the batched points by concurrency, and
        ``throughput_ratio_c8`` is batched over naive throughput at 8 callers.
    """
    report: dict[str, Any] = {
        "preset": preset,
        "model": label,
        "device": device,
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "workload": workload,
        "server": server,
        "rounds": rounds,
        "torch_threads": threads,
        "results": [summary("naive", 1, naive)] + [summary("batched", c, batched[c]) for c in sorted(batched)],
    }
    report["throughput_ratio_c8"] = round(throughput_ratio(report, 8), 3)
    return report


def throughput_ratio(report: dict[str, Any], concurrency: int) -> float:
    """Batched throughput at ``concurrency`` callers over the naive path's."""
    by_point = {(r["path"], r["concurrency"]): r["throughput_rps"] for r in report["results"]}
    return by_point["batched", concurrency] / by_point["naive", 1]


def write(report: dict[str, Any], out: Path) -> Path:
    """``<preset>-<cpu|cuda>-<UTC time>.json`` and the ``.png`` plot next to it in ``out``; returns their stem."""
    out.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if report["device"].startswith("cuda") else "cpu"
    stem = out / f"{report['preset']}-{kind}-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    draw_plot(report, stem.with_suffix(".png"))
    return stem


def print_table(report: dict[str, Any]) -> None:
    """What ran, then one line a point, then the throughput ratio at every batched point."""
    w = report["workload"]
    print(
        f"\n{report['model']} on {report['device']} ({report['device_name']}), torch {report['torch']}, "
        f"commit {report['commit']}\nworkload: {w['image_side_px']} px images (one each), "
        f"prompt {w['prompt_text_tokens']} text + {w['image_tokens']} image tokens, {w['new_tokens']} new tokens, "
        "locate_objects + segment_object\n"
        f"torch threads: naive {report['torch_threads']['naive']}, batched {report['torch_threads']['batched']}; "
        f"decode steps: {report['server']['decode']}; {report['rounds']} rounds\n"
    )
    header = f"{'path':8} {'conc':>4} {'reqs':>5} {'req/s':>8} {'p50 ms':>9} {'p95 ms':>9} {'locate p50':>11} "
    print(header + f"{'segment p50':>12} {'peak GPU MiB':>13}")
    for r in report["results"]:
        peak = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        print(
            f"{r['path']:8} {r['concurrency']:>4} {r['requests']:>5} {r['throughput_rps']:>8.2f} "
            f"{r['latency_ms']['p50']:>9.1f} {r['latency_ms']['p95']:>9.1f} {r['locate_ms']['p50']:>11.1f} "
            f"{r['segment_ms']['p50']:>12.1f} {peak:>13}"
        )
    naive = report["results"][0]["throughput_rps"]
    for r in report["results"][1:]:
        print(f"throughput ratio at concurrency {r['concurrency']} (batched/naive): {r['throughput_rps'] / naive:.2f}")


def commit() -> str:
    """The checked-out commit, with ``-dirty`` when tracked files have changes (earlier results do not count)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model and logical core count."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{_cpu_model()} ({os.cpu_count()} logical cores)"


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
