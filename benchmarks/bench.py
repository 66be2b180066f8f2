"""One command, end to end: the MCP tools under load against the naive one-request-at-a-time path, same model.

    python -m benchmarks.bench --preset tiny              # CPU: a tiny random checkpoint written on the fly
    python -m benchmarks.bench --preset demo              # CPU: the embedded shapes-world model (once installed)
    python -m benchmarks.bench --preset nextchat-7b-336   # GPU: the published model's full shape, random bf16 weights
    python -m benchmarks.bench --preset auto              # demo when installed, else tiny (``make bench``)

The standard workload: each request is ``locate_objects`` on its own 336 px image (a shapes scene) with a query that
makes a ~40-token text prompt, then ``segment_object`` on the first object found, by its id (by a fixed box when none
was found). Generation is fixed-length: every answer is ``--new-tokens`` tokens whatever the weights say, so runs
compare across models and machines.

Batched path: the real server (executor, continuous batching, caches) through the in-memory MCP client, ``c``
callers in a closed loop for each concurrency ``c``. Naive path: the same model object, one request at a time, no
batching and no caching, written on the model's own building blocks: the image is encoded for every pass, generation
is plain greedy decoding with a KV cache at batch 1, and the mask takes a fresh teacher-forced location pass (no
stored object state) and a SAM encoding. The naive path gets decoded pixels and skips the protocol (image decoding,
JSON, mask PNG), so the comparison leans in its favour.

The two paths alternate in ``--rounds`` rounds (a naive chunk, then a chunk of every batched point), so a drift in the
machine's speed reaches both; each path's throughput is its requests over the wall time of its own chunks. A batched
chunk ends with its callers running out of work (the batch drains), which counts against the batched path.

Prints p50/p95 latency and throughput of both paths, writes JSON and a PNG plot to ``--out``; the last line printed
is the throughput ratio at concurrency 8.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import io
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mcp_server.runner import NextChatRunner, default_cpu_threads
from mcp_server.server import create_server
from mcp_server.settings import Settings
from nextchat.configuration import build_nextchat_7b_336
from nextchat.demo.world import COLOURS, SHAPES, render_scene
from nextchat.loading import build_model, demo_checkpoint_dir, load_model, resolve_device
from nextchat.modeling_nextchat import NextChatModel
from nextchat.pipeline import NextChatPipeline
from nextchat.processing import (
    ImageGeometry,
    boxes_from_square,
    boxes_to_square,
    mask_logits_to_original,
    sam_pixel_values,
    vision_pixel_values,
)
from nextchat.prompting import SYSTEM_PROMPT
from nextchat.tasks import LOCATE_ANSWER_PREFIX, locate_question
from nextchat.tiny import write_tiny_checkpoint
from nextchat.tokenization import NextChatTokenizer, train_tokenizer


ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("auto", "tiny", "demo", "nextchat-7b-336")
IMAGE_SIDE = 336
PROMPT_TEXT_TOKENS = 40  # the prompt's text tokens (template and question), image tokens not counted
FILLER = ("shown", "near", "the", "middle", "of", "this", "picture", "of", "coloured", "shapes", "on", "a", "plain",
          "light", "background")  # fmt: skip
FALLBACK_BOX = (84.0, 84.0, 252.0, 252.0)  # what is segmented when locate found nothing (random weights may not)


# ----------------------------------------------------------------------------------------------------------------
# Models


def load_preset(preset: str, device: str, workdir: Path) -> tuple[NextChatModel, NextChatTokenizer, str]:
    """The preset's model (eval mode, on ``device``), its tokenizer and a label saying what the weights are."""
    if preset == "tiny":
        net, tokenizer, _ = load_model(write_tiny_checkpoint(workdir / "tiny"), device=device)
        return net, tokenizer, "tiny (random weights)"
    if preset == "demo":
        if not (demo_checkpoint_dir() / "config.json").is_file():
            raise SystemExit(
                f"the demo checkpoint is not installed at {demo_checkpoint_dir()}: train it "
                "(python -m nextchat.demo.train) or run --preset tiny"
            )
        net, tokenizer, _ = load_model("demo", device=device)
        return net, tokenizer, "demo (embedded shapes-world weights)"
    if not device.startswith("cuda"):
        raise SystemExit(
            "the nextchat-7b-336 preset is the full 7B shape (about 16 GB of bf16 weights) and needs a CUDA GPU; "
            "on the CPU run --preset tiny or --preset demo"
        )
    # Speed needs no trained weights: the full shape with random ones. A small vocabulary stands in for LLaMA's;
    # the output matrix keeps all 32005 rows (each step reads the same bytes), and the rows past that vocabulary
    # are zero so the model only ever picks tokens the tokenizer can decode.
    tokenizer = full_shape_tokenizer(workdir / "tokenizer")
    torch.manual_seed(0)
    net = build_model(build_nextchat_7b_336(), device, torch.bfloat16)
    with torch.no_grad():
        net.lm_head.weight[tokenizer.vocab_size :] = 0
    return net, tokenizer, "nextchat-7b-336 shape (random bf16 weights)"


