"""Shapes-world samples → training tensors in the official NExT-Chat formats.

A batch holds a few scenes and several conversations about each (one task each). Every ``<boxes>`` token, in the
question (a region given) or in the answer (an object located), gets ``loc_encoder`` of its ground-truth box, as in
the official training; ``<boxes>`` is never a language-model target. Boxes are square-frame xyxy, 0–1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from nextchat.demo.world import COLOURS, SHAPES, Sample, Scene, make_sample, render_scene
from nextchat.processing import ImageGeometry, boxes_to_square, vision_pixel_values
from nextchat.prompting import chat_prompt
from nextchat.resizing import expand_to_square
from nextchat.tokenization import NextChatTokenizer


# How often each task is asked. Locating is the skill everything else leans on, so it gets the most practice.
TASK_WEIGHTS = {
    "locate": 0.68,
    "locate_all": 0.05,
    "describe": 0.08,
    "count": 0.035,
    "colour": 0.035,
    "shape": 0.035,
    "exists": 0.035,
    "grounded": 0.05,
}
NUM_PATCH_CLASSES = 1 + len(COLOURS) * len(SHAPES)  # background + every (colour, shape)
PATCH_COVERAGE = 0.2  # a patch belongs to an object when the object covers this share of it


def object_class(colour: str, shape: str) -> int:
    """Patch class of a (colour, shape) pair; 0 is background."""
    return 1 + list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def label_map(scene: Scene) -> np.ndarray:
    """uint8 ``[H, W]``: 0 for background, i + 1 where object i is visible (visible masks are disjoint)."""
    labels = np.zeros((scene.height, scene.width), dtype=np.uint8)
    for i, obj in enumerate(scene.objects):
        labels[obj.mask] = i + 1
    return labels


def patch_coverage(scene: Scene, image_size: int, patch_size: int) -> np.ndarray:
    """float32 ``[num_objects, g*g]``: each object's share of every patch of the vision tower's input."""
    square = expand_to_square(np.repeat(label_map(scene)[..., None], 3, axis=2), fill=(0, 0, 0))[..., 0]
    small = np.asarray(Image.fromarray(square).resize((image_size, image_size), Image.Resampling.NEAREST))
    grid = image_size // patch_size
    blocks = small.reshape(grid, patch_size, grid, patch_size)
    ids = np.arange(1, len(scene.objects) + 1, dtype=np.uint8)[:, None, None, None, None]
    return (blocks[None] == ids).mean(axis=(2, 4)).reshape(len(scene.objects), -1).astype(np.float32)


def sam_frame_masks(scene: Scene, sam_size: int) -> np.ndarray:
    """bool ``[num_objects, S, S]``: the objects' masks in SAM's frame (long side resized to S, centred padding)."""
    geometry = ImageGeometry(scene.width, scene.height)
    w, h = geometry.sam_resized_size(sam_size)
    small = np.asarray(Image.fromarray(label_map(scene)).resize((w, h), Image.Resampling.NEAREST))
    left, top = geometry.sam_padding(sam_size)
    canvas = np.zeros((sam_size, sam_size), dtype=np.uint8)
    canvas[top : top + h, left : left + w] = small
    return canvas[None] == np.arange(1, len(scene.objects) + 1, dtype=np.uint8)[:, None, None]


@dataclass
class Batch:
    """Tensors for one training step.

    Attributes:
        pixel_values: ``[S, 3, s, s]`` the scenes' vision-tower inputs.
        patch_classes: ``[S, g*g]`` long, the class of the object filling each patch (0 background).
        patch_boxes: ``[S, g*g, 4]`` square-frame xyxy box of that object (zeros on background).
        input_ids, attention_mask, labels: ``[B, T]`` right-padded conversations; labels are -100 off the answer.
        scene_index: ``[B]`` which scene each conversation is about.
        boxes: per conversation ``[K, 4]`` ground-truth boxes of its ``<boxes>`` tokens, in order.
        at_rows, at_positions, at_targets: the answer's ``<at>`` tokens ``[M]``, ``[M]`` and their boxes ``[M, 4]``.
        target_patches: ``[B, g*g]`` share of each patch covered by the objects the question is about
            (``Sample.subjects``); -1 on rows about no object ("Is there a …?" answered no).
    """

    pixel_values: torch.Tensor
    patch_classes: torch.Tensor
    patch_boxes: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    scene_index: torch.Tensor
    boxes: list[torch.Tensor]
    at_rows: torch.Tensor
    at_positions: torch.Tensor
    at_targets: torch.Tensor
    target_patches: torch.Tensor


def conversation_ids(
    tokenizer: NextChatTokenizer, sample: Sample, image_tokens: int, image_first: bool, system_prompt: str | None
) -> tuple[list[int], int]:
    """Token ids of prompt + answer + ``</s>``, and where the answer starts."""
    prompt = tokenizer.encode(chat_prompt(sample.question, image_tokens, image_first, system_prompt))
    answer = tokenizer.encode(
        f"{chat_prompt(sample.question, image_tokens, image_first, system_prompt)} {sample.answer}</s>"
    )
    if answer[: len(prompt)] != prompt:
        raise ValueError(f"prompt ids are not a prefix of the conversation for {sample.question!r}")
    return answer, len(prompt)


def jitter_box(box: tuple[float, float, float, float], rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Move each side of a pixel xyxy box by up to 10 % of the box's width or height."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    dx1, dy1, dx2, dy2 = rng.uniform(-0.1, 0.1, 4) * np.array([w, h, w, h])
    return x1 + dx1, y1 + dy1, x2 + dx2, y2 + dy2


class BatchBuilder:
    """Renders scenes and turns them into :class:`Batch` es (deterministic for a given random generator)."""

    def __init__(self, tokenizer: NextChatTokenizer, config, samples_per_scene: int = 4) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.samples_per_scene = samples_per_scene
        self.image_size = config.image_size
        self.patch_size = config.image_size // config.image_grid
        self.at = tokenizer.token_id("<at>")
        self.boxes_id = tokenizer.token_id("<boxes>")
        self.tasks = list(TASK_WEIGHTS)
        self.weights = np.array(list(TASK_WEIGHTS.values()))
        self.weights = self.weights / self.weights.sum()

    def samples(self, scene: Scene, rng: np.random.Generator) -> list[Sample]:
        """Conversations about one scene, tasks drawn by weight (re-drawn when a task cannot be posed).

        Locate questions about one scene go to different objects while there are any left: the same picture asked
        for two objects with two answers is the plainest lesson in binding the words to the object.
        """
        out: list[Sample] = []
        order = list(rng.permutation(len(scene.objects))) if scene.objects else []
        while len(out) < self.samples_per_scene:
            task = str(rng.choice(self.tasks, p=self.weights))
            subject = None
            if task == "locate" and order:
                subject = int(order.pop())
            sample = make_sample(scene, task, rng, subject=subject)
            if sample is not None:
                out.append(sample)
        return out

    def build(
        self, rng: np.random.Generator, num_scenes: int, max_objects: int = 4, scenes: Sequence[Scene] | None = None
    ) -> Batch:
        """A batch of ``num_scenes`` fresh scenes (up to ``max_objects`` each) × ``samples_per_scene`` conversations."""
        if scenes is None:
            scenes = [render_scene(rng, max_objects=max_objects) for _ in range(num_scenes)]
        config = self.config
        pixels, classes, patch_boxes, rows = [], [], [], []
        for s_index, scene in enumerate(scenes):
            pixels.append(vision_pixel_values(scene.image, self.image_size))
            coverage = patch_coverage(scene, self.image_size, self.patch_size)
            geometry = ImageGeometry(scene.width, scene.height)
            best = coverage.argmax(0) if len(scene.objects) else np.zeros(coverage.shape[1], dtype=np.int64)
            patch_class = np.zeros(coverage.shape[1], dtype=np.int64)
            patch_box = torch.zeros(coverage.shape[1], 4)
            object_boxes = boxes_to_square(np.asarray([o.box for o in scene.objects]).reshape(-1, 4), geometry)
            for i, obj in enumerate(scene.objects):
                hit = (best == i) & (coverage[i] >= PATCH_COVERAGE)
                patch_class[hit] = object_class(obj.colour, obj.shape)
                patch_box[torch.from_numpy(hit)] = object_boxes[i]
            classes.append(torch.from_numpy(patch_class))
            patch_boxes.append(patch_box)
            rows.extend((s_index, scene, sample, geometry, coverage) for sample in self.samples(scene, rng))
        ids_list, starts = [], []
        for _, _, sample, _, _ in rows:
            ids, start = conversation_ids(
                self.tokenizer, sample, config.image_token_len, config.image_first, config.system_prompt
            )
            ids_list.append(ids)
            starts.append(start)
        length = max(len(i) for i in ids_list)
        batch = len(rows)
        input_ids = torch.full((batch, length), self.tokenizer.pad_id, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        target_patches = torch.full((batch, coverage.shape[1]), -1.0)
        boxes, at_rows, at_positions, at_targets = [], [], [], []
        for row, ((_, _, sample, geometry, cov), ids, start) in enumerate(zip(rows, ids_list, starts, strict=True)):
            tensor = torch.tensor(ids)
            input_ids[row, : len(ids)] = tensor
            attention[row, : len(ids)] = 1
            labels[row, start : len(ids)] = tensor[start:]
            labels[row][input_ids[row] == self.boxes_id] = -100
            # A caller's box is rarely tight: jitter given boxes by up to 10 % of their size.
            given = [jitter_box(b, rng) for b in sample.boxes_in]
            all_boxes = given + list(sample.boxes_out)
            square = boxes_to_square(np.asarray(all_boxes, dtype=np.float64).reshape(-1, 4), geometry)
            boxes.append(square)
            answer_ats = [p for p in (tensor == self.at).nonzero().flatten().tolist() if p >= start]
            for k, position in enumerate(answer_ats):
                at_rows.append(row)
                at_positions.append(position)
                at_targets.append(square[len(sample.boxes_in) + k])
            if sample.subjects:
                target_patches[row] = torch.from_numpy(cov[list(sample.subjects)].sum(0))
        return Batch(
            pixel_values=torch.stack(pixels),
            patch_classes=torch.stack(classes),
            patch_boxes=torch.stack(patch_boxes),
            input_ids=input_ids,
            attention_mask=attention,
            labels=labels,
            scene_index=torch.tensor([r[0] for r in rows]),
            boxes=boxes,
            at_rows=torch.tensor(at_rows, dtype=torch.long),
            at_positions=torch.tensor(at_positions, dtype=torch.long),
            at_targets=torch.stack(at_targets) if at_targets else torch.zeros(0, 4),
            target_patches=target_patches,
        )


def task_corpus(rng: np.random.Generator, num_scenes: int = 1500) -> list[str]:
    """The text pieces of a few thousand conversations (split at added tokens), to train the demo vocabulary on."""
    from nextchat.demo.world import TASKS

    lines = []
    for _ in range(num_scenes):
        scene = render_scene(rng)
        for task in TASKS:
            sample = make_sample(scene, task, rng)
            if sample is not None:
                text = f"USER: {sample.question} ASSISTANT: {sample.answer}"
                lines += [chunk.strip() for chunk in re.split(r"<at>|<boxes>", text) if chunk.strip()]
    return lines
