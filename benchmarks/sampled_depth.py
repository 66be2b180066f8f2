"""Time a stage built on a stack of repeated blocks by running a sample of its blocks, and extrapolate to full depth.

At the 7B's shapes on a CPU without bfloat16 instructions some stages take many minutes (bfloat16 LLM prefill of
~600 positions about 49 s a layer, the SAM ViT-H encoder about 43 min). :func:`time_sampled` runs the stage once with
its block list cut to a sample, ``per_kind`` blocks of each kind (SAM's windowed and global-attention blocks differ
in cost; CLIP's and LLaMA's layers are all alike), timing each sampled block with forward hooks. The estimate is the
measured run with the sampled blocks' time replaced by, for every block of the full stack, the mean measured time of
the sampled blocks of its kind. Everything outside the blocks (patch embedding, SAM's neck, the final norm,
``lm_head``) is measured, never extrapolated.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StageTiming:
    """One stage: the run on ``blocks_run`` of its ``blocks_total`` blocks, and the full-depth estimate."""

    measured_s: float
    blocks_run: int
    blocks_total: int
    estimate_s: float

    @property
    def extrapolated(self) -> bool:
        return self.blocks_run < self.blocks_total

    def as_dict(self) -> dict[str, float | int | bool]:
        return {
            "measured_s": self.measured_s,
            "blocks_run": self.blocks_run,
            "blocks_total": self.blocks_total,
            "estimate_s": self.estimate_s,
            "extrapolated": self.extrapolated,
        }


def block_kind(block: nn.Module) -> int | None:
    """What sets a block's cost apart from its siblings': SAM's ``window_size`` (0 = global attention), else none."""
    size = getattr(block, "window_size", None)
    return size if isinstance(size, int) else None


def sample_indices(kinds: list[int | None], per_kind: int) -> list[int]:
    """The first ``per_kind`` block indices of each kind, in stack order."""
    taken: dict[int | None, int] = {}
    sample = []
    for index, kind in enumerate(kinds):
        if taken.get(kind, 0) < per_kind:
            taken[kind] = taken.get(kind, 0) + 1
            sample.append(index)
    return sample


def time_sampled(model: nn.Module, blocks_path: str, run: Callable[[], object], per_kind: int = 1) -> StageTiming:
    """Run ``run()`` (a stage of ``model``) with the ``nn.ModuleList`` at ``blocks_path`` cut to a sample.

    The full list is put back afterwards, whatever happens. ``per_kind`` ≥ the stack's depth times the whole stack.
    """
    owner_name, _, attribute = blocks_path.rpartition(".")
    owner = model.get_submodule(owner_name)
    full = getattr(owner, attribute)
    assert isinstance(full, nn.ModuleList), f"{blocks_path} is not a block list"
    kinds = [block_kind(block) for block in full]
    sample = sample_indices(kinds, per_kind)
    started: dict[int, float] = {}
    block_s: dict[int, float] = {}

    def hooks(index: int) -> list[torch.utils.hooks.RemovableHandle]:
        block = full[index]

        def before(*_: object) -> None:
            started[index] = time.perf_counter()

        def after(*_: object) -> None:
            block_s[index] = block_s.get(index, 0.0) + time.perf_counter() - started[index]

        return [block.register_forward_pre_hook(before), block.register_forward_hook(after)]

    handles = [handle for index in sample for handle in hooks(index)]
    setattr(owner, attribute, nn.ModuleList([full[index] for index in sample]))
    try:
        start = time.perf_counter()
        with torch.no_grad():
            run()
        measured = time.perf_counter() - start
    finally:
        setattr(owner, attribute, full)
        for handle in handles:
            handle.remove()
    kind_s = {kind: _mean([s for i, s in block_s.items() if kinds[i] == kind]) for kind in set(kinds)}
    estimate = measured - sum(block_s.values()) + sum(kind_s[kind] for kind in kinds)
    return StageTiming(measured, len(sample), len(full), estimate)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