def full_shape_tokenizer(directory: Path) -> NextChatTokenizer:
    """A small vocabulary trained on the benchmark's prompts, so they take about as many tokens as with LLaMA's."""
    names = [f"the {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    corpus = [SYSTEM_PROMPT, "USER: ASSISTANT:", " ".join(FILLER), *(locate_question(n) for n in names)]
    return train_tokenizer(corpus * 8, directory, 1000, whole_pieces=("ASSISTANT:",))


# ----------------------------------------------------------------------------------------------------------------
# Workload


@dataclass(frozen=True)
class Item:
    """One request: a 336 px RGB image ``[336, 336, 3]``, the same as a PNG data URI, and the locate query."""

    pixels: np.ndarray
    uri: str
    query: str


def square_crop(image: np.ndarray, side: int = IMAGE_SIDE) -> np.ndarray:
    """Resize so the short side is ``side``, then crop the centre square: RGB uint8 ``[side, side, 3]``."""
    h, w = image.shape[:2]
    scale = side / min(h, w)
    resized = Image.fromarray(image).resize((max(side, round(w * scale)), max(side, round(h * scale))))
    left, top = (resized.width - side) // 2, (resized.height - side) // 2
    return np.asarray(resized.crop((left, top, left + side, top + side)))


def prompt_text_tokens(pipeline: NextChatPipeline, query: str) -> int:
    """Tokens of a locate prompt apart from the image block (``<im_start>`` + N × ``<im_patch>`` + ``<im_end>``)."""
    return len(pipeline.prompt_ids(locate_question(query))) - pipeline.model.config.image_token_len - 2


def padded_query(pipeline: NextChatPipeline, query: str) -> str:
    """The query with filler words until the prompt has about :data:`PROMPT_TEXT_TOKENS` text tokens."""
    for word in list(FILLER) * 4:
        if prompt_text_tokens(pipeline, query) >= PROMPT_TEXT_TOKENS - 1:
            break
        query = f"{query} {word}"
    return query


def workload(count: int, seed: int, pipeline: NextChatPipeline) -> list[Item]:
    """``count`` requests on distinct shapes scenes (a seed gives the same scenes on every run)."""
    rng = np.random.default_rng([20_251_125, seed])
    items = []
    for _ in range(count):
        scene = render_scene(rng, min_objects=1, max_objects=3)
        pixels = square_crop(scene.image)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        items.append(Item(pixels, uri, padded_query(pipeline, f"the {scene.objects[0].name}")))
    return items


# ----------------------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Timings:
    """Per-request wall times in seconds (whole request, the locate call, the segment call) and the run's wall time."""

    request: list[float] = field(default_factory=list)
    locate: list[float] = field(default_factory=list)
    segment: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    segmented_by_id: int = 0
    segmented_by_box: int = 0
    peak_gpu_mib: float | None = None

    def note_peak(self, mib: float | None) -> None:
        if mib is not None:
            self.peak_gpu_mib = max(mib, self.peak_gpu_mib or 0.0)

    def add(self, started: float, located: float, finished: float, by_id: bool) -> None:
        self.request.append(finished - started)
        self.locate.append(located - started)
        self.segment.append(finished - located)
        self.segmented_by_id += by_id
        self.segmented_by_box += not by_id


def milliseconds(values: Sequence[float]) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(values, q)) * 1000, 2) for q in (50, 95)}


