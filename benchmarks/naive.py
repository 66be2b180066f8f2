"""The naive path: what a straightforward server does, one request at a time on the model's own building blocks.

No batching and no caching: the image is encoded for every pass, generation is plain greedy decoding with a KV cache
at batch 1 (transformers' own forward and cache, as ``generate`` does it), and the mask takes a fresh teacher-forced
location pass (no stored object state) and a SAM encoding. It gets decoded pixels and skips the protocol (image
decoding, JSON, mask PNG), so the comparison leans in its favour.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.timings import Timings, measured
from benchmarks.workload import FALLBACK_BOX, Item
from nextchat.modeling_nextchat import NextChatModel
from nextchat.pipeline import NextChatPipeline
from nextchat.processing import boxes_from_square
from nextchat.tasks import locate_question
from nextchat.tokenization import NextChatTokenizer


class NaivePath:
    """Locate and segment one request at a time: no batching, no caches, no stored object state.

    Generation is greedy, EOS banned and ``new_tokens`` long, with NExT-Chat's ``<at>`` feedback (the state that read
    ``<at>`` gives the box, whose embedding is the next input). The loop is written here, on transformers' cache,
    because the engine's decode steps run on the batch's own preallocated cache: one of the optimisations measured.
    Everything else is the one-request pipeline: its prompt builder, its image encoding at batch 1, its location pass
    and its masks; those cache nothing.
    """

    def __init__(self, net: NextChatModel, tokenizer: NextChatTokenizer, new_tokens: int) -> None:
        self.net, self.tokenizer, self.new_tokens = net, tokenizer, new_tokens
        self.pipeline = NextChatPipeline(net, tokenizer)
        self.ids = self.pipeline.engine.ids

    def _forward(
        self, embeds: torch.Tensor, past: int, cache: object | None
    ) -> tuple[torch.Tensor, torch.Tensor, object]:
        """One LLaMA pass at batch 1 over new positions ``embeds`` ``[T, hidden]`` after the ``past`` ones cached.

        Returns the final-norm state ``[hidden]`` and logits ``[vocab]`` of the last position, and the grown cache.
        """
        total = past + embeds.shape[0]
        mask = torch.ones((1, total), dtype=torch.long, device=self.net.device)
        positions = torch.arange(past, total, device=self.net.device)[None]
        last = torch.tensor([embeds.shape[0] - 1], device=self.net.device)
        hidden, logits, cache = self.net.forward_llm(embeds[None], mask, positions, cache, last)
        return hidden[0, -1], logits[0], cache

    @torch.inference_mode()
    def locate(self, pixels: np.ndarray, query: str) -> tuple[str, list[torch.Tensor]]:
        """Generated text and the pixel boxes ``[4]`` of the objects it located."""
        image = self.pipeline.engine.encode_images([pixels])[0]
        prompt = torch.tensor([self.pipeline.prompt_ids(locate_question(query))], device=self.net.device)
        embeds = self.net.embed_prompt(prompt, [image.features], [torch.zeros(0, 4)], self.ids)[0]
        hidden, logits, cache = self._forward(embeds, 0, None)
        tokens: list[int] = []
        boxes: list[torch.Tensor] = []
        while True:
            if tokens and tokens[-1] == self.ids.at:  # this state read <at>: the object's; its box is the next input
                boxes.append(boxes_from_square(self.net.decode_boxes(hidden[None]).float().cpu(), image.geometry)[0])
                tokens.append(self.ids.boxes)
                embed = self.net.box_feedback(hidden[None])[0]
            else:
                logits[self.ids.eos] = float("-inf")  # fixed length: the answer never ends early
                tokens.append(int(logits.argmax()))
                embed = self.net.embed_tokens(torch.tensor([tokens[-1]], device=self.net.device))[0]
            if len(tokens) >= self.new_tokens and tokens[-1] != self.ids.at:  # an <at> at the end still gets its box
                break
            past = prompt.shape[1] + len(tokens) - 1  # the prompt and every token before the one just chosen
            hidden, logits, cache = self._forward(embed[None], past, cache)
        return self.tokenizer.decode(tokens), boxes

    @torch.inference_mode()
    def segment(self, pixels: np.ndarray, query: str, by_box: bool) -> np.ndarray:
        """A bool mask ``[H, W]``: of the object the query locates (a new teacher-forced pass), or of the box."""
        if by_box:
            (mask,) = self.pipeline.segment(pixels, boxes=[FALLBACK_BOX])
        else:
            (mask,) = self.pipeline.segment(pixels, objects=[self.pipeline.locate(pixels, query)])
        return mask.mask

    def request(self, item: Item, timings: Timings | None) -> None:
        """Locate, then segment what was found (the fallback box when nothing was); ``timings`` records it."""
        started = time.perf_counter()
        _, boxes = self.locate(item.pixels, item.query)
        after_locate = time.perf_counter()
        self.segment(item.pixels, item.query, by_box=not boxes)
        if timings is not None:
            timings.add(started, after_locate, time.perf_counter(), bool(boxes))


def run_naive(naive: NaivePath, items: list[Item], timings: Timings, device: str) -> None:
    """The items one at a time; adds to ``timings`` (wall time included)."""
    with measured(timings, device):
        for item in items:
            naive.request(item, timings)
