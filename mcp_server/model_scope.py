"""What each model is for, as results state it, and the warnings a result carries when its image is outside that.

The demo model knows only its synthetic shapes world, so its in-world check (``nextchat.demo.in_world``) runs on
every image it is given; NExT-Chat itself is an open-world model and gets no such check.
"""

from __future__ import annotations

import numpy as np

from nextchat.demo import in_world


DEMO_MODEL = "demo"
NEXTCHAT_SCOPE = (
    "NExT-Chat: open-world photographs and everyday scenes, English questions; boxes and masks are model predictions"
)


def scope_of(model: str) -> str:
    """The sentence that says what ``model`` (its public name) was trained for."""
    return in_world.SCOPE if model == DEMO_MODEL else NEXTCHAT_SCOPE


def image_warnings(model: str, pixels: np.ndarray) -> list[str]:
    """Sentences for the caller about RGB uint8 ``[H, W, 3]`` ``pixels`` given to ``model`` (empty when none)."""
    if model != DEMO_MODEL:
        return []
    warning = in_world.out_of_world_warning(pixels)
    return [warning] if warning else []
