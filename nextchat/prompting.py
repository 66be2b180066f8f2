"""The official NExT-Chat prompt format, and reading objects and phrases back out of answers.

The conversation template is vicuna_v1.1: ``"{system} USER: {message} ASSISTANT:"``. An image is the block
``<im_start>`` + N × ``<im_patch>`` + ``<im_end>`` next to the message; a box, in a question or an answer, is the
pair ``<at> <boxes>``. What each task says inside that frame is :mod:`nextchat.tasks`'s.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from nextchat.tokenization import AT, BOXES, IM_END, IM_PATCH, IM_START


SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
OBJECT = f"{AT} {BOXES}"  # one box, in a question (input) or an answer (output)


def image_block(num_tokens: int) -> str:
    """The placeholder text an image's features replace."""
    return IM_START + IM_PATCH * num_tokens + IM_END


def chat_prompt(
    message: str, image_tokens: int | None, image_first: bool = True, system_prompt: str | None = None
) -> str:
    """One user turn in the vicuna_v1.1 template, ready for the assistant's answer.

    Args:
        message: the user's text (with ``<at> <boxes>`` for each input box).
        image_tokens: number of image tokens, or ``None`` for a text-only prompt.
        image_first: image before the message (official); after it for models trained that way.
        system_prompt: the system line; ``None`` for vicuna_v1.1's, ``""`` for none.
    """
    if image_tokens is not None:
        block = image_block(image_tokens)
        message = f"{block} {message}" if image_first else f"{message} {block}"
    system = SYSTEM_PROMPT if system_prompt is None else system_prompt
    return f"{system} USER: {message} ASSISTANT:".lstrip()


# ------------------------------------------------------------------------------------------------------------------
# Answers


@dataclass(frozen=True)
class ParsedAnswer:
    """An answer split at its objects.

    Attributes:
        segments: ``len(phrases) + 1`` text pieces; object ``i`` sits between ``segments[i]`` and ``segments[i+1]``.
        phrases: the phrase each object belongs to.
    """

    segments: tuple[str, ...]
    phrases: tuple[str, ...]

    def text(self, markers: Sequence[str] | None = None) -> str:
        """The answer with a marker where each object is (``[0]``, ``[1]``, ... as the official demo by default)."""
        markers = markers if markers is not None else [f"[{i}]" for i in range(len(self.phrases))]
        parts = [self.segments[0]]
        for marker, segment in zip(markers, self.segments[1:], strict=True):
            parts += [marker, segment]
        text = " ".join(p for p in parts if p)
        return re.sub(r"\s+([.,;:!?])", r"\1", text).strip()


_CLAUSE_BREAK = re.compile(r"[.,;:!?()]")
_LEADING_FILLER = re.compile(
    r"^(?:(?:and|or|with|including|there\s+(?:is|are)|it\s+is|this\s+is|these\s+are|answer|the\s+answer\s+is)\b\s*)+",
    re.IGNORECASE,
)


def recover_phrase(segment: str) -> str:
    """The phrase right before an object marker: the last clause of the text since the previous object."""
    clause = _CLAUSE_BREAK.split(segment)[-1]
    return _LEADING_FILLER.sub("", clause.strip()).strip()


def parse_answer(texts: Sequence[str], fallback_phrase: str = "") -> ParsedAnswer:
    """Phrases for the objects of an answer given as the text pieces around its ``<at> <boxes>`` pairs.

    Consecutive pairs with no words between them belong to the same phrase (k objects of one phrase are written as
    k pairs); a pair with no phrase at all (the REC answer "Answer: <at> <boxes> .") takes ``fallback_phrase``.
    """
    phrases: list[str] = []
    for _i, segment in enumerate(texts[:-1]):
        phrase = recover_phrase(segment)
        if not phrase:
            phrase = phrases[-1] if phrases and not segment.strip(" ,") else fallback_phrase
        phrases.append(phrase)
    return ParsedAnswer(tuple(t.strip() for t in texts), tuple(phrases))
