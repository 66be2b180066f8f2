"""The standard workload, and the plan that splits it into alternating rounds.

Each request is ``locate_objects`` on its own 336 px image (a shapes scene) with a query that makes a ~40-token text
prompt, then ``segment_object`` on the first object found, by its id (by :data:`FALLBACK_BOX` when none was found).
Generation is fixed-length: every answer is ``--new-tokens`` tokens whatever the weights say, so runs compare across
models and machines.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from nextchat.demo.world import render_scene
from nextchat.pipeline import NextChatPipeline
from nextchat.tasks import locate_question


IMAGE_SIDE = 336
PROMPT_TEXT_TOKENS = 40  # the prompt's text tokens (template and question), image tokens not counted
FILLER = ("shown", "near", "the", "middle", "of", "this", "picture", "of", "coloured", "shapes", "on", "a", "plain",
          "light", "background")  # fmt: skip
FALLBACK_BOX = (84.0, 84.0, 252.0, 252.0)  # what is segmented when locate found nothing (random weights may not)


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


@dataclass
class Rounds:
    """The measurement plan: per round, a naive chunk and a chunk of every batched point, run one after another.

    Interleaving puts both paths in every stretch of the run: a shared machine's speed drifts by tens of percent over
    a minute, and a naive block measured before all batched ones would carry that drift into the ratio.

    Attributes:
        naive: per round, the naive path's requests.
        batched: per round, each concurrency's requests.
        warmup: one request for each path before anything is measured (first-call costs, the executor's start).
    """

    naive: list[list[Item]]
    batched: list[dict[int, list[Item]]]
    warmup: tuple[Item, Item]

    @property
    def chunk(self) -> dict[int, int]:
        """Requests a round at each concurrency."""
        return {c: len(items) for c, items in self.batched[0].items()}


def plan(pipeline: NextChatPipeline, rounds: int, concurrency: list[int], requests: int, naive_requests: int) -> Rounds:
    """The workload in ``rounds`` rounds.

    Args:
        pipeline: for the prompts' token counts (queries are padded to :data:`PROMPT_TEXT_TOKENS`).
        rounds: how many times the paths alternate (at least 1).
        concurrency: the batched points' caller counts.
        requests: requests a batched point over all rounds; each round's chunk is at least 4 × its callers, so the
            callers' closed loop runs for a while before the batch drains.
        naive_requests: requests on the naive path over all rounds (at least one a round).

    Returns:
        The plan; each batched point has its own scenes (a seed per concurrency), the naive path and the warm-up
        theirs.
    """
    chunk = {c: max(-(-requests // rounds), 4 * c) for c in sorted(set(concurrency))}
    points = {c: workload(n * rounds, seed=100 + c, pipeline=pipeline) for c, n in chunk.items()}
    naive = workload(max(naive_requests, rounds), seed=1, pipeline=pipeline)
    first, second = workload(2, seed=2, pipeline=pipeline)
    return Rounds(
        naive=[naive[r::rounds] for r in range(rounds)],
        batched=[{c: items[r * chunk[c] : (r + 1) * chunk[c]] for c, items in points.items()} for r in range(rounds)],
        warmup=(first, second),
    )
