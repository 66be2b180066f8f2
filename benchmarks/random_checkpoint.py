"""A random-weight checkpoint of a preset's full shape in the official layout: fp16 ``pytorch_model-0000i-of-0000n.bin``
shards, ``pytorch_model.bin.index.json``, config and tokenizer files.

It is written one shard at a time (at most one shard's tensors are in memory: about 3.9 GB for the 7B's four), and
each finished shard's pages are handed back to the kernel so that a later load starts from the disk. The values are
slices of one seeded pool of normal numbers × 0.02 (norm weights are ones): what speed and memory measurements need
is the shapes and dtypes, and a pool fills 7.7 B values in seconds instead of minutes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from nextchat.configuration import NextChatConfig
from nextchat.devices import Precision
from nextchat.loading import build_empty, write_config_files
from nextchat.streaming import release_pages
from nextchat.tokenization import NextChatTokenizer


POOL_VALUES = 1 << 24
MARKER = "written.json"  # what a complete checkpoint directory holds last; its absence means rewrite


def _shard_plan(shapes: dict[str, torch.Size], shards: int) -> list[list[str]]:
    """Keys in model order, cut into ``shards`` runs of about equal fp16 bytes."""
    total = sum(shape.numel() for shape in shapes.values())
    plan: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for key, shape in shapes.items():
        plan[min(shards - 1, done * shards // max(total, 1))].append(key)
        done += shape.numel()
    return [keys for keys in plan if keys]


def _random_tensor(key: str, shape: torch.Size, pool: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1 and "norm" in key and key.endswith(".weight"):
        return torch.ones(shape, dtype=torch.float16)
    flat = torch.empty(shape.numel(), dtype=torch.float16)
    start = int(torch.randint(0, pool.numel(), (1,), generator=generator))
    filled = 0
    while filled < flat.numel():
        piece = pool[start : start + flat.numel() - filled]
        flat[filled : filled + piece.numel()] = piece
        filled += piece.numel()
        start = 0
    return flat.view(shape)


def is_complete(directory: Path, name: str) -> bool:
    """Whether ``directory`` holds a checkpoint this module wrote completely for the preset ``name``."""
    marker = directory / MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("preset") == name


def write_random_checkpoint(
    config: NextChatConfig, tokenizer: NextChatTokenizer, directory: Path, shards: int = 4, seed: int = 0
) -> dict[str, int]:
    """Write the checkpoint; returns its parameter count per part (``llm``, ``vision``, ``sam``, ``heads``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).unlink(missing_ok=True)
    model = build_empty(config, Precision.uniform(torch.float16))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(POOL_VALUES, generator=generator) * 0.02).half()
    plan = _shard_plan(shapes, shards)
    weight_map: dict[str, str] = {}
    for number, keys in enumerate(plan, start=1):
        name = f"pytorch_model-{number:05d}-of-{len(plan):05d}.bin"
        path = directory / name
        torch.save({k: _random_tensor(k, shapes[k], pool, generator) for k in keys}, path)
        with path.open("rb+") as f:
            os.fsync(f.fileno())  # written back before its pages are dropped
        release_pages(path)
        weight_map.update(dict.fromkeys(keys, name))
    total_bytes = 2 * sum(s.numel() for s in shapes.values())
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    write_config_files(config, tokenizer, directory, torch.float16)
    counts = part_counts(shapes)
    (directory / MARKER).write_text(json.dumps({"preset": config.name, "parameters": counts}))
    return counts


def part_counts(shapes: dict[str, torch.Size]) -> dict[str, int]:
    """Parameters per part, by key prefix (buffers such as SAM's positional matrix count with their part)."""
    parts = {"vision": ("model.vision_tower.", "model.mm_projector."), "sam": ("sam.",),
             "heads": ("loc_encoder.", "loc_decoder.", "seg_prompt_mlp.")}  # fmt: skip
    counts = dict.fromkeys(("llm", *parts), 0)
    for key, shape in shapes.items():
        part = next((p for p, prefixes in parts.items() if key.startswith(prefixes)), "llm")
        counts[part] += shape.numel()
    return counts
