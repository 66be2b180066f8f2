"""Plain records shared by the tools, the executor and the runner (no torch, no asyncio).

A tool asks for model work with one of two jobs: a :class:`GenerationJob` (a task prompt, in words, about an image)
or a :class:`MaskJob` (masks for located objects or given boxes). What the model keeps per located object (its
``<at>`` state) travels back as an opaque ``state`` the MCP layer stores and hands back, so a later mask needs no new
language-model pass. The two device errors a runner step may raise are here too, so the executor can tell them apart
without torch.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import numpy as np

from nextchat.resizing import ResizedImage
from nextchat.tasks import Box, TaskPrompt


_job_ids = itertools.count(1)


@dataclass(frozen=True)
class DecodedImage:
    """A checked image: the one record of an image from decoding to the model.

    Attributes:
        pixels: RGB uint8 ``[H, W, 3]``, after EXIF orientation.
        sha256: hex sha256 of the bytes sent (the runner caches what it computes from an image by it).
        source: where the bytes came from: ``"path"``, ``"url"`` or ``"data"`` (empty when made in code).
        format: the format the magic bytes named (``"PNG"``, ``"JPEG"``, ...; empty when made in code).
        resized: its first resize for each of the model's branches, made by the decode worker once the model's
            input sides were known (``None`` before that, and for images made in code: the runner resizes them).
    """

    pixels: np.ndarray
    sha256: str
    source: str = ""
    format: str = ""
    resized: ResizedImage | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held: the pixels and the first resizes."""
        return int(self.pixels.nbytes) + (self.resized.nbytes if self.resized is not None else 0)

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


@dataclass(kw_only=True)
class _JobBase:
    """What every job carries.

    Attributes:
        image: the image the job is about.
        deadline: ``time.monotonic()`` after which the job is dropped instead of run (``None``: no deadline).
        id: unique, assigned at creation; outcomes are matched to jobs by it.
        cancelled: set by the caller; a queued job then never runs, a running one stops at the next step.
        owner: who asked (the HTTP session; ``None`` for stdio, in-memory and stateless callers): the executor
            bounds each owner's share of the queue, and the runner shares cached encodings only within one owner.
    """

    image: DecodedImage
    deadline: float | None = None
    owner: str | None = None
    id: int = field(default_factory=lambda: next(_job_ids))
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)


@dataclass(kw_only=True)
class GenerationJob(_JobBase):
    """Generate an answer to a task prompt (see :mod:`nextchat.tasks`) about the image.

    Attributes:
        prompt: what to ask, in words, with the given boxes in original pixels.
        max_new_tokens: generation budget (a prompt that locates in its own pass needs one step whatever this says).
    """

    prompt: TaskPrompt
    max_new_tokens: int = 64


@dataclass(kw_only=True)
class MaskJob(_JobBase):
    """Masks on the image, one per prompt."""

    prompts: tuple[MaskPrompt, ...]


Job = GenerationJob | MaskJob


@dataclass(frozen=True)
class FoundObject:
    """An object in a generated answer: its phrase, pixel box (clipped to the image) and opaque model state."""

    phrase: str
    box: Box
    state: object = field(repr=False, compare=False)


@dataclass(frozen=True)
class GenerationOutcome:
    """Generated text split at its objects (``len(objects) + 1`` segments) and the objects; ``warnings`` are the
    model's sentences about the image (e.g. that it lies outside the model's world; see ``nextchat.scopes``)."""

    segments: tuple[str, ...]
    objects: tuple[FoundObject, ...]
    finish_reason: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class MaskOutcome:
    """One mask per prompt: bool ``[H, W]`` on the original image, SAM's IoU prediction, and whether it was
    reported empty (IoU prediction under the model's threshold); ``warnings`` as in :class:`GenerationOutcome`."""

    masks: tuple[np.ndarray, ...]
    scores: tuple[float, ...]
    empty: tuple[bool, ...]
    warnings: tuple[str, ...] = ()


Outcome = GenerationOutcome | MaskOutcome


class StepOutOfMemory(RuntimeError):
    """A runner step ran out of device memory.

    The runner has already dropped every job it held and reset its device state: none of them has an outcome, and
    each may be submitted again from scratch (fewer at a time).
    """


class DeviceFailure(RuntimeError):
    """The device failed in a way the process cannot recover from (the CUDA context is unusable): every job the
    runner held is lost, and only a new process can use the device again."""


@dataclass(frozen=True)
class PortableObject:
    """A located object's model state in a form any process can hold (numpy, no torch): what crosses process
    boundaries in the cluster (``mcp_server.cluster``) and what the Redis handle store keeps.

    Attributes:
        phrase: the words of the answer the object belongs to.
        box: pixel xyxy in the original image.
        square_box: the model's box, normalised xyxy in the expand-to-square frame.
        at_hidden: float32 ``[hidden]``, the ``<at>`` state.
    """

    phrase: str
    box: Box
    square_box: Box
    at_hidden: np.ndarray = field(repr=False, compare=False)
