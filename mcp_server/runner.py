"""The model side of the executor: NExT-Chat jobs on :class:`nextchat.NextChatEngine` (the only torch user here).

Imported only inside the worker thread (by the default runner factory), so the protocol layer, ``--help`` and schema
generation never load torch. Vision features and SAM embeddings are cached by owner and image content in byte-bounded
LRUs, so
``locate → segment → describe`` on one image encodes it once, and SAM's encoder runs only when a mask is asked for.
Images that jobs starting in the same step need are encoded together, a chunk at a time (one tower or encoder pass).

Device errors are sorted here, so the executor needs no torch: a step that runs out of memory resets the engine
and raises :class:`~mcp_server.messages.StepOutOfMemory` (the executor starts the jobs again in smaller batches); an
error that leaves the CUDA context unusable raises :class:`~mcp_server.messages.DeviceFailure`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from mcp_server.messages import (
    DecodedImage,
    DeviceFailure,
    FoundObject,
    GenerationJob,
    GenerationOutcome,
    Job,
    MaskJob,
    MaskOutcome,
    MaskPrompt,
    Outcome,
    PortableObject,
    StepOutOfMemory,
)
from nextchat.decode_graphs import DecodeMode
from nextchat.devices import LARGE_LLM_PARAMETERS
from nextchat.engine import EncodedImage, GenerationRequest, GenerationResult, SamImage
from nextchat.loading import llm_parameter_count, load_model
from nextchat.modeling_nextchat import NextChatModel
from nextchat.pipeline import GroundedObject, NextChatPipeline
from nextchat.processing import ImageGeometry
from nextchat.resizing import InputSides, ResizedImage
from nextchat.scopes import scope_of
from nextchat.tokenization import NextChatTokenizer


log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")

WARNINGS_CACHE = 1024  # images whose world-check sentences the runner keeps (a few hundred bytes each)
ENCODE_CHUNK = 16  # images per vision-tower or SAM-encoder pass: bounds the activation memory of one pass
# Messages of CUDA errors after which the context is unusable (sticky errors): only a new process recovers.
FATAL_DEVICE_ERRORS = (
    "CUDA error",
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "uncorrectable ECC error",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUBLAS_STATUS_INTERNAL_ERROR",
    "CUDNN_STATUS_EXECUTION_FAILED",
    "NCCL error",
)
CANCELLED = GenerationOutcome(("",), (), "cancelled")  # what a job stopped before it reached the engine reports


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure the process survives (``torch.OutOfMemoryError``, or cuBLAS/cuDNN's own wording)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error)
    )


def is_device_failure(error: BaseException) -> bool:
    """A device error that leaves the CUDA context unusable (``torch.AcceleratorError`` or a sticky CUDA error)."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in FATAL_DEVICE_ERRORS)


