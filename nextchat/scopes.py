"""What each model answers about: the scope sentence every result carries, and the world check a model may have.

A model's scope follows from its checkpoint's name (``NextChatConfig.name``): the embedded demo model
(``demo-shapes``) knows only the shapes world and checks every image against it (``nextchat.demo.world_check``); the
random-weight presets answer nothing meaningful; any other checkpoint is NExT-Chat, an open-world model of
photographs. :func:`scope_of_argument` reads the same from a ``--model`` argument before the model is loaded, so a
server can name the scope in its tool descriptions without loading torch. numpy and Pillow only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nextchat.demo import world_check


@dataclass(frozen=True)
class ModelScope:
    """What a model knows.

    Attributes:
        scope: one sentence: what the model was trained on and how far its answers can be trusted.
        world_check: for a model of a closed world, sentences for a caller when an RGB uint8 ``[H, W, 3]`` image
            lies outside it (an empty list when it does not); ``None`` for an open-world model.
    """

    scope: str
    world_check: Callable[[np.ndarray], list[str]] | None = None

    def image_warnings(self, image: np.ndarray) -> list[str]:
        """What a caller should know about ``image`` (RGB uint8 ``[H, W, 3]``) before trusting this model on it."""
        return self.world_check(image) if self.world_check is not None else []


DEMO_ARGUMENT = "demo"  # the --model value that loads the embedded checkpoint (nextchat.loading.DEMO_NAME)
DEMO = ModelScope(world_check.SCOPE, world_check.warnings)
RANDOM_WEIGHTS = ModelScope("a random-weight model for tests and benchmarks: its boxes, masks and answers mean nothing")
NEXTCHAT = ModelScope(
    "NExT-Chat: an open-world model of photographs and everyday images, questions in English; its boxes and masks "
    "are predictions without a confidence score, so check what matters"
)
SCOPES_BY_NAME = {"demo-shapes": DEMO, "tiny": RANDOM_WEIGHTS, "bench-mid": RANDOM_WEIGHTS}


def scope_of(name: str) -> ModelScope:
    """The scope of a loaded model, by its checkpoint's name (``NextChatConfig.name``)."""
    return SCOPES_BY_NAME.get(name, NEXTCHAT)


def scope_of_argument(model: str) -> ModelScope:
    """The scope of the model a ``--model`` argument names (``demo``, a checkpoint directory or a hub id), from
    the name in a directory's ``config.json`` when it has one; without loading anything."""
    if model == DEMO_ARGUMENT:
        return DEMO
    config = Path(model).expanduser() / "config.json"
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return NEXTCHAT
    extra = raw.get("nextchat") if isinstance(raw, dict) else None
    name = extra.get("name") if isinstance(extra, dict) else None
    return scope_of(name) if isinstance(name, str) else NEXTCHAT
