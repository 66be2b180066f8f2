"""The task wordings: what the model is asked for each task, in the words the published checkpoint was trained on.

Every prompt the library, the server and the demo model's training and evaluation send is built here, so the words
never drift apart. A :class:`TaskPrompt` is plain data (no torch): the user's message, with ``<at> <boxes>`` where
each given box goes; the teacher-forced start of the answer, if any; the given boxes in original-image pixels; and the
phrase an object takes when the answer names none. :meth:`nextchat.NextChatPipeline.request` turns one into a
generation request (the box frames are converted there, once).
"""

from __future__ import annotations

from dataclasses import dataclass

from nextchat.prompting import OBJECT
from nextchat.tokenization import AT


Box = tuple[float, float, float, float]  # pixel xyxy in the original image, origin top-left

LOCATE_ANSWER_PREFIX = f"Answer: {AT}"  # the teacher-forced start of a REC answer: "Answer: <at> <boxes> ."
GROUNDING_SUFFIX = "Please mention related object locations."
GROUNDED_CAPTION = "Can you describe the image and include object locations?"
REGION_PLACEHOLDERS = ("[region]", "[0]")


@dataclass(frozen=True)
class TaskPrompt:
    """One request to the model, in words.

    Attributes:
        message: the user's message; each ``<at> <boxes>`` in it is one of ``boxes``, in order.
        answer_prefix: the start of the answer, written for the model (teacher forcing); empty for free generation.
        boxes: the given regions, pixel xyxy in the original image.
        fallback_phrase: the phrase of an object whose answer names none (a REC answer is just "Answer: <at>").
    """

    message: str
    answer_prefix: str = ""
    boxes: tuple[Box, ...] = ()
    fallback_phrase: str = ""

    @property
    def locates_in_prompt(self) -> bool:
        """Whether the prompt itself ends on ``<at>``: the object's box comes from the prompt pass alone."""
        return self.answer_prefix.endswith(AT)


# ------------------------------------------------------------------------------------------------------------------
# Questions, as the checkpoint's training data words them


def locate_question(expression: str) -> str:
    """REC: "Where is the red circle in the image?"."""
    return f"Where is {expression.strip().rstrip('?.')} in the image?"


def locate_all_question(query: str) -> str:
    """Grounding of every match: "Where are all the cups in the image?" (plural queries read as the data phrases
    them); a singular query gets the REC wording."""
    query = query.strip().rstrip("?.")
    return f"Where are {query} in the image?" if query.lower().startswith("all ") else locate_question(query)


def region_question(question: str | None = None) -> str:
    """A question about one given box. Without a question: region caption ("Can you describe <at> <boxes>?").

    A custom question names the region with ``[region]`` (or the official demo's ``[0]``); one without either gets
    the region in front.
    """
    if question is None:
        return f"Can you describe {OBJECT}?"
    for placeholder in REGION_PLACEHOLDERS:
        if placeholder in question:
            return question.replace(placeholder, OBJECT, 1)
    return f"For the region {OBJECT}, {question.strip()}"


def vqa_question(question: str, ground: bool = False) -> str:
    """VQA; with ``ground`` the model is asked to mention object locations ("VQA + localisation")."""
    question = question.strip()
    return f"{question} {GROUNDING_SUFFIX}" if ground else question


# ------------------------------------------------------------------------------------------------------------------
# Tasks


def locate_one(expression: str) -> TaskPrompt:
    """The one object an expression refers to: "Answer: <at>" is teacher-forced, so one LLM pass gives the box."""
    return TaskPrompt(locate_question(expression), LOCATE_ANSWER_PREFIX, fallback_phrase=expression)


def locate_all(query: str) -> TaskPrompt:
    """Every object a query refers to ("the red mug", "all the cups"), generated freely: one ``<at>`` each."""
    return TaskPrompt(locate_all_question(query), fallback_phrase=query)


def describe_region(box: Box, question: str | None = None) -> TaskPrompt:
    """A description of the region ``box``, or the answer to ``question`` about it (see :func:`region_question`)."""
    return TaskPrompt(region_question(question), boxes=(box,))


def answer_question(question: str, ground: bool = False) -> TaskPrompt:
    """An answer to a question about the image; with ``ground`` the objects it mentions are located too."""
    return TaskPrompt(vqa_question(question, ground))
