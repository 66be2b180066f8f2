"""The full-size model on this machine: load time and memory, stage timings at real shapes, decode against its floor.

``python -m benchmarks.full_size`` (``make bench-full-size``) writes a random-weight checkpoint of the 7B's shapes
(4 fp16 ``.bin`` shards + index, one shard in memory at a time; see :mod:`benchmarks.random_checkpoint`) under
``/work/fullsize/ckpt`` unless a complete one is there, then measures each mode in a fresh subprocess:

- ``plain_read_s``: one read of the shard bytes after their cached pages were dropped (``POSIX_FADV_DONTNEED``): the
  disk's share of a load;
- ``load_s`` and the peak ``RssAnon`` / ``RssFile`` of the process, sampled from ``/proc/self/status`` every 20 ms;
  the key report (missing / unexpected); ``weight_bytes``, everything the loaded model holds;
- stage timings at the real shapes: the vision tower on one 336 px image, SAM's image encoder on one 1024 px image
  and its mask decoder on one object (both only in the first mode: quantization does not touch them), one prefill of
  ``--prompt`` positions (576 image tokens + a short question is ~600). Stages longer than minutes here run on a
  sample of their blocks and are extrapolated to full depth (:mod:`benchmarks.sampled_depth`; each says so);
- ``decode_ms_per_token``: ``--steps`` single-row steps of the engine's decode path after ``--prompt`` positions,
  the first one not averaged; beside it the floor, the time to read once the bytes every step must read (the LLM's
  weights but its embedding table, of which a step reads one row, and the cached keys and values): one pass of a
  vectorised max over those very tensors before each step and after the last. ``decode_over_floor`` is the median
  step over the median read: both are taken in turns, so other work on the machine slows both alike. The best step
  over the best read, and the bytes over ``copy_bandwidth_gb_s`` (the best of 5 copies of 256 MiB, bytes read +
  written), are reported beside it;
- ``locate_estimate_s`` (tower + prefill + 24 decode steps) and ``segment_estimate_s`` (SAM encoder + mask decoder).

Modes: ``bfloat16`` (every part bfloat16), ``auto`` (what ``--dtype auto`` plans on this CPU) and ``int8`` (the LLM's
layer linears int8 with torch's int8 kernel, the rest bfloat16).

The weights are random: outputs mean nothing, timings and memory are those of the real shapes. The tokenizer files
written beside the weights are the tiny test vocabulary (a 32 000-piece one cannot be trained without a corpus); the
measurement loads weights only and never tokenizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.random_checkpoint import is_complete, write_random_checkpoint
from benchmarks.sampled_depth import time_sampled
from nextchat import cpu_kernels
from nextchat.configuration import PRESETS
from nextchat.kv_cache import BatchKVCache
from nextchat.loading import load_config, load_weights
from nextchat.modeling_nextchat import NextChatModel, parameter_dtype
from nextchat.streaming import release_pages
from nextchat.tiny import tiny_tokenizer


DEFAULT_DIR = Path("/work/fullsize/ckpt")
RESULTS = Path(__file__).parent / "results"
MODES = {"bfloat16": ("bfloat16", "none"), "auto": ("auto", "none"), "int8": ("bfloat16", "int8")}
VISION_BLOCKS = "model.vision_tower.vision_model.encoder.layers"
SAM_BLOCKS = "sam.model.image_encoder.blocks"
LLM_BLOCKS = "model.layers"
NEW_TOKENS = 24  # a locate answer's length in the benchmark workload (see benchmarks/workload.py)


class PeakMemory:
    """Samples ``RssAnon`` and ``RssFile`` of this process from ``/proc/self/status`` in a thread; keeps the peaks."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.every_s = every_s
        self.peak_kib = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in self.peak_kib:
                self.peak_kib[name] = max(self.peak_kib[name], int(value.split()[0]))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def plain_read_s(files: list[Path], chunk: int = 64 << 20) -> float:
    """Seconds to read every byte of ``files`` once from the disk (their cached pages dropped first and after)."""
    for file in files:
        release_pages(file)
    start = time.perf_counter()
    for file in files:
        with file.open("rb", buffering=0) as f:
            while f.read(chunk):
                pass
    elapsed = time.perf_counter() - start
    for file in files:
        release_pages(file)
    return elapsed


