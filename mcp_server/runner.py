"""The model side of the executor: NExT-Chat jobs on :class:`nextchat.NextChatEngine` (the only torch user here).

Imported only inside the worker thread (by the default runner factory), so the protocol layer, ``--help`` and schema
generation never load torch. Vision features and SAM embeddings are cached by image content in byte-bounded LRUs, so
``locate → segment → describe`` on one image encodes it once, and SAM's encoder runs only when a mask is asked for.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from mcp_server.messages import FoundObject, GenerationOutcome, Job, MaskOutcome, Outcome
from nextchat.engine import EncodedImage, GenerationRequest, GenerationResult, SamImage
from nextchat.loading import load_model
from nextchat.pipeline import NextChatPipeline, answer_from_result
from nextchat.processing import ImageGeometry, boxes_to_square
from nextchat.prompting import LOCATE_ANSWER_PREFIX, locate_question, region_question, vqa_question


log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")


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


@dataclass(frozen=True)
class ObjectState:
    """What a located object keeps for its mask: the ``<at>`` state and the raw square-frame box."""

    at_hidden: torch.Tensor
    square_box: torch.Tensor


def _locate_question(query: str) -> str:
    # "all the cups" reads as a plural question, as the grounding data phrases it.
    query = query.strip().rstrip("?.")
    return f"Where are {query} in the image?" if query.lower().startswith("all ") else locate_question(query)


class NextChatRunner:
    """Runs :class:`~mcp_server.messages.Job` s on a loaded NExT-Chat model.

    Args:
        model: checkpoint directory, hub id or ``demo``.
        device, dtype: as :func:`nextchat.load_model`.
        cache_bytes: budget of each of the two image caches (vision features, SAM embeddings).
    """

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", cache_bytes: int = 512 << 20) -> None:
        net, tokenizer, _ = load_model(model, device=device, dtype=dtype)
        self.pipeline = NextChatPipeline(net, tokenizer)
        self.engine = self.pipeline.engine
        self.device = str(net.device)
        self.dtype = str(net.dtype).removeprefix("torch.")
        self.model_name = net.config.name
        self.features: TensorLRU[EncodedImage] = TensorLRU(cache_bytes)
        self.sam_images: TensorLRU[SamImage] = TensorLRU(cache_bytes)
        self._jobs: dict[int, Job] = {}
        self._done: list[tuple[int, Outcome | BaseException]] = []

    # ------------------------------------------------------------------------------------------------------------
    def _encoded(self, job: Job) -> EncodedImage:
        cached = self.features.get(job.image.key)
        if cached is None:
            (cached,) = self.engine.encode_images([job.image.pixels])
            self.features.put(job.image.key, cached, cached.features.numel() * cached.features.element_size())
        return cached

    def _sam(self, job: Job) -> SamImage:
        cached = self.sam_images.get(job.image.key)
        if cached is None:
            (cached,) = self.engine.encode_sam_images([job.image.pixels])
            self.sam_images.put(job.image.key, cached, cached.embeddings.numel() * cached.embeddings.element_size())
        return cached

    def submit(self, job: Job) -> None:
        """Queue a generation on the engine, or compute a mask now (reported at the next :meth:`step`)."""
        if job.kind == "segment":
            self._done.append((job.id, self._segment(job)))
            return
        encoded = self._encoded(job)
        boxes = None
        if job.kind == "locate" and job.single:
            ids = self.pipeline.prompt_ids(locate_question(job.text), LOCATE_ANSWER_PREFIX)
        elif job.kind == "locate":
            ids = self.pipeline.prompt_ids(_locate_question(job.text))
        elif job.kind == "describe":
            if job.box is None:
                raise ValueError("describe needs a box")
            ids = self.pipeline.prompt_ids(region_question(job.text or None))
            boxes = boxes_to_square(np.asarray([job.box], dtype=np.float64), encoded.geometry)
        else:
            ids = self.pipeline.prompt_ids(vqa_question(job.text, job.ground))
        budget = 1 if job.single else job.max_new_tokens
        self.engine.submit(GenerationRequest(ids, image=encoded, boxes=boxes, max_new_tokens=budget, request_id=job.id))
        self._jobs[job.id] = job

    def step(self) -> list[tuple[int, Outcome | BaseException]]:
        finished, self._done = self._done, []
        if self.engine.has_work():
            for result in self.engine.step():
                job = self._jobs.pop(int(result.request_id))  # type: ignore[arg-type]
                finished.append((job.id, self._outcome(job, result)))
        return finished

    def cancel(self, job_id: int) -> None:
        self.engine.cancel(job_id)

    def has_work(self) -> bool:
        return bool(self._done) or self.engine.has_work()

    # ------------------------------------------------------------------------------------------------------------
    def _outcome(self, job: Job, result: GenerationResult) -> GenerationOutcome:
        fallback = job.text if job.kind == "locate" else ""
        # The geometry comes from the job: a cache lookup here could re-encode an evicted image just to read its size.
        geometry = ImageGeometry(job.image.width, job.image.height)
        answer = answer_from_result(self.pipeline.tokenizer, result, geometry, fallback)
        objects = []
        for o in answer.objects:
            x1, y1, x2, y2 = (round(v, 1) for v in o.box)
            objects.append(
                FoundObject(o.phrase, (x1, y1, x2, y2), ObjectState(o.at_hidden, torch.tensor(o.square_box)))
            )
        return GenerationOutcome(answer.parsed.segments, tuple(objects), result.finish_reason)

    @torch.inference_mode()
    def _segment(self, job: Job) -> MaskOutcome:
        sam_image = self._sam(job)
        states, boxes = [], []
        for prompt in job.prompts:
            if isinstance(prompt.state, ObjectState):
                states.append(prompt.state.at_hidden)
                boxes.append(prompt.state.square_box)
            elif prompt.box is not None:
                square = boxes_to_square(np.asarray([prompt.box], dtype=np.float64), sam_image.geometry)
                states.append(self.engine.box_prompt_states(square)[0])
                boxes.append(square[0])
            else:
                raise ValueError("a mask prompt needs a located object or a box")
        logits, iou = self.engine.predict_masks(sam_image, torch.stack(states), torch.stack(boxes))
        threshold = self.pipeline.model.config.mask_iou_threshold
        scores = [float(s) for s in iou.tolist()]
        empty = tuple(s < threshold for s in scores)
        masks = tuple(
            np.zeros(m.shape, dtype=bool) if e else (m > 0).cpu().numpy() for m, e in zip(logits, empty, strict=True)
        )
        return MaskOutcome(masks, tuple(scores), empty)
