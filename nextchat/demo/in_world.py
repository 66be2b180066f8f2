"""Whether an image belongs to the demo model's world: one plain (maybe lightly noisy) background plus flat shapes
in the world's four colours.

The demo model was trained only on such scenes; on anything else (a photo, a screenshot, a drawing) it still answers,
and its boxes then mean nothing. So the check measures how much of the image the world explains: the share of pixels
within :data:`COLOUR_TOLERANCE` of the dominant (background) colour or of a shape colour. A scene of the world is
explained almost entirely (background noise has std <= 8 per channel, shape colours jitter by <= 15; shapes are drawn
without anti-aliasing); a gradient, a texture, a photo or a page of text is not. numpy only.

Calibration (tests/demo/test_in_world.py): on 500 held-out scenes the explained share stays above 0.99; on the
procedural non-shapes images (textures, gradients, noise, UI screenshots with text, line drawings) it is mostly well
under :data:`MIN_EXPLAINED`; the threshold sits between the two.
"""

from __future__ import annotations

import numpy as np

from nextchat.demo.world import COLOURS


SCOPE = (
    "demo model: synthetic scenes of red, green, blue and yellow circles, squares and triangles on one plain "
    "background; answers on other images are meaningless"
)
COLOUR_TOLERANCE = 45.0  # Euclidean RGB distance: ~3 std of the background noise, beyond the shape colour jitter
MIN_EXPLAINED = 0.97  # share of pixels the world's colours must explain
SAMPLE_SIDE = 128  # the check looks at a grid of at most about this many pixels per side (nearest, no blending)

_SHAPE_RGB = np.array(list(COLOURS.values()), dtype=np.float32)


def explained_fraction(image: np.ndarray) -> float:
    """Share of the pixels of uint8 ``[H, W, 3]`` RGB ``image`` within :data:`COLOUR_TOLERANCE` of its dominant
    colour or of a shape colour of the world, on an evenly strided sample grid."""
    height, width = image.shape[:2]
    step_y, step_x = max(1, height // SAMPLE_SIDE), max(1, width // SAMPLE_SIDE)
    pixels = image[::step_y, ::step_x, :3].reshape(-1, 3).astype(np.float32)
    # The dominant colour: the median of the pixels in the most populated coarse colour bin.
    bins = (pixels // 32).astype(np.int32)
    keys = bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2]
    background = np.median(pixels[keys == np.bincount(keys).argmax()], axis=0)
    palette = np.vstack([background[None, :], _SHAPE_RGB])
    distances = np.linalg.norm(pixels[:, None, :] - palette[None, :, :], axis=2).min(axis=1)
    return float((distances <= COLOUR_TOLERANCE).mean())


def out_of_world_warning(image: np.ndarray) -> str | None:
    """A sentence for the caller when uint8 ``[H, W, 3]`` ``image`` is not a scene of the demo world, else None."""
    share = explained_fraction(image)
    if share >= MIN_EXPLAINED:
        return None
    return (
        f"this image is outside the demo model's world (only {share:.0%} of it is the plain background or a shape "
        "colour; the model knows only coloured circles, squares and triangles on a plain background): its boxes, "
        "masks and answers here are not meaningful"
    )
