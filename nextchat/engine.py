"""A synchronous, batch-at-step-boundaries generation engine for NExT-Chat (no asyncio; a scheduler drives it).

Requests are prefilled together, then every active request advances one token per :meth:`NextChatEngine.step`.
New requests join and finished or cancelled ones leave between steps. Rows are left-padded with an attention mask
and per-row position ids, so a request's tokens and boxes do not depend on what it was batched with. The prompt pass
is transformers' own forward; its keys and values then move into the running batch's
:class:`~nextchat.kv_cache.BatchKVCache`, on which decode steps run (eagerly, or replayed from CUDA graphs:
:mod:`nextchat.decode_graphs`).

The ``<at>`` feedback loop (greedy, as the official ``generate`` with ``num_beams=1``): the forward step whose
input is ``<at>`` yields the final-norm state ``h_at``; its box is ``loc_decoder(h_at)``; the token that step
predicts is replaced by ``<boxes>``, whose input embedding is ``loc_encoder(loc_decoder(h_at))``.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from nextchat.decode_graphs import DecodeMode, DecodeStep
from nextchat.kv_cache import BatchKVCache
from nextchat.modeling_nextchat import NextChatModel, TokenIds
from nextchat.processing import ImageGeometry, mask_logits_to_original, sam_pixel_values, vision_pixel_values
from nextchat.resizing import ResizedImage
from nextchat.tokenization import AT, BOXES, IM_END, IM_PATCH, IM_START, NextChatTokenizer


FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class EncodedImage:
    """An image's projected vision features ``[N, hidden]`` and its geometry (cacheable by image content)."""

    features: torch.Tensor
    geometry: ImageGeometry


@dataclass(frozen=True)
class SamImage:
    """An image's SAM embedding ``[1, 256, g, g]`` and its geometry (cacheable by image content)."""

    embeddings: torch.Tensor
    geometry: ImageGeometry


@dataclass
class GenerationRequest:
    """One prompt to continue greedily.

    Attributes:
        prompt_ids: the full prompt (BOS, template, image block of ``<im_patch>`` placeholders). A prompt that ends
            with ``<at>`` is teacher-forced location (the official REC path): its box comes from the prompt pass.
        image: the image whose features fill the ``<im_patch>`` positions (``None`` for a text-only prompt).
        boxes: ``[K, 4]`` square-frame xyxy for the K ``<boxes>`` tokens of the prompt, in order.
        max_new_tokens: generation budget; a ``<boxes>`` written after ``<at>`` counts as a token.
        logit_bias: token id → value added to its logit before the argmax.
        request_id: the caller's key for this request (results carry it back).
        trace: record each forward step's input embedding, final hidden state and logits (for parity checks).
    """

    prompt_ids: Sequence[int]
    image: EncodedImage | None = None
    boxes: torch.Tensor | None = None
    max_new_tokens: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)
    request_id: Hashable = None
    trace: bool = False


@dataclass(frozen=True)
class LocatedObject:
    """An object the model located: its ``<at>`` position in the output, box and state.

    Attributes:
        token_index: index of its ``<at>`` in ``GenerationResult.token_ids`` (-1 when the ``<at>`` was the prompt's
            last token).
        box: ``[4]`` square-frame xyxy as ``loc_decoder`` emits it (float32, unclamped, on the CPU: every consumer
            of a box is host code).
        at_hidden: ``[hidden]`` final-norm state at ``<at>``; a mask for this object needs no new LLM pass.
    """

    token_index: int
    box: torch.Tensor
    at_hidden: torch.Tensor


@dataclass
class StepTrace:
    """One forward step of a traced request: the input embedding (None for the prompt pass), state and logits."""

    input_embed: torch.Tensor | None
    hidden: torch.Tensor
    logits: torch.Tensor


@dataclass
class GenerationResult:
    """The outcome of a request: generated ids (``<boxes>`` after every ``<at>``; no EOS) and located objects."""

    request_id: Hashable
    token_ids: list[int]
    objects: list[LocatedObject]
    finish_reason: FinishReason
    trace: list[StepTrace] = field(default_factory=list)


@dataclass
class _Slot:
    request: GenerationRequest
    tokens: list[int] = field(default_factory=list)
    objects: list[LocatedObject] = field(default_factory=list)
    trace: list[StepTrace] = field(default_factory=list)
    next_embed: torch.Tensor | None = None  # [hidden], the next forward's input
    input_is_at: bool = False  # the pending (or just computed) position holds <at>
    next_position: int = 0
    finish_reason: FinishReason | None = None
    cancelled: bool = False

    def result(self) -> GenerationResult:
        reason = self.finish_reason or "cancelled"
        return GenerationResult(self.request.request_id, self.tokens, self.objects, reason, self.trace)


