"""Plain request and result records shared by the tools, the executor and the runner (no torch, no asyncio).

The runner turns a :class:`Job` into an outcome. What the model keeps per located object (its ``<at>`` state) travels
back as an opaque ``state`` the MCP layer stores and hands back, so a later mask needs no new language-model pass.
The two device errors a runner step may raise are here too, so the executor can tell them apart without torch.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Literal

import numpy as np


Box = tuple[float, float, float, float]  # pixel xyxy in the original image, origin top-left
JobKind = Literal["locate", "describe", "answer", "segment"]

_job_ids = itertools.count(1)


@dataclass(frozen=True)
class ImageRef:
    """An image the runner may cache by content: ``key`` is its sha256, ``pixels`` RGB uint8 ``[H, W, 3]``."""

    key: str
    pixels: np.ndarray

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(frozen=True)
class MaskPrompt:
    """What a mask is asked for: a located object's opaque state, or a caller's pixel box."""

    state: object | None = None
    box: Box | None = None


@dataclass
class Job:
    """One unit of model work.

    Attributes:
        kind: ``locate`` (free grounded generation, or with ``single`` the teacher-forced one-object path),
            ``describe`` (a region given by ``box``), ``answer`` (VQA, grounded when ``ground``), ``segment``.
        text: the query or question.
        max_new_tokens: generation budget.
        id: unique, assigned at creation; results are matched to jobs by it.
        cancelled: set by the caller; a queued job then never runs, a running one stops at the next step.
    """

    kind: JobKind
    image: ImageRef
    text: str = ""
    box: Box | None = None
    ground: bool = False
    single: bool = False
    prompts: tuple[MaskPrompt, ...] = ()
    max_new_tokens: int = 64
    deadline: float | None = None  # time.monotonic() after which the job is dropped instead of run
    id: int = field(default_factory=lambda: next(_job_ids))
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)


@dataclass(frozen=True)
class FoundObject:
    """An object in a generated answer: its phrase, pixel box (clipped to the image) and opaque model state."""

    phrase: str
    box: Box
    state: object = field(repr=False, compare=False)


@dataclass(frozen=True)
class GenerationOutcome:
    """Generated text split at its objects (``len(objects) + 1`` segments) and the objects."""

    segments: tuple[str, ...]
    objects: tuple[FoundObject, ...]
    finish_reason: str


@dataclass(frozen=True)
class MaskOutcome:
    """One mask per prompt: bool ``[H, W]`` on the original image, SAM's IoU prediction, and whether it was
    reported empty (IoU prediction under the model's threshold)."""

    masks: tuple[np.ndarray, ...]
    scores: tuple[float, ...]
    empty: tuple[bool, ...]


Outcome = GenerationOutcome | MaskOutcome


class StepOutOfMemory(RuntimeError):
    """A runner step ran out of device memory.

    The runner has already dropped every job it held and reset its device state: none of them has an outcome, and
    each may be submitted again from scratch (fewer at a time).
    """


class DeviceFailure(RuntimeError):
    """The device failed in a way the process cannot recover from (the CUDA context is unusable): every job the
    runner held is lost, and only a new process can use the device again."""