def copy_bandwidth_bytes_per_s(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Memory bandwidth of a large tensor copy (bytes read + bytes written), the best of ``repeats``."""
    source = torch.ones(nbytes // 4)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


def vision_stages(model: NextChatModel, per_kind: int) -> dict[str, Any]:
    """The vision tower and SAM's image encoder on one image each, and SAM's mask decoder on one object."""
    side = model.config.vision["image_size"]
    tower = time_sampled(model, VISION_BLOCKS, lambda: model.encode_images(torch.randn(1, 3, side, side)), per_kind)
    sam_side = model.config.sam.image_size
    sam_pixels = torch.randn(1, 3, sam_side, sam_side)
    sam = time_sampled(model, SAM_BLOCKS, lambda: model.encode_sam_images(sam_pixels), per_kind)
    grid = sam_side // model.config.sam.patch_size
    embeddings = torch.randn(1, model.config.sam.prompt_embed_dim, grid, grid, dtype=parameter_dtype(model.sam))
    at_hidden = torch.randn(1, model.config.hidden_size, dtype=model.dtype)
    box = torch.tensor([[0.2, 0.2, 0.7, 0.6]])
    return {
        "vision_tower": tower.as_dict(),
        "sam_encoder": sam.as_dict(),
        "mask_decoder_s": _timed(lambda: model.predict_masks(embeddings, at_hidden, box)),
    }


def prefill_stage(model: NextChatModel, prompt: int, per_kind: int) -> dict[str, Any]:
    """One prefill of ``prompt`` positions (the logits of the last one only, as the engine asks for)."""
    embeds = torch.randn(1, prompt, model.config.hidden_size, dtype=model.dtype) * 0.02
    mask = torch.ones(1, prompt, dtype=torch.long)
    positions = torch.arange(prompt)[None]
    last = torch.tensor([prompt - 1])

    def prefill() -> None:
        model.forward_llm(embeds, mask, positions, logits_positions=last, use_cache=False)

    return time_sampled(model, LLM_BLOCKS, prefill, per_kind).as_dict()


def decode_step_ms(model: NextChatModel, context: int, steps: int) -> tuple[list[float], list[float], int]:
    """Milliseconds of each of ``steps`` single-row decode steps (the engine's path) after ``context`` positions;
    milliseconds of the reads of the bytes a step reads (:func:`read_once_ms`), one before each step and one after
    the last; and how many bytes those are.

    The cache holds random keys and values instead of a prefill's: a step's cost is its weight reads and its
    attention over ``context`` columns, whatever the values are.
    """
    cache = BatchKVCache.for_config(model.model.config, model.dtype, model.device)
    shape = (1, cache.kv_heads, context, cache.head_dim)
    cache.append(
        [(torch.randn(shape, dtype=model.dtype), torch.randn(shape, dtype=model.dtype))] * cache.num_layers,
        torch.ones(1, context, dtype=torch.long),
    )
    step_tensors = [*step_read_tensors(model)]
    for layer in range(cache.num_layers):
        step_tensors += [cache.keys[layer][:1, :, :context], cache.values[layer][:1, :, :context]]
    step_ms, read_ms = [], [read_once_ms(step_tensors)]
    for step in range(steps):
        embeds = torch.randn(1, 1, model.config.hidden_size, dtype=model.dtype) * 0.02
        positions = torch.tensor([[context + step]])

        def one_step() -> None:
            model.decode_step(embeds, positions, cache.begin_step(), cache)  # noqa: B023
            cache.end_step()

        step_ms.append(1000 * _timed(one_step))
        read_ms.append(read_once_ms(step_tensors))
    return step_ms, read_ms, sum(t.numel() * t.element_size() for t in step_tensors)


def read_once_ms(tensors: list[torch.Tensor]) -> float:
    """Milliseconds to read every byte of ``tensors`` once from memory: a vectorised max over each (as 32-bit words
    where the bytes allow), on torch's threads, as a decode step's kernels would read them."""
    start = time.perf_counter()
    for tensor in tensors:
        flat = tensor.reshape(-1).view(torch.uint8) if tensor.is_contiguous() else tensor  # the cache: a view
        words = flat.view(torch.int32) if flat.dtype == torch.uint8 and flat.numel() % 4 == 0 else flat
        words.max()
    return 1000 * (time.perf_counter() - start)


def tensor_bytes(model: torch.nn.Module, prefixes: tuple[str, ...] = ("",), skip: tuple[str, ...] = ()) -> int:
    """Bytes of the parameters and buffers whose names start with one of ``prefixes`` and none of ``skip``."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return sum(
        t.numel() * t.element_size()
        for name, t in tensors
        if name.startswith(prefixes) and not (skip and name.startswith(skip))
    )


def step_read_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """What a decode step reads from the LLM's weights: all of it but the embedding table (one row of it)."""
    prefixes = ("model.layers.", "model.norm.", "lm_head.")
    return [t for name, t in (*model.named_parameters(), *model.named_buffers()) if name.startswith(prefixes)]


def load(directory: Path, mode: str) -> tuple[NextChatModel, dict[str, Any]]:
    """Read the shards once from the disk, then load them in ``mode``; the model and the load's figures."""
    dtype, quantize = MODES[mode]
    files = sorted(directory.glob("pytorch_model-*.bin"))
    result: dict[str, Any] = {"mode": mode, "dtype": dtype, "quantize": quantize}
    result["shard_bytes"] = sum(f.stat().st_size for f in files)
    result["plain_read_s"] = plain_read_s(files)
    config = load_config(directory)
    with PeakMemory() as peak:
        start = time.perf_counter()
        model, report = load_weights(directory, config, "cpu", dtype, quantize=quantize)
        result["load_s"] = time.perf_counter() - start
    gib = 2**20  # KiB per GiB
    result["peak_rss_anon_gib"] = peak.peak_kib["RssAnon"] / gib
    result["peak_rss_file_gib"] = peak.peak_kib["RssFile"] / gib
    result["missing_keys"], result["unexpected_keys"] = len(report.missing), len(report.unexpected)
    result["weight_bytes"] = tensor_bytes(model)
    result["dtypes"] = {
        "llm": str(model.dtype),
        "vision": str(parameter_dtype(model.model.vision_tower)),
        "sam": str(parameter_dtype(model.sam)),
    }
    result["load_over_plain_read"] = result["load_s"] / result["plain_read_s"]
    result["peak_anon_over_weights_gib"] = result["peak_rss_anon_gib"] - result["weight_bytes"] / 2**30
    return model, result


def measure(directory: Path, mode: str, prompt: int, steps: int, per_kind: int, vision: bool) -> dict[str, Any]:
    """One mode, in this (fresh) process."""
    model, result = load(directory, mode)
    if vision:
        result.update(vision_stages(model, per_kind))
    result["prefill"] = prefill_stage(model, prompt, per_kind)
    step_ms, read_ms, read = decode_step_ms(model, prompt, steps)
    result["decode_step_ms"], result["read_floor_step_ms"] = step_ms, read_ms
    steady = step_ms[1:] or step_ms  # the first step pays one-off costs (allocations)
    result["decode_ms_per_token"] = statistics.mean(steady)
    result["decode_median_ms_per_token"] = statistics.median(steady)
    result["decode_best_ms_per_token"] = min(steady)
    result["step_read_bytes"] = read
    result["decode_floor_ms_per_token"] = statistics.median(read_ms)
    result["read_floor_best_ms"] = min(read_ms)
    result["read_bandwidth_gb_s"] = read / result["decode_floor_ms_per_token"] / 1e6
    result["decode_over_floor"] = result["decode_median_ms_per_token"] / result["decode_floor_ms_per_token"]
    result["decode_best_over_floor_best"] = min(steady) / min(read_ms)
    bandwidth = copy_bandwidth_bytes_per_s()
    result["copy_bandwidth_gb_s"] = bandwidth / 1e9
    result["copy_floor_ms"] = 1000 * read / bandwidth
    result["int8_kernel"] = cpu_kernels.unavailable_reason() or "nextchat.cpu_kernels"
    result["attention"] = model.model.config._attn_implementation
    result["locate_estimate_s"] = result["prefill"]["estimate_s"] + NEW_TOKENS * result["decode_ms_per_token"] / 1000
    if vision:
        result["locate_estimate_s"] += result["vision_tower"]["estimate_s"]
        result["segment_estimate_s"] = result["sam_encoder"]["estimate_s"] + result["mask_decoder_s"]
    result["torch_threads"] = torch.get_num_threads()
    return result


def run(
    preset: str, directory: Path, modes: list[str], prompt: int, steps: int, results: Path, per_kind: int = 1
) -> dict[str, Any]:
    """Write the checkpoint if needed, then measure each mode in a fresh subprocess; the summary (also saved)."""
    config = PRESETS[preset]()
    summary: dict[str, Any] = {"preset": preset, "checkpoint": str(directory), "cpu_threads": torch.get_num_threads()}
    if not is_complete(directory, config.name):
        start = time.perf_counter()
        summary["parameters"] = write_random_checkpoint(config, tiny_tokenizer(directory), directory)
        summary["write_s"] = time.perf_counter() - start
    summary["modes"] = []
    for number, mode in enumerate(modes):
        command = [sys.executable, "-m", "benchmarks.full_size", "--measure", mode, "--dir", str(directory),
                   "--prompt", str(prompt), "--steps", str(steps), "--per-kind", str(per_kind)]  # fmt: skip
        if number > 0:
            command.append("--no-vision")
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=Path(__file__).parents[1])
        if done.returncode != 0:
            raise RuntimeError(f"measuring {mode} failed:\n{done.stderr[-4000:]}")
        summary["modes"].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"full_size-{preset}-cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=2))
    summary["results_file"] = str(out)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", default="nextchat-7b-336", choices=sorted(PRESETS))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the random checkpoint is (written)")
    parser.add_argument("--modes", default="bfloat16,int8", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--prompt", type=int, default=600, help="prefill positions (576 image tokens + question)")
    parser.add_argument("--steps", type=int, default=9, help="decode steps timed (the first is not averaged)")
    parser.add_argument("--per-kind", type=int, default=1, help="blocks of each kind run per long stage (99: all)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--measure", choices=sorted(MODES), help=argparse.SUPPRESS)  # internal: this mode, here
    parser.add_argument("--no-vision", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        result = measure(args.dir, args.measure, args.prompt, args.steps, args.per_kind, vision=not args.no_vision)
        print(json.dumps(result))
        return
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    summary = run(args.preset, args.dir, modes, args.prompt, args.steps, args.results, args.per_kind)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