def _cache_layers(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` ``[B, heads, T, head_dim]`` of a transformers ``DynamicCache`` (any version)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[attr-defined]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # type: ignore[attr-defined]


class NextChatEngine:
    """Schedules NExT-Chat generation: prefill, decode steps, join and leave at step boundaries.

    Args:
        model: the network (eval mode).
        tokenizer: its tokenizer (special token ids come from here).
        decode_mode: how decode steps run (:mod:`nextchat.decode_graphs`); default: CUDA graphs on a CUDA device,
            eager elsewhere.
    """

    def __init__(
        self, model: NextChatModel, tokenizer: NextChatTokenizer, decode_mode: DecodeMode | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.ids = TokenIds(
            im_patch=tokenizer.token_id(IM_PATCH),
            im_start=tokenizer.token_id(IM_START),
            im_end=tokenizer.token_id(IM_END),
            at=tokenizer.token_id(AT),
            boxes=tokenizer.token_id(BOXES),
            bos=tokenizer.bos_id,
            eos=tokenizer.eos_id,
            pad=tokenizer.pad_id,
        )
        self._waiting: list[_Slot] = []
        self._active: list[_Slot] = []  # row i of the batch state
        self._kv = self._new_cache()  # keys and values of the running rows
        self._decode_step = DecodeStep(model, decode_mode or ("graphs" if model.device.type == "cuda" else "eager"))

    def _new_cache(self) -> BatchKVCache:
        return BatchKVCache.for_config(self.model.model.config, self.model.dtype, self.model.device)

    # ------------------------------------------------------------------------------------------------------------
    # Images

    @torch.inference_mode()
    def encode_images(
        self, images: Sequence[np.ndarray], resized: Sequence[ResizedImage | None] | None = None
    ) -> list[EncodedImage]:
        """RGB uint8 ``[H, W, 3]`` images → features for the LLM, one batched tower pass.

        ``resized``: each image's first resizes where they were already made (:mod:`nextchat.resizing`), so only
        the normalisation is left here; an image without one for this model's side is resized here.
        """
        size = self.model.config.image_size
        firsts = resized or [None] * len(images)
        pixels = torch.stack(
            [vision_pixel_values(image, size, first=first) for image, first in zip(images, firsts, strict=True)]
        ).to(self.model.device)
        features = self.model.encode_images(pixels)
        return [
            EncodedImage(f, ImageGeometry(image.shape[1], image.shape[0]))
            for f, image in zip(features, images, strict=True)
        ]

    @torch.inference_mode()
    def encode_sam_images(
        self, images: Sequence[np.ndarray], resized: Sequence[ResizedImage | None] | None = None
    ) -> list[SamImage]:
        """RGB uint8 ``[H, W, 3]`` images → SAM embeddings, one batched encoder pass (``resized`` as in
        :meth:`encode_images`)."""
        size = self.model.config.sam.image_size
        firsts = resized or [None] * len(images)
        pixels = torch.stack(
            [sam_pixel_values(image, size, first) for image, first in zip(images, firsts, strict=True)]
        )
        embeddings = self.model.encode_sam_images(pixels)
        return [
            SamImage(e[None], ImageGeometry(image.shape[1], image.shape[0]))
            for e, image in zip(embeddings, images, strict=True)
        ]

    @torch.inference_mode()
    def predict_masks(
        self, image: SamImage, at_hidden: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits on the original image ``[N, H, W]`` (float32; > 0 is inside) and predicted IoU ``[N]``.

        Args:
            image: the SAM embedding.
            at_hidden: ``[N, hidden]`` the objects' ``<at>`` states, or :meth:`box_prompt_states` for given boxes.
            boxes: ``[N, 4]`` square-frame xyxy.
        """
        low_res, iou = self.model.predict_masks(
            image.embeddings, at_hidden.to(self.model.device), boxes.to(self.model.device)
        )
        logits = mask_logits_to_original(low_res, image.geometry, self.model.config.sam.image_size)
        return logits, iou

    @torch.inference_mode()
    def box_prompt_states(self, boxes: torch.Tensor) -> torch.Tensor:
        """Stand-in ``<at>`` states ``[N, hidden]`` for boxes no ``<at>`` produced (a caller's boxes).

        ``loc_encoder(box)``: the cycle loss trains ``loc_encoder(loc_decoder(h_at)) ≈ h_at``, so the box encoder's
        output is the state the model would have had, had it emitted this box itself. It needs no LLM pass.
        """
        return self.model.encode_boxes(boxes)

    # ------------------------------------------------------------------------------------------------------------
    # Scheduling

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it is prefilled at the next :meth:`step`."""
        self._submit(request)

    def _submit(self, request: GenerationRequest) -> _Slot:
        if not request.prompt_ids:
            raise ValueError("empty prompt")
        if request.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        slot = _Slot(request)
        self._waiting.append(slot)
        return slot

    def cancel(self, request_id: Hashable) -> bool:
        """Cancel a queued or running request; it leaves at the next step with ``finish_reason='cancelled'``."""
        found = False
        for slot in itertools.chain(self._waiting, self._active):
            if slot.request.request_id == request_id:
                slot.cancelled = found = True
        return found

    @property
    def decode_mode(self) -> DecodeMode:
        """How decode steps run now (``graphs`` falls back to ``eager`` for good if a capture fails)."""
        return self._decode_step.mode

    @property
    def num_active(self) -> int:
        """Requests in the running batch."""
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        """Requests submitted and not yet prefilled."""
        return len(self._waiting)

    def has_work(self) -> bool:
        """Whether a :meth:`step` would do anything."""
        return bool(self._waiting or self._active)

    def reset(self) -> list[Hashable]:
        """Drop every queued and running request and the batch state; returns the dropped request ids.

        After a step that raised (out of memory, say) the batch state may be half updated; a reset makes the engine
        idle and consistent again, so the dropped requests can be submitted afresh.
        """
        dropped = [s.request.request_id for s in itertools.chain(self._waiting, self._active)]
        self._waiting, self._active = [], []
        self._kv = self._new_cache()
        return dropped

    @torch.inference_mode()
    def step(self) -> list[GenerationResult]:
        """Advance every running request one token, prefill the waiting ones, and return those that finished.

        Cancelled requests leave first, without running; requests submitted since the last step join the batch.
        """
        finished = [s for s in self._waiting if s.cancelled]
        waiting = [s for s in self._waiting if not s.cancelled]
        self._waiting = []
        if any(s.cancelled for s in self._active):
            finished += [s for s in self._active if s.cancelled]
            self._keep([i for i, s in enumerate(self._active) if not s.cancelled])
        if self._active:
            self._decode()
            done = [s for s in self._active if s.finish_reason is not None]
            if done:
                finished += done
                self._keep([i for i, s in enumerate(self._active) if s.finish_reason is None])
        if waiting:
            layers, mask = self._prefill(waiting)
            finished += [s for s in waiting if s.finish_reason is not None]
            keep = [i for i, s in enumerate(waiting) if s.finish_reason is None]
            if keep:
                self._join([waiting[i] for i in keep], [(k[keep], v[keep]) for k, v in layers], mask[keep])
        return [s.result() for s in finished]

    def run_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run requests to completion together on an idle engine; results in request order."""
        if self.has_work():
            raise RuntimeError("run_batch needs an idle engine; drive a busy one with submit() and step()")
        slots = [self._submit(r) for r in requests]
        while self.has_work():
            self.step()
        return [s.result() for s in slots]

    # ------------------------------------------------------------------------------------------------------------
    # Internals

    def _prefill(self, slots: list[_Slot]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """One left-padded pass over the prompts; returns the new rows' cache layers and attention mask."""
        device = self.model.device
        length = max(len(s.request.prompt_ids) for s in slots)
        ids = torch.full((len(slots), length), self.ids.pad, dtype=torch.long)
        mask = torch.zeros((len(slots), length), dtype=torch.long)
        for row, slot in enumerate(slots):
            prompt = torch.as_tensor(list(slot.request.prompt_ids), dtype=torch.long)
            ids[row, length - len(prompt) :] = prompt
            mask[row, length - len(prompt) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        embeds = self.model.embed_prompt(
            ids,
            [s.request.image.features if s.request.image is not None else None for s in slots],
            [s.request.boxes if s.request.boxes is not None else torch.zeros(0, 4) for s in slots],
            self.ids,
        )
        last = torch.full((len(slots),), length - 1, dtype=torch.long, device=device)
        hidden, logits, cache = self.model.forward_llm(embeds, mask, positions, None, logits_positions=last)
        for slot in slots:
            slot.next_position = len(slot.request.prompt_ids)
            slot.input_is_at = slot.request.prompt_ids[-1] == self.ids.at
        self._consume(slots, hidden[:, -1], logits, None)
        return _cache_layers(cache), mask

    def _decode(self) -> None:
        """One decode step for every running row."""
        embeds = torch.stack([s.next_embed for s in self._active if s.next_embed is not None])[:, None]
        assert embeds.shape[0] == len(self._active) == self._kv.rows
        positions = torch.tensor([[s.next_position] for s in self._active], device=self.model.device)
        hidden, logits = self._decode_step(self._kv, embeds, positions)
        for slot in self._active:
            slot.next_position += 1
        self._consume(self._active, hidden, logits, embeds[:, 0])

    def _consume(
        self, slots: list[_Slot], hidden: torch.Tensor, logits: torch.Tensor, input_embeds: torch.Tensor | None
    ) -> None:
        """Turn one forward step's outputs into each slot's next token (or object) and next input.

        Args:
            slots: the rows of the step, in order.
            hidden: ``[R, hidden]`` final-norm state of each row's last position.
            logits: ``[R, vocab]`` their logits.
            input_embeds: ``[R, hidden]`` the step's inputs (None for the prompt pass), for traces.

        The whole batch is handled with a few batched ops and one device-to-host copy (the chosen tokens), not
        per row: a decode step costs the same host work at batch 1 and batch 32.
        """
        for row, slot in enumerate(slots):
            if slot.request.trace:
                embed = input_embeds[row] if input_embeds is not None else None
                slot.trace.append(StepTrace(embed, hidden[row].float().clone(), logits[row].clone()))
        at_rows = [row for row, slot in enumerate(slots) if slot.input_is_at]
        token_rows = [row for row, slot in enumerate(slots) if not slot.input_is_at]
        if at_rows:
            self._locate(slots, at_rows, hidden[at_rows])
        if token_rows:
            self._next_tokens(slots, token_rows, logits[token_rows])

    def _locate(self, slots: list[_Slot], rows: list[int], at_hidden: torch.Tensor) -> None:
        """Rows whose step read ``<at>``: the state ``[R, hidden]`` locates an object; ``<boxes>`` comes next, with
        the box's embedding as its input (whatever the step predicted)."""
        boxes = self.model.decode_boxes(at_hidden).float().cpu()
        feedback = self.model.box_feedback(at_hidden)
        for k, row in enumerate(rows):
            slot = slots[row]
            slot.objects.append(LocatedObject(len(slot.tokens) - 1, boxes[k], at_hidden[k].clone()))
            slot.tokens.append(self.ids.boxes)
            slot.next_embed = feedback[k]
            slot.input_is_at = False
            if len(slot.tokens) >= slot.request.max_new_tokens:
                slot.finish_reason = "length"

    def _next_tokens(self, slots: list[_Slot], rows: list[int], logits: torch.Tensor) -> None:
        """Greedy tokens for the other rows from their logits ``[R, vocab]`` (each request's bias added): end of
        answer, or the next input."""
        tokens: list[int] = self._biased(logits, [slots[row] for row in rows]).argmax(-1).tolist()
        growing = []
        for row, token in zip(rows, tokens, strict=True):
            slot = slots[row]
            if token == self.ids.eos:
                slot.finish_reason = "stop"
                continue
            slot.tokens.append(token)
            slot.input_is_at = token == self.ids.at
            growing.append(slot)
            # An <at> at the end of the budget still gets its box: one more step reads its state.
            if len(slot.tokens) >= slot.request.max_new_tokens and not slot.input_is_at:
                slot.finish_reason = "length"
        if growing:
            ids = torch.tensor([slot.tokens[-1] for slot in growing], device=self.model.device)
            for slot, embed in zip(growing, self.model.embed_tokens(ids), strict=True):
                slot.next_embed = embed

    @staticmethod
    def _biased(logits: torch.Tensor, slots: list[_Slot]) -> torch.Tensor:
        """``logits`` ``[R, vocab]`` plus each row's request ``logit_bias`` (one scatter for the whole batch)."""
        rows, token_ids, values = [], [], []
        for k, slot in enumerate(slots):
            for token_id, bias in slot.request.logit_bias.items():
                rows.append(k)
                token_ids.append(token_id)
                values.append(bias)
        if not rows:
            return logits
        index = (torch.tensor(rows, device=logits.device), torch.tensor(token_ids, device=logits.device))
        return logits.index_put(index, torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)

    def _join(self, slots: list[_Slot], layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Append freshly prefilled rows to the running batch."""
        self._kv.append(layers, mask)
        self._active.extend(slots)

    def _keep(self, rows: list[int]) -> None:
        """Keep only the given rows of the running batch."""
        self._active = [self._active[r] for r in rows]
        self._kv.keep(rows)