def summary(path: str, concurrency: int, timings: Timings) -> dict[str, Any]:
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


@contextlib.contextmanager
def measured(timings: Timings, device: str) -> Iterator[None]:
    """Add the block's wall time to ``timings`` and raise its GPU memory peak to the block's, if higher."""
    peak = track_gpu_memory(device)
    started = time.perf_counter()
    yield
    timings.wall_s += time.perf_counter() - started
    timings.note_peak(peak())


def track_gpu_memory(device: str) -> Callable[[], float | None]:
    """Reset the peak-memory counter; the returned function reads the peak since then (MiB; None off CUDA)."""
    if not device.startswith("cuda"):
        return lambda: None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return lambda: round(torch.cuda.max_memory_allocated() / 2**20, 1)


# ----------------------------------------------------------------------------------------------------------------
# Batched path: the server through the in-memory MCP client


async def tool_request(client: Any, item: Item, timings: Timings | None) -> None:
    """``locate_objects`` then ``segment_object`` on what it found; a tool error ends the benchmark."""

    def checked(result: Any, tool: str) -> dict[str, Any]:
        if result.is_error:
            text = " ".join(getattr(block, "text", "") for block in result.content)
            raise SystemExit(f"{tool} failed during the benchmark: {text}")
        return result.structured_content

    started = time.perf_counter()
    located = checked(await client.call_tool("locate_objects", {"image": item.uri, "query": item.query}), "locate")
    after_locate = time.perf_counter()
    image_id, objects = located["image"]["id"], located["objects"]
    target = {"object_id": objects[0]["id"]} if objects else {"box": list(FALLBACK_BOX)}
    arguments = {"image": image_id, **target}
    checked(await client.call_tool("segment_object", arguments), "segment")
    if timings is not None:
        timings.add(started, after_locate, time.perf_counter(), bool(objects))


async def run_point(client: Any, items: list[Item], concurrency: int, timings: Timings, device: str) -> None:
    """``concurrency`` callers in a closed loop over ``items``; adds to ``timings`` (wall time included)."""
    queue = iter(items)

    async def caller() -> None:
        for item in queue:
            await tool_request(client, item, timings)

    with measured(timings, device):
        async with anyio.create_task_group() as task_group:
            for _ in range(concurrency):
                task_group.start_soon(caller)


@dataclass
class Rounds:
    """The measurement plan: per round, a naive chunk and a chunk of every batched point, run one after another.

    Interleaving puts both paths in every stretch of the run: a shared machine's speed drifts by tens of percent over
    a minute, and a naive block measured before all batched ones would carry that drift into the ratio.
    """

    naive: list[list[Item]]
    batched: list[dict[int, list[Item]]]


async def run_rounds(
    runner: NextChatRunner,
    settings: Settings,
    naive: NaivePath,
    rounds: Rounds,
    warmups: tuple[Item, Item],
    device: str,
    threads: dict[str, int],
) -> tuple[Timings, dict[int, Timings]]:
    """Both paths, round by round, in one process on one model object; torch's thread count switches with the path."""
    from mcp import Client

    server = create_server(settings, runner_factory=lambda: runner)
    naive_timings, batched = Timings(), {c: Timings() for c in rounds.batched[0]}
    cpu = not device.startswith("cuda")
    try:
        async with Client(server) as client:
            naive.request(warmups[0], None)
            await tool_request(client, warmups[1], None)  # the executor's start, first-call costs
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


# ----------------------------------------------------------------------------------------------------------------
# Naive path: one request at a time on the model's building blocks