class TensorLRU(Generic[V]):
    """Least-recently-used cache bounded by the bytes of the tensors it holds."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def get(self, key: str) -> V | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, value: V, nbytes: int) -> None:
        if key in self._items:
            self._bytes -= self._items.pop(key)[1]
        self._items[key] = (value, nbytes)
        self._bytes += nbytes
        while self._bytes > self.max_bytes and len(self._items) > 1:
            self._bytes -= self._items.popitem(last=False)[1][1]


def _feature_bytes(image: EncodedImage) -> int:
    return image.features.numel() * image.features.element_size()


def _sam_bytes(image: SamImage) -> int:
    return image.embeddings.numel() * image.embeddings.element_size()


def _pixels_and_resizes(images: list[DecodedImage]) -> tuple[list[np.ndarray], list[ResizedImage | None]]:
    """What the engine's encoders take: each image's pixels and its first resizes (made by a decode worker, or
    ``None``)."""
    return [image.pixels for image in images], [image.resized for image in images]


def cache_key(job: Job) -> str:
    """What the runner caches a job's image encodings under: its owner and the image's content.

    Shared across owners, a cache hit would be a timing signal: a session could tell, from how fast its answer
    came, that another session had recently sent the same bytes. Keyed by owner, the same image sent by two HTTP
    sessions is encoded once for each (see ``docs/reliability.md`` for the cost).
    """
    return f"{job.owner or ''}/{job.image.sha256}"


def encode_cached(
    images: list[tuple[str, DecodedImage]],
    cache: TensorLRU[V],
    encode: Callable[[list[DecodedImage]], list[V]],
    nbytes: Callable[[V], int],
) -> dict[str, V]:
    """Each distinct image's encoding by its key (:func:`cache_key`): from ``cache``, or encoded together with the
    other misses (``ENCODE_CHUNK`` images a pass) and then cached."""
    found: dict[str, V] = {}
    missing: dict[str, DecodedImage] = {}
    for key, image in images:
        if key in found or key in missing:
            continue
        cached = cache.get(key)
        if cached is None:
            missing[key] = image
        else:
            found[key] = cached
    keys = list(missing)
    for start in range(0, len(keys), ENCODE_CHUNK):
        chunk = keys[start : start + ENCODE_CHUNK]
        for key, encoded in zip(chunk, encode([missing[k] for k in chunk]), strict=True):
            found[key] = encoded
            cache.put(key, encoded, nbytes(encoded))
    return found


@dataclass
class _Starting:
    """A generation job accepted and not yet on the engine (its image features are filled in when it starts)."""

    job: GenerationJob
    request: GenerationRequest


def default_cpu_threads() -> int:
    """The usable cores (this process's affinity, where the platform has one) less one, at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


class NextChatRunner:
    """Runs :class:`~mcp_server.messages.Job` s on a loaded NExT-Chat model.

    Args:
        net, tokenizer: the model (eval mode, on its device) and its tokenizer.
        cache_bytes: budget of each of the two image caches (vision features, SAM embeddings).
        fixed_new_tokens: for benchmarks: every free generation makes exactly this many tokens (EOS is banned), one
            more only when the last is ``<at>`` (its ``<boxes>`` completes the object).
        cuda_graphs: on a CUDA device, replay decode steps from captured graphs (``nextchat.decode_graphs``);
            off, or on any other device, they run eagerly.
    """

    def __init__(
        self,
        net: NextChatModel,
        tokenizer: NextChatTokenizer,
        *,
        cache_bytes: int = 512 << 20,
        fixed_new_tokens: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        if fixed_new_tokens is not None and fixed_new_tokens < 1:
            raise ValueError("fixed_new_tokens must be at least 1")
        # None: the engine's default (graphs on a CUDA device, eager elsewhere).
        self.pipeline = NextChatPipeline(net, tokenizer, None if cuda_graphs else "eager")
        self.engine = self.pipeline.engine
        self.device = str(net.device)
        self.dtype = str(net.dtype).removeprefix("torch.")
        self.model_name = net.config.name
        # What the model knows, and its check of each image against that (the demo model's shapes world).
        self.model_scope = scope_of(net.config.name)
        # The sides the server's decode workers make each image's first resizes for (see nextchat.resizing).
        self.input_sides = InputSides(net.config.image_size, net.config.sam.image_size)
        self.scope = self.model_scope.scope
        # The check runs in its own thread from the job's submission (numpy, most of it without the GIL), so the
        # model thread finds it done instead of stalling the batch for it (a few ms of CPU a 336 px image).
        self._warnings: OrderedDict[str, Future[tuple[str, ...]]] = OrderedDict()
        self._world_checker = (
            ThreadPoolExecutor(1, thread_name_prefix="world-check") if self.model_scope.world_check else None
        )
        self.fixed_new_tokens = fixed_new_tokens
        self.features: TensorLRU[EncodedImage] = TensorLRU(cache_bytes)
        self.sam_images: TensorLRU[SamImage] = TensorLRU(cache_bytes)
        self._starting: list[_Starting] = []
        self._masks: list[MaskJob] = []
        self._jobs: dict[int, GenerationJob] = {}  # on the engine
        self._stopped: list[int] = []  # cancelled before they reached the engine
        self.out_of_memory_steps = 0

    @classmethod
    def load(
        cls,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        *,
        quantize: str = "none",
        cache_bytes: int = 512 << 20,
        fixed_new_tokens: int | None = None,
        cpu_threads: int | None = None,
        cuda_graphs: bool = True,
    ) -> NextChatRunner:
        """Load a checkpoint (directory, hub id or ``demo``; see :func:`nextchat.load_model`) and run it.

        On the CPU, torch gets ``cpu_threads`` threads (default: the usable cores less one). The event loop, the
        protocol and image decoding run beside the model in the same process; with every core in torch's pool, each
        parallel op waits for the core the event loop holds (on two cores: 16 against 29 requests/s, see
        ``benchmarks/NOTES.md``).
        """
        net, tokenizer, _ = load_model(model, device=device, dtype=dtype, quantize=quantize)
        if net.device.type == "cpu" and llm_parameter_count(net.config) > LARGE_LLM_PARAMETERS:
            log.warning(
                "running a %s-parameter language model on the CPU: expect seconds per generated token and minutes "
                "per image; it needs a GPU or Apple silicon to be interactive",
                f"{llm_parameter_count(net.config) / 1e9:.1f} B",
            )
        if net.device.type == "cpu":
            torch.set_num_threads(cpu_threads or default_cpu_threads())
        return cls(net, tokenizer, cache_bytes=cache_bytes, fixed_new_tokens=fixed_new_tokens, cuda_graphs=cuda_graphs)

    @property
    def decode_mode(self) -> DecodeMode:
        """How the engine's decode steps run now (see :mod:`nextchat.decode_graphs`)."""
        return self.engine.decode_mode

    # ------------------------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Check a job and tokenize its prompt; its device work (encoding, generation, masks) runs in :meth:`step`."""
        self._start_world_check(job)
        if isinstance(job, MaskJob):
            if not job.prompts:
                raise ValueError("a mask needs a located object or a box")
            if any(not isinstance(p.state, GroundedObject) and p.box is None for p in job.prompts):
                raise ValueError("a mask prompt needs a located object or a box")
            self._masks.append(job)
            return
        if job.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        budget, bias = job.max_new_tokens, {}
        if self.fixed_new_tokens is not None:
            budget, bias = self.fixed_new_tokens, {self.engine.ids.eos: float("-inf")}
        geometry = ImageGeometry(job.image.width, job.image.height)
        request = self.pipeline.request(job.prompt, geometry, max_new_tokens=budget, logit_bias=bias, request_id=job.id)
        self._starting.append(_Starting(job, request))

    def step(self) -> list[tuple[int, Outcome | BaseException]]:
        """Compute waiting masks, start waiting generations, advance the engine one token; return finished jobs.

        Raises:
            StepOutOfMemory: the device ran out of memory; every job was dropped (the runner is idle and usable).
            DeviceFailure: the device is unusable; every job was dropped.
            Exception: anything else; every job was dropped.
        """
        try:
            return self._step()
        except Exception as error:
            self._reset()
            first_line = (str(error).splitlines() or [type(error).__name__])[0][:300]
            if is_out_of_memory(error):
                self.out_of_memory_steps += 1
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise StepOutOfMemory(first_line) from error
            if is_device_failure(error):
                raise DeviceFailure(first_line) from error
            raise

    def cancel(self, job_id: int) -> None:
        """Stop a job; it is reported by the next :meth:`step` (cancelled generations leave the engine there)."""
        waiting = len(self._starting) + len(self._masks)
        self._starting = [s for s in self._starting if s.job.id != job_id]
        self._masks = [job for job in self._masks if job.id != job_id]
        if len(self._starting) + len(self._masks) < waiting:
            self._stopped.append(job_id)
        else:
            self.engine.cancel(job_id)

    def has_work(self) -> bool:
        return bool(self._starting or self._masks or self._stopped) or self.engine.has_work()

    # ------------------------------------------------------------------------------------------------------------
    def _step(self) -> list[tuple[int, Outcome | BaseException]]:
        finished: list[tuple[int, Outcome | BaseException]] = [(job_id, CANCELLED) for job_id in self._stopped]
        self._stopped = []
        if self._masks:
            finished += self._run_masks(self._masks)
            self._masks = []
        if self._starting:
            self._start(self._starting)
            self._starting = []
        if self.engine.has_work():
            for result in self.engine.step():
                job = self._jobs.pop(int(result.request_id))  # type: ignore[arg-type]
                finished.append((job.id, self._outcome(job, result)))
        return finished

    def _reset(self) -> None:
        """Drop every job and the engine's batch state (after a failed step)."""
        self.engine.reset()
        self._jobs.clear()
        self._starting, self._masks, self._stopped = [], [], []

    def _start(self, starting: list[_Starting]) -> None:
        """Fill in the jobs' image features (new images encoded together) and put the requests on the engine."""
        images = encode_cached(
            [(cache_key(item.job), item.job.image) for item in starting],
            self.features,
            lambda images: self.engine.encode_images(*_pixels_and_resizes(images)),
            _feature_bytes,
        )
        for item in starting:
            item.request.image = images[cache_key(item.job)]
            self.engine.submit(item.request)
            self._jobs[item.job.id] = item.job

    def _sam_images(self, jobs: list[MaskJob]) -> dict[str, SamImage]:
        """The SAM embeddings of the jobs' images: cached ones, the others encoded together."""
        keyed = [(cache_key(job), job.image) for job in jobs]
        return encode_cached(
            keyed,
            self.sam_images,
            lambda images: self.engine.encode_sam_images(*_pixels_and_resizes(images)),
            _sam_bytes,
        )

    @torch.inference_mode()
    def _run_masks(self, jobs: list[MaskJob]) -> list[tuple[int, Outcome | BaseException]]:
        images = self._sam_images(jobs)
        return [(job.id, self._masks_for(job, images[cache_key(job)])) for job in jobs]

    def _masks_for(self, job: MaskJob, sam_image: SamImage) -> MaskOutcome:
        states: list[torch.Tensor] = []
        boxes: list[torch.Tensor] = []
        for prompt in job.prompts:
            objects = [prompt.state] if isinstance(prompt.state, GroundedObject) else []
            given = [prompt.box] if prompt.box is not None and not objects else []
            prompt_states, prompt_boxes = self.pipeline.mask_prompts(sam_image.geometry, objects, given)
            states.append(prompt_states)
            boxes.append(prompt_boxes)
        masks = self.pipeline.masks(sam_image, torch.cat(states), torch.cat(boxes))
        return MaskOutcome(
            tuple(m.mask for m in masks), tuple(m.iou for m in masks), tuple(m.empty for m in masks),
            self.image_warnings(job),
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    def _outcome(self, job: GenerationJob, result: GenerationResult) -> GenerationOutcome:
        # The geometry comes from the job: a cache lookup here could re-encode an evicted image just to read its size.
        geometry = ImageGeometry(job.image.width, job.image.height)
        answer = self.pipeline.answer(job.prompt, result, geometry)
        objects: list[FoundObject] = []
        for obj in answer.objects:
            x1, y1, x2, y2 = (round(v, 1) for v in obj.box)
            objects.append(FoundObject(obj.phrase, (x1, y1, x2, y2), obj))
        return GenerationOutcome(answer.parsed.segments, tuple(objects), result.finish_reason, self.image_warnings(job))

    def image_warnings(self, job: Job) -> tuple[str, ...]:
        """The model's world check of the job's image (cached by owner and content, like its encodings)."""
        return self._start_world_check(job).result()

    def _start_world_check(self, job: Job) -> Future[tuple[str, ...]]:
        key = cache_key(job)
        found = self._warnings.get(key)
        if found is not None:
            self._warnings.move_to_end(key)
            return found
        if self._world_checker is None:
            found = Future[tuple[str, ...]]()
            found.set_result(())
        else:
            found = self._world_checker.submit(lambda: tuple(self.model_scope.image_warnings(job.image.pixels)))
        self._warnings[key] = found
        if len(self._warnings) > WARNINGS_CACHE:
            self._warnings.popitem(last=False)
        return found


# ----------------------------------------------------------------------------------------------------------------
# Objects that cross processes (the cluster's model replicas): float32 numpy states out, the model's tensors back in.


def portable_objects(outcome: GenerationOutcome) -> GenerationOutcome:
    """``outcome`` with each located object's state as a :class:`PortableObject` (float32, on the host)."""
    objects: list[FoundObject] = []
    for obj in outcome.objects:
        state = obj.state
        if isinstance(state, GroundedObject):
            hidden = state.at_hidden.detach().to("cpu", torch.float32).numpy()
            state = PortableObject(state.phrase, state.box, state.square_box, hidden)
        objects.append(FoundObject(obj.phrase, obj.box, state))
    return dataclasses.replace(outcome, objects=tuple(objects))


def grounded_prompts(job: MaskJob, dtype: str) -> MaskJob:
    """``job`` with :class:`PortableObject` states made :class:`GroundedObject` s again, in the model's ``dtype``
    (bf16 → float32 → bf16 is exact), so the runner takes them as if it had located them itself."""
    prompts: list[MaskPrompt] = []
    for prompt in job.prompts:
        state = prompt.state
        if isinstance(state, PortableObject):
            hidden = torch.tensor(np.asarray(state.at_hidden, dtype=np.float32)).to(getattr(torch, dtype))
            prompt = MaskPrompt(GroundedObject(state.phrase, state.box, state.square_box, hidden), prompt.box)
        prompts.append(prompt)
    return dataclasses.replace(job, prompts=tuple(prompts))
