"""High-level NExT-Chat tasks on images: locate, ask (optionally grounded), describe a region, segment.

Inputs are RGB uint8 ``[H, W, 3]`` arrays; boxes in and out are pixel xyxy in that image (origin top-left), and
masks are bool ``[H, W]`` on it. One call runs one request; a server batches many through :class:`NextChatEngine`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nextchat.decode_graphs import DecodeMode
from nextchat.engine import EncodedImage, GenerationRequest, GenerationResult, NextChatEngine, SamImage
from nextchat.loading import load_model
from nextchat.modeling_nextchat import NextChatModel
from nextchat.processing import ImageGeometry, boxes_from_square, boxes_to_square
from nextchat.prompting import ParsedAnswer, chat_prompt, parse_answer
from nextchat.tasks import Box, TaskPrompt, answer_question, describe_region, locate_one
from nextchat.tokenization import NextChatTokenizer


@dataclass(frozen=True)
class GroundedObject:
    """An object the model located.

    Attributes:
        phrase: the words of the answer the object belongs to.
        box: pixel xyxy in the original image, clipped to it.
        square_box: the raw model output, normalised xyxy in the expand-to-square frame.
        at_hidden: ``[hidden]`` the ``<at>`` state, which makes its mask cheap (no new LLM pass).
    """

    phrase: str
    box: Box
    square_box: Box
    at_hidden: torch.Tensor


@dataclass(frozen=True)
class Answer:
    """Generated text split at its objects, and the objects."""

    parsed: ParsedAnswer
    objects: tuple[GroundedObject, ...]
    finish_reason: str

    @property
    def text(self) -> str:
        """The answer with ``[i]`` where object ``i`` was located."""
        return self.parsed.text()


@dataclass(frozen=True)
class Mask:
    """A binary mask on the original image, with SAM's IoU prediction.

    ``empty`` is set (and ``mask`` all False) when the predicted IoU is below the model's threshold, as the official
    demo does.
    """

    mask: np.ndarray
    iou: float
    empty: bool


def answer_from_result(
    tokenizer: NextChatTokenizer, result: GenerationResult, geometry: ImageGeometry, fallback_phrase: str = ""
) -> Answer:
    """Decode a generation result: text pieces between ``<at> <boxes>`` pairs, phrases and pixel boxes."""
    at = tokenizer.token_id("<at>")
    boxes_id = tokenizer.token_id("<boxes>")
    pieces: list[str] = []
    run: list[int] = []
    for token in result.token_ids:
        if token == at:
            pieces.append(tokenizer.decode(run))
            run = []
        elif token != boxes_id:
            run.append(token)
    pieces.append(tokenizer.decode(run))
    if not result.objects:
        pieces = [" ".join(p for p in pieces if p)]
    elif result.objects[0].token_index < 0:  # the <at> was the prompt's last token (teacher-forced location)
        pieces.insert(0, "")
    parsed = parse_answer(pieces, fallback_phrase)
    objects = []
    for obj, phrase in zip(result.objects, parsed.phrases, strict=True):
        box = boxes_from_square(obj.box, geometry)[0].tolist()
        objects.append(GroundedObject(phrase, tuple(box), tuple(obj.box.tolist()), obj.at_hidden))
    return Answer(parsed, tuple(objects), result.finish_reason)


class NextChatPipeline:
    """NExT-Chat's tasks, one image at a time (greedy decoding, so results are deterministic)."""

    def __init__(
        self, model: NextChatModel, tokenizer: NextChatTokenizer, decode_mode: DecodeMode | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.engine = NextChatEngine(model, tokenizer, decode_mode)

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | Path, device: str = "auto", dtype: str = "auto", quantize: str = "none"
    ) -> NextChatPipeline:
        """Load a checkpoint (see :func:`nextchat.load_model`; ``quantize``: none, int8 or nf4)."""
        model, tokenizer, _ = load_model(path_or_id, device=device, dtype=dtype, quantize=quantize)
        return cls(model, tokenizer)

    # ------------------------------------------------------------------------------------------------------------
    def prompt_ids(self, message: str, answer_prefix: str = "") -> list[int]:
        """Token ids of a one-turn prompt about one image (the template and the image block included)."""
        config = self.model.config
        text = chat_prompt(message, config.image_token_len, config.image_first, config.system_prompt)
        if answer_prefix:
            text = f"{text} {answer_prefix}"
        return self.tokenizer.encode(text)

    def request(
        self,
        prompt: TaskPrompt,
        geometry: ImageGeometry,
        image: EncodedImage | None = None,
        *,
        max_new_tokens: int = 64,
        logit_bias: dict[int, float] | None = None,
        request_id: Hashable = None,
    ) -> GenerationRequest:
        """The engine request for a task prompt about an image of ``geometry`` (its features may come later).

        Given boxes go from original pixels to the square frame here; a prompt that locates in its own pass
        (``prompt.locates_in_prompt``) needs one step whatever the budget.
        """
        boxes = None
        if prompt.boxes:
            boxes = boxes_to_square(np.asarray(prompt.boxes, dtype=np.float64), geometry)
        return GenerationRequest(
            self.prompt_ids(prompt.message, prompt.answer_prefix),
            image=image,
            boxes=boxes,
            max_new_tokens=1 if prompt.locates_in_prompt else max_new_tokens,
            logit_bias=logit_bias or {},
            request_id=request_id,
        )

    def answer(self, prompt: TaskPrompt, result: GenerationResult, geometry: ImageGeometry) -> Answer:
        """A finished request of ``prompt`` read back: text pieces, phrases, pixel boxes."""
        return answer_from_result(self.tokenizer, result, geometry, prompt.fallback_phrase)

    def run(
        self,
        image: np.ndarray | EncodedImage,
        prompt: TaskPrompt,
        max_new_tokens: int = 64,
        logit_bias: dict[int, float] | None = None,
    ) -> Answer:
        """One task prompt on one image, greedily."""
        encoded = image if isinstance(image, EncodedImage) else self.engine.encode_images([image])[0]
        request = self.request(prompt, encoded.geometry, encoded, max_new_tokens=max_new_tokens, logit_bias=logit_bias)
        (result,) = self.engine.run_batch([request])
        return self.answer(prompt, result, encoded.geometry)

    # ------------------------------------------------------------------------------------------------------------
    def locate(self, image: np.ndarray | EncodedImage, expression: str) -> GroundedObject:
        """The one object an expression refers to (REC: "Answer: <at>" teacher-forced; one LLM pass)."""
        return self.run(image, locate_one(expression)).objects[0]

    def ask(
        self,
        image: np.ndarray | EncodedImage,
        question: str,
        ground: bool = False,
        max_new_tokens: int = 64,
        logit_bias: dict[int, float] | None = None,
    ) -> Answer:
        """Free greedy answer; with ``ground`` the model is asked to locate the objects it mentions."""
        return self.run(image, answer_question(question, ground), max_new_tokens, logit_bias)

    def describe(
        self, image: np.ndarray | EncodedImage, box: Box, question: str | None = None, max_new_tokens: int = 64
    ) -> Answer:
        """Describe (or answer ``question`` about) the region ``box`` (pixel xyxy), given through the box encoder."""
        return self.run(image, describe_region(box, question), max_new_tokens)

    # ------------------------------------------------------------------------------------------------------------
    def mask_prompts(
        self, geometry: ImageGeometry, objects: Sequence[GroundedObject] = (), boxes: Sequence[Box] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM prompts for located objects (their ``<at>`` states) and then for given pixel boxes.

        A given box has no ``<at>`` state; :meth:`NextChatEngine.box_prompt_states` stands in for it.

        Returns:
            states ``[N, hidden]`` and square-frame xyxy boxes ``[N, 4]``, objects first.
        """
        states = [obj.at_hidden for obj in objects]
        square = [torch.tensor(obj.square_box) for obj in objects]
        if boxes:
            given = boxes_to_square(np.asarray(boxes, dtype=np.float64), geometry)
            states.extend(self.engine.box_prompt_states(given))
            square.extend(given)
        if not states:
            hidden = self.model.config.hidden_size
            return torch.zeros(0, hidden), torch.zeros(0, 4)
        return torch.stack(states), torch.stack(square)

    def masks(self, sam_image: SamImage, states: torch.Tensor, square_boxes: torch.Tensor) -> list[Mask]:
        """Binary masks on the original image for ``[N, hidden]`` prompt states and their ``[N, 4]`` square boxes.

        A mask whose predicted IoU is under the model's ``mask_iou_threshold`` is reported empty (all False), as the
        official demo does.
        """
        if states.shape[0] == 0:
            return []
        logits, iou = self.engine.predict_masks(sam_image, states, square_boxes)
        threshold = self.model.config.mask_iou_threshold
        masks = []
        for mask_logits, score in zip(logits, iou.tolist(), strict=True):
            empty = score < threshold
            mask = np.zeros(mask_logits.shape, dtype=bool) if empty else (mask_logits > 0).cpu().numpy()
            masks.append(Mask(mask, float(score), empty))
        return masks

    def segment(
        self,
        image: np.ndarray | SamImage,
        objects: Sequence[GroundedObject] = (),
        boxes: Sequence[Box] = (),
    ) -> list[Mask]:
        """Masks for located objects (their ``<at>`` states are reused) and for given pixel boxes, in that order."""
        sam_image = image if isinstance(image, SamImage) else self.engine.encode_sam_images([image])[0]
        return self.masks(sam_image, *self.mask_prompts(sam_image.geometry, objects, boxes))
