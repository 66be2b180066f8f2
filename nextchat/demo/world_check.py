"""Whether an image looks like a scene of the shapes world, the only images the demo model was trained on.

A scene of the world (``world.py``) is one background colour, plain or with bounded noise (at most 2.9 std of at
most 8 per channel), and one to four solid shapes, each 15-40 % of the shorter side and at least 75 % visible, in
the world's four colours (jittered by at most 15 per channel), drawn without anti-aliasing. The check asks how well
that explains an image, on its pixels in RGB:

- *shape* pixels lie within :data:`SHAPE_TOLERANCE` of a shape colour;
- the *background* is the most common colour among the other pixels (its coarse colour bin, then the median);
  *background* pixels lie within :data:`BACKGROUND_TOLERANCE` of it;
- a pixel that is neither is still *explained* when it lies within :data:`BLEND_REACH` px of an explained pixel and
  within :data:`BLEND_TOLERANCE` of the line between two of those colours: the blended edge a resize or a JPEG leaves;
- the rest is *unexplained*: a photo's texture, a gradient, noise, text, pen strokes, a second background.

An image is out of the world when more than :data:`MAX_UNEXPLAINED` of it is unexplained; when less than
:data:`MIN_SHAPE_SHARE` of it has a shape colour (every scene holds a shape); when a shape colour covers some of it
but less than :data:`MIN_COLOUR_SHARE` (smaller than any shape of the world: an icon, a small button) or more than
:data:`MAX_COLOUR_SHARE` (more than its shapes of one colour can cover: a coloured page or wall); or when under
:data:`MIN_SOLID_SHARE` of its shape-coloured pixels have all eight neighbours of their colour (pen strokes and
specks, not solid shapes). numpy only; an image larger than :data:`MAX_SIDE` a side is looked at on a strided grid
(nearest pixels, no blending), which bounds the cost at about 65 k pixels.

Calibration (``tests/demo/test_world_check.py``; figures in ``nextchat/demo/README.md``): rendered scenes are
explained exactly (no pixel unexplained, the smallest colour share 0.7 %, the smallest solid share 0.66); JPEG
(quality 75) and resized scenes nearly so; the procedural non-shapes images the tests make (textures, landscapes,
gradients, noise, UI screenshots with text, drawings) leave far more unexplained or fail another rule. Known blind
spots: flat blocks of the shape colours on a plain page (a flag, a large button with no text on it) pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nextchat.demo.world import COLOURS, SHAPES


SHAPE_TOLERANCE = 40.0  # Euclidean RGB; the jitter reaches 15 * sqrt(3) = 26
BACKGROUND_TOLERANCE = 45.0  # the bounded noise reaches 23 a channel, 40 in Euclidean distance
BLEND_TOLERANCE = 40.0  # distance from the line between two explained colours (a JPEG's ringing included)
BLEND_REACH = 2  # px: how far from explained pixels a blend may lie
MAX_UNEXPLAINED = 0.02  # JPEG quality 75 leaves up to 1 % of a scene unexplained
MIN_SHAPE_SHARE = 0.002
MIN_COLOUR_SHARE = 0.004  # the smallest shape of the world covers 0.7 % (0.6 % after a JPEG)
# One colour's shapes (a circle, a square and a triangle of at most 40 % of the shorter side) cover at most
# 0.126 + 0.16 + 0.08 = 0.37 of a scene; 0.21 at most on 500 held-out scenes.
MAX_COLOUR_SHARE = 0.4
NOISE_COLOUR_SHARE = 0.0005  # a colour this rare is stray pixels (a resize's blends), not a shape
MIN_SOLID_SHARE = 0.4
# A 336 px image (the model's input size) is looked at on a 168 px grid, a quarter of its pixels, and the calibration
# figures (nextchat/demo/README.md) stay on the same side of every threshold as on the full grid.
MAX_SIDE = 256

SHAPE_RGB = np.array(list(COLOURS.values()), dtype=np.float32)
SCOPE = (
    f"the embedded demo model: synthetic scenes of {len(SHAPES)} shapes ({', '.join(SHAPES)}) in "
    f"{len(COLOURS)} colours ({', '.join(COLOURS)}) on one plain background; it knows nothing else, and its boxes, "
    "masks and answers on any other image are meaningless"
)


def _grid(image: np.ndarray) -> np.ndarray:
    """uint8 ``[h, w, 3]``: ``image`` (uint8 ``[H, W, 3+]``) on a strided grid of at most ``MAX_SIDE`` a side."""
    height, width = image.shape[:2]
    step = max(1, -(-max(height, width) // MAX_SIDE))
    return np.ascontiguousarray(image[::step, ::step, :3])


def _background(pixels: np.ndarray, bins: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """RGB float32 ``[3]``: the mean of ``pixels`` ``[N, 3]`` in the most populated 16-level colour bin (``bins``
    ``[N]``, see :func:`_colour_bins`) among ``candidates`` (bool ``[N]``; every pixel when none is a candidate)."""
    if not candidates.any():
        candidates = np.ones_like(candidates)
    most = np.bincount(bins[candidates], minlength=4096).argmax()
    return pixels[candidates & (bins == most)].mean(axis=0)


def _colour_bins(grid: np.ndarray) -> np.ndarray:
    """int ``[N]``: each pixel of uint8 ``grid`` ``[h, w, 3]`` in 16 levels a channel, as ``r << 8 | g << 4 | b``."""
    levels = (grid >> 4).reshape(-1, 3).astype(np.int32)
    return (levels[:, 0] << 8) | (levels[:, 1] << 4) | levels[:, 2]


def _squared_distances(pixels: np.ndarray, norms: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """float32 ``[N, K]``: squared RGB distances of ``pixels`` ``[N, 3]`` (squared norms ``norms`` ``[N, 1]``) to
    ``colours`` ``[K, 3]``."""
    return norms - 2 * pixels @ colours.T + (colours * colours).sum(axis=1)[None]


def _distance_to_lines(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """float32 ``[N]``: each of ``pixels`` ``[N, 3]``'s distance to the nearest segment between two ``palette``
    colours ``[K, 3]``."""
    best = np.full(len(pixels), np.inf, dtype=np.float32)
    for i in range(len(palette)):
        for j in range(i + 1, len(palette)):
            start, direction = palette[i], palette[j] - palette[i]
            t = np.clip((pixels - start) @ direction / float(direction @ direction), 0.0, 1.0)
            best = np.minimum(best, np.linalg.norm(pixels - (start + t[:, None] * direction), axis=1))
    return best


def _near(mask: np.ndarray, reach: int) -> np.ndarray:
    """bool ``[h, w]``: pixels within ``reach`` px (Chebyshev) of a true pixel of ``mask``."""
    grown = mask.copy()
    for _ in range(reach):
        padded = np.pad(grown, 1)
        grown = np.zeros_like(grown)
        for dy in range(3):
            for dx in range(3):
                grown |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return grown


@dataclass(frozen=True)
class WorldFit:
    """How well the shapes world explains an image (shares of its pixels, on the grid of :func:`measure`).

    Attributes:
        unexplained: neither background, nor a shape colour, nor a blend at their edges.
        colour_shares: per shape colour (in ``COLOURS`` order), the share within ``SHAPE_TOLERANCE`` of it.
        solid: of the shape-coloured pixels, the share whose eight neighbours have the same shape colour.
    """

    unexplained: float
    colour_shares: tuple[float, ...]
    solid: float

    def problems(self) -> list[str]:
        """Why the image is not a scene of the world, as clauses for a caller (empty when it looks like one)."""
        found: list[str] = []
        if self.unexplained > MAX_UNEXPLAINED:
            found.append(f"{self.unexplained:.0%} of it is neither one plain background nor a flat shape colour")
        if sum(self.colour_shares) < MIN_SHAPE_SHARE:
            found.append("no part of it has a shape colour (red, green, blue, yellow)")
        small = [
            name
            for name, share in zip(COLOURS, self.colour_shares, strict=True)
            if NOISE_COLOUR_SHARE <= share < MIN_COLOUR_SHARE
        ]
        if small:
            found.append(f"its {' and '.join(small)} parts are smaller than any shape of the world")
        large = [name for name, share in zip(COLOURS, self.colour_shares, strict=True) if share > MAX_COLOUR_SHARE]
        if large:
            found.append(f"{' and '.join(large)} covers more of it than the shapes of the world ever do")
        if sum(self.colour_shares) >= MIN_SHAPE_SHARE and self.solid < MIN_SOLID_SHARE:
            found.append("its coloured parts are thin strokes or specks, not solid shapes")
        return found


def _solid_share(classes: np.ndarray) -> float:
    """Of the pixels of int ``[h, w]`` ``classes`` (shape colour index, -1 for none) that have a shape colour, the
    share whose eight neighbours have the same one (1.0 when none has)."""
    height, width = classes.shape
    padded = np.pad(classes, 1, constant_values=-2)
    solid = classes >= 0
    for dy in range(3):
        for dx in range(3):
            solid &= padded[dy : dy + height, dx : dx + width] == classes
    coloured = int(np.count_nonzero(classes >= 0))
    return float(np.count_nonzero(solid) / coloured) if coloured else 1.0


def measure(image: np.ndarray) -> WorldFit:
    """How well the world explains uint8 RGB ``image`` ``[H, W, 3]`` (see the module docstring)."""
    grid = _grid(image)
    height, width = grid.shape[:2]
    pixels = grid.reshape(-1, 3).astype(np.float32)
    # [N, 1], shared by both distance computations; whole numbers under 2**24, so exact in float32 in any order
    norms = (pixels[:, 0] * pixels[:, 0] + pixels[:, 1] * pixels[:, 1] + pixels[:, 2] * pixels[:, 2])[:, None]
    squared = _squared_distances(pixels, norms, SHAPE_RGB)  # [N, 4]
    nearest = squared.argmin(axis=1)
    shape = np.take_along_axis(squared, nearest[:, None], axis=1)[:, 0] <= SHAPE_TOLERANCE**2
    classes = np.where(shape, nearest, -1)
    background = _background(pixels, _colour_bins(grid), ~shape)
    explained = shape | (_squared_distances(pixels, norms, background[None])[:, 0] <= BACKGROUND_TOLERANCE**2)
    blend_candidates = ~explained & _near(explained.reshape(height, width), BLEND_REACH).reshape(-1)
    if blend_candidates.any():
        palette = np.vstack([background[None], SHAPE_RGB])
        blends = _distance_to_lines(pixels[blend_candidates], palette) <= BLEND_TOLERANCE
        explained[np.flatnonzero(blend_candidates)[blends]] = True
    counts = np.bincount(classes + 1, minlength=len(SHAPE_RGB) + 1)[1:]  # pixels of each shape colour
    return WorldFit(
        unexplained=float(1.0 - np.count_nonzero(explained) / explained.size),
        colour_shares=tuple(float(count / classes.size) for count in counts),
        solid=_solid_share(classes.reshape(height, width)),
    )


def warnings(image: np.ndarray) -> list[str]:
    """Sentences for a caller when uint8 RGB ``image`` ``[H, W, 3]`` does not look like a scene of the world
    (empty when it does)."""
    problems = measure(image).problems()
    if not problems:
        return []
    return [
        f"This image does not look like the demo model's shapes world ({'; '.join(problems)}). The demo model knows "
        "only solid red, green, blue and yellow circles, squares and triangles on one plain background, so the "
        "boxes, masks, `found` and answers of this result are meaningless; serve a NExT-Chat checkpoint "
        "(--model) for other images."
    ]