class NaivePath:
    """Locate and segment one request at a time: no batching, no caches, no stored object state.

    Generation is plain greedy decoding with a KV cache at batch 1, EOS banned and ``new_tokens`` long, with NExT-Chat's
    ``<at>`` feedback (the state at ``<at>`` gives the box, whose embedding is the next input).
    """

    def __init__(self, net: NextChatModel, tokenizer: NextChatTokenizer, new_tokens: int) -> None:
        self.net, self.tokenizer, self.new_tokens = net, tokenizer, new_tokens
        self.pipeline = NextChatPipeline(net, tokenizer)  # for its prompt builder and special-token ids
        self.ids = self.pipeline.engine.ids
        self.device = net.device

    def _features(self, pixels: np.ndarray) -> torch.Tensor:
        size = self.net.config.image_size
        return self.net.encode_images(vision_pixel_values(pixels, size)[None].to(self.device))[0]

    def _prefill(self, prompt: list[int], features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        ids = torch.tensor([prompt], device=self.device)
        embeds = self.net.embed_prompt(ids, [features], [torch.zeros(0, 4)], self.ids)
        positions = torch.arange(len(prompt), device=self.device)[None]
        last = torch.tensor([len(prompt) - 1], device=self.device)
        hidden, logits, cache = self.net.forward_llm(embeds, torch.ones_like(ids), positions, None, last)
        return hidden[0, -1], logits[0], cache

    @torch.inference_mode()
    def locate(self, pixels: np.ndarray, query: str) -> tuple[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Generated text and the located objects as (pixel box ``[4]``, ``<at>`` state ``[hidden]``)."""
        prompt = self.pipeline.prompt_ids(locate_question(query))
        hidden, logits, cache = self._prefill(prompt, self._features(pixels))
        mask = torch.ones((1, len(prompt)), dtype=torch.long, device=self.device)
        geometry = ImageGeometry(pixels.shape[1], pixels.shape[0])
        tokens: list[int] = []
        objects: list[tuple[torch.Tensor, torch.Tensor]] = []
        input_is_at = False
        while True:
            if input_is_at:  # this state read <at>: it is the object's; the next input is its box's embedding
                box = boxes_from_square(self.net.decode_boxes(hidden[None])[0].float().cpu(), geometry)[0]
                objects.append((box, hidden))
                tokens.append(self.ids.boxes)
                embed = self.net.box_feedback(hidden[None])[0]
                input_is_at = False
                if len(tokens) >= self.new_tokens:
                    break
            else:
                logits[self.ids.eos] = float("-inf")
                token = int(logits.argmax())
                tokens.append(token)
                input_is_at = token == self.ids.at
                if len(tokens) >= self.new_tokens and not input_is_at:
                    break
                embed = self.net.embed_tokens(torch.tensor([token], device=self.device))[0]
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            position = torch.tensor([[mask.shape[1] - 1]], device=self.device)
            first = torch.zeros(1, dtype=torch.long, device=self.device)
            out, step_logits, cache = self.net.forward_llm(embed[None, None], mask, position, cache, first)
            hidden, logits = out[0, -1], step_logits[0]
        return self.tokenizer.decode(tokens), objects

    @torch.inference_mode()
    def segment(self, pixels: np.ndarray, query: str, by_box: bool) -> np.ndarray:
        """A bool mask ``[H, W]``: of the object the query locates (a new teacher-forced pass), or of the box."""
        geometry = ImageGeometry(pixels.shape[1], pixels.shape[0])
        if by_box:
            square = boxes_to_square(np.asarray([FALLBACK_BOX]), geometry)[0]
            at_hidden = self.net.encode_boxes(square[None])[0]
        else:
            prompt = self.pipeline.prompt_ids(locate_question(query), LOCATE_ANSWER_PREFIX)
            at_hidden, _, _ = self._prefill(prompt, self._features(pixels))
            square = self.net.decode_boxes(at_hidden[None])[0].float()
        sam_size = self.net.config.sam.image_size
        embeddings = self.net.encode_sam_images(sam_pixel_values(pixels, sam_size)[None])
        low_res, _ = self.net.predict_masks(embeddings, at_hidden[None], square[None].to(self.device))
        return (mask_logits_to_original(low_res, geometry, sam_size)[0] > 0).cpu().numpy()

    def request(self, item: Item, timings: Timings | None) -> None:
        started = time.perf_counter()
        _, objects = self.locate(item.pixels, item.query)
        after_locate = time.perf_counter()
        self.segment(item.pixels, item.query, by_box=not objects)
        if timings is not None:
            timings.add(started, after_locate, time.perf_counter(), bool(objects))


def run_naive(naive: NaivePath, items: list[Item], timings: Timings, device: str) -> None:
    """The items one at a time; adds to ``timings`` (wall time included)."""
    with measured(timings, device):
        for item in items:
            naive.request(item, timings)


# ----------------------------------------------------------------------------------------------------------------
# Report


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
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or platform.machine(),
    ) if Path("/proc/cpuinfo").is_file() else (platform.processor() or platform.machine())  # fmt: skip
    return f"{model} ({os.cpu_count()} logical cores)"


def print_table(report: dict[str, Any]) -> None:
    w = report["workload"]
    print(
        f"\n{report['model']} on {report['device']} ({report['device_name']}), torch {report['torch']}, "
        f"commit {report['commit']}\nworkload: {IMAGE_SIDE} px images (one each), prompt {w['prompt_text_tokens']} "
        f"text + {w['image_tokens']} image tokens, {w['new_tokens']} new tokens, locate_objects + segment_object\n"
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


def draw_plot(report: dict[str, Any], path: Path) -> None:
    """Throughput and latency against concurrency, batched and naive, as a PNG (Pillow only)."""
    width, height = 1000, 460
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    title = f"{report['model']} · {report['device_name']} · {report['date'][:10]} · commit {report['commit']}"
    draw.text((20, 12), title, fill="black", font=font)
    batched = [r for r in report["results"] if r["path"] == "batched"]
    naive = next(r for r in report["results"] if r["path"] == "naive")
    levels = [r["concurrency"] for r in batched]
    blue, orange, grey = (31, 119, 180), (230, 110, 20), (120, 120, 120)
    panels = [
        ("throughput (requests/s)", [("batched", blue, [r["throughput_rps"] for r in batched], True)],
         [("naive", orange, naive["throughput_rps"])]),
        ("latency per request (ms)",
         [("batched p50", blue, [r["latency_ms"]["p50"] for r in batched], True),
          ("batched p95", blue, [r["latency_ms"]["p95"] for r in batched], False)],
         [("naive p50", orange, naive["latency_ms"]["p50"]), ("naive p95", grey, naive["latency_ms"]["p95"])]),
    ]  # fmt: skip
    for index, (label, series, flat) in enumerate(panels):
        left, top = 70 + index * 490, 60
        right, bottom = left + 400, top + 320
        top_value = 1.15 * max([v for _, _, values, _ in series for v in values] + [v for _, _, v in flat])
        step = _nice_step(top_value / 5)

        def y_of(value: float, top=top, bottom=bottom, top_value=top_value) -> float:
            return bottom - (bottom - top) * value / top_value

        def x_of(i: int, left=left, right=right) -> float:
            return left + (right - left) * (i + 0.5) / len(levels)

        draw.text((left, top - 22), label, fill="black", font=font)
        draw.rectangle((left, top, right, bottom), outline="black")
        tick = 0.0
        while tick <= top_value:
            y = y_of(tick)
            draw.line((left - 4, y, right, y), fill=(225, 225, 225) if tick else "black")
            draw.text((left - 8, y), f"{tick:g}", fill="black", font=small, anchor="rm")
            tick += step
        for i, level in enumerate(levels):
            draw.text((x_of(i), bottom + 6), str(level), fill="black", font=small, anchor="mt")
        draw.text(((left + right) / 2, bottom + 24), "concurrent callers", fill="black", font=small, anchor="mt")
        legend_y = top + 8
        for name, colour, value in flat:  # the naive path runs one request at a time: a level line
            y = y_of(value)
            for x in range(left, right, 12):
                draw.line((x, y, min(x + 6, right), y), fill=colour, width=2)
            draw.text((right - 6, legend_y), f"{name} {value:g}", fill=colour, font=small, anchor="ra")
            legend_y += 16
        for name, colour, values, solid in series:
            shade = colour if solid else tuple((c + 2 * 255) // 3 for c in colour)  # p95: the same hue, lighter
            points = [(x_of(i), y_of(v)) for i, v in enumerate(values)]
            draw.line(points, fill=shade, width=3 if solid else 2)
            for x, y in points:
                draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=shade)
            draw.text((right - 6, legend_y), name, fill=shade, font=small, anchor="ra")
            legend_y += 16
    image.save(path)


def _nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``raw``."""
    power = 10 ** np.floor(np.log10(raw)) if raw > 0 else 1.0
    return float(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
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
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where JSON and PNG go")
    args = p.parse_args(argv)
    if 8 not in args.concurrency:
        p.error("--concurrency must include 8 (the reported ratio is at concurrency 8)")
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    device = str(resolve_device(args.device))
    preset = args.preset
    if preset == "auto":
        preset = "demo" if (demo_checkpoint_dir() / "config.json").is_file() else "tiny"
        if preset == "tiny":
            print(f"the demo checkpoint is not installed ({demo_checkpoint_dir()}): benchmarking the tiny preset")

    with tempfile.TemporaryDirectory(prefix="nextchat-bench-") as workdir:
        net, tokenizer, label = load_preset(preset, device, Path(workdir))
        runner = NextChatRunner(net, tokenizer, fixed_new_tokens=args.new_tokens, cuda_graphs=not args.no_cuda_graphs)
        pipeline = runner.pipeline
        rounds = max(1, args.rounds)
        chunk = {c: max(-(-args.requests // rounds), 4 * c) for c in sorted(set(args.concurrency))}
        points = {c: workload(n * rounds, seed=100 + c, pipeline=pipeline) for c, n in chunk.items()}
        naive_items = workload(max(args.naive_requests, rounds), seed=1, pipeline=pipeline)
        warmup = workload(2, seed=2, pipeline=pipeline)
        plan = Rounds(
            naive=[naive_items[r::rounds] for r in range(rounds)],
            batched=[
                {c: items[r * chunk[c] : (r + 1) * chunk[c]] for c, items in points.items()} for r in range(rounds)
            ],
        )
        settings = Settings(model=preset, device=device, max_batch=args.max_batch,
                            max_queue=max(256, 2 * max(chunk)), max_wait_ms=args.max_wait_ms,
                            request_timeout_s=3600.0, ready_wait_s=600.0, fixed_new_tokens=args.new_tokens)  # fmt: skip

        # Each path gets its best CPU thread count: the naive path has the process to itself (torch's default, every
        # core); the server keeps a core for its event loop, as NextChatRunner.load does.
        threads = {"naive": torch.get_num_threads(), "batched": torch.get_num_threads()}
        if not device.startswith("cuda"):
            threads["batched"] = default_cpu_threads()
        print(
            f"{rounds} rounds of: {len(plan.naive[0])} naive requests one at a time, then "
            + ", ".join(f"{n} batched at {c}" for c, n in chunk.items())
            + " ...",
            flush=True,
        )
        naive_path = NaivePath(net, tokenizer, args.new_tokens)
        naive, batched = anyio.run(
            run_rounds, runner, settings, naive_path, plan, (warmup[0], warmup[1]), device, threads
        )
    queries = [item.query for item in naive_items]
    report: dict[str, Any] = {
        "preset": preset,
        "model": label,
        "device": device,
        "device_name": device_name(device),
        "dtype": str(net.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "workload": {
            "image_side_px": IMAGE_SIDE,
            "prompt_text_tokens": prompt_text_tokens(pipeline, queries[0]),
            "image_tokens": net.config.image_token_len,
            "new_tokens": args.new_tokens,
            "tools": ["locate_objects", "segment_object(object_id)"],
            "example_query": queries[0],
        },
        "server": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "decode": runner.decode_mode},
        "rounds": rounds,
        "torch_threads": threads,
        "results": [summary("naive", 1, naive)] + [summary("batched", c, t) for c, t in batched.items()],
    }
    ratio = report["results"][1 + sorted(chunk).index(8)]["throughput_rps"] / report["results"][0]["throughput_rps"]
    report["throughput_ratio_c8"] = round(ratio, 3)
    args.out.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    stem = args.out / f"{preset}-{kind}-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    draw_plot(report, stem.with_suffix(".png"))
    print_table(report)
    print(f"wrote {stem}.json and {stem}.png")
    print(f"throughput ratio at concurrency 8 (batched/naive): {ratio:.2f}")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
