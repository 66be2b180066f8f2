"""Overlay pictures a person can read: tinted, outlined masks and boxes labelled with their object ids.

Three things make them readable, whatever the image:

- Labels are set in DejaVu Sans Bold (shipped in ``mcp_server/fonts``; license in THIRD_PARTY_LICENSES), sized to
  the picture, on a tag in the object's colour with black or white text, whichever contrasts more.
- Labels never overlap: each goes to the first free spot next to its box (above, inside, below, at either corner),
  else to the free spot nearest the box with a leader line back to it; when no spot is free the font shrinks.
- Each object's colour is the palette colour that differs most from the pixels it is drawn over (the mask and a ring
  around it, or the box's edge), so a red object is never tinted red. Masks are tinted and outlined in it.

Coordinates: boxes come in original image pixels ``[x1, y1, x2, y2]`` (origin top-left, exclusive max); the picture
is scaled by one factor (down to fit a chat client, up so that small images stay legible) and labels are placed in
the picture's pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


OVERLAY_LONG_EDGE = 1568  # what Claude's vision downsizes to anyway
OVERLAY_MIN_LONG_EDGE = 640  # smaller images are enlarged, so that labels and outlines stay legible
OVERLAY_MAX_BYTES = 300_000
FONT_PATH = Path(__file__).parent / "fonts" / "DejaVuSans-Bold.ttf"
MIN_FONT_PX = 10
TINT_ALPHA = 0.45  # how much of the object's colour a masked pixel takes
SAMPLE_PIXELS = 4096  # pixels a colour is compared with (an even subsample of larger regions)
# Saturated colours far apart from each other; an object gets the one most unlike the pixels it is drawn over.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (255, 225, 25), (0, 0, 128),
)  # fmt: skip

Rect = tuple[float, float, float, float]
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class PlacedLabel:
    """A label as drawn: its text, its tag's rectangle ``(x1, y1, x2, y2)`` in the picture's pixels, its colour."""

    text: str
    rect: Rect
    colour: Colour


@dataclass(frozen=True)
class Overlay:
    """An overlay picture and where its labels went (no two label rectangles intersect)."""

    picture: Image.Image
    labels: list[PlacedLabel]


@cache
def label_font(size: int) -> ImageFont.FreeTypeFont:
    """The labels' TrueType font at ``size`` pixels."""
    return ImageFont.truetype(str(FONT_PATH), size)


def colour_distance(colours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Approximate perceptual distance ("redmean" weighted RGB) between ``colours`` ``[N, 3]`` and ``reference``
    ``[3]`` or ``[N, 3]``, both 0–255; returns ``[N]`` (0 for equal colours, about 765 for black against white)."""
    a, b = colours.astype(np.float64), np.broadcast_to(np.asarray(reference, dtype=np.float64), colours.shape)
    red_mean = (a[:, 0] + b[:, 0]) / 2
    d = a - b
    return np.sqrt((2 + red_mean / 256) * d[:, 0] ** 2 + 4 * d[:, 1] ** 2 + (2 + (255 - red_mean) / 256) * d[:, 2] ** 2)


def contrasting_colour(under: np.ndarray, taken: Sequence[Colour] = ()) -> Colour:
    """The palette colour most unlike the pixels ``under`` (RGB ``[N, 3]``) and unlike the colours ``taken``.

    A colour's score is the distance below which a fifth of the pixels lie (so a two-tone region counts both tones),
    capped by its distance to the nearest taken colour (so neighbouring objects differ too).
    """
    pixels = under.reshape(-1, 3)
    if len(pixels) > SAMPLE_PIXELS:
        pixels = pixels[:: len(pixels) // SAMPLE_PIXELS]
    palette = np.asarray(PALETTE, dtype=np.float64)
    if len(pixels):
        scores = np.array([np.percentile(colour_distance(pixels, colour), 20) for colour in palette])
    else:
        scores = np.full(len(palette), 765.0)
    for colour in taken:
        scores = np.minimum(scores, colour_distance(palette, np.asarray(colour)))
    return PALETTE[int(np.argmax(scores))]


def text_colour(background: Colour) -> Colour:
    """Black or white, whichever reads better on ``background`` (by relative luminance)."""
    r, g, b = background
    return (0, 0, 0) if 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 else (255, 255, 255)


def _intersects(rects: np.ndarray, placed: np.ndarray) -> np.ndarray:
    """For candidate rectangles ``[N, 4]``, whether each intersects any of ``placed`` ``[M, 4]``: ``[N]`` bool."""
    if not len(placed):
        return np.zeros(len(rects), dtype=bool)
    x1, y1, x2, y2 = (rects[:, None, i] for i in range(4))
    overlaps: np.ndarray = (x1 < placed[:, 2]) & (x2 > placed[:, 0]) & (y1 < placed[:, 3]) & (y2 > placed[:, 1])
    return np.asarray(overlaps.any(axis=1), dtype=bool)


def _candidates(box: Rect, size: tuple[float, float], canvas: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Places a tag of ``size`` may go for ``box``, best first: the spots next to the box, then a grid over the
    whole canvas ordered by distance to the box's top-left corner. Returns ``[N, 4]`` rects and how many of them
    are next to the box."""
    (x1, y1, x2, y2), (w, h), (width, height) = box, size, canvas
    near = [(x1, y1 - h), (x1, y1), (x2 - w, y1 - h), (x1, y2), (x2 - w, y2), (x2 - w, y1), (x1, y2 - h),
            (x2 - w, y2 - h), (x2, y1), (x1 - w, y1)]  # fmt: skip
    step = max(2.0, h / 3)
    xs, ys = np.meshgrid(np.arange(0, max(1.0, width - w + 1), step), np.arange(0, max(1.0, height - h + 1), step))
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
    grid = grid[np.argsort(np.hypot(grid[:, 0] - x1, grid[:, 1] - (y1 - h)), kind="stable")]
    corners = np.concatenate([np.asarray(near), grid])
    corners[:, 0] = corners[:, 0].clip(0, max(0.0, width - w))
    corners[:, 1] = corners[:, 1].clip(0, max(0.0, height - h))
    return np.concatenate([corners, corners + np.array([w, h])], axis=1), len(near)


def layout_labels(
    boxes: Sequence[Rect],
    sizes: Sequence[tuple[float, float]],
    canvas: tuple[int, int],
    gap: float = 1.0,
    crowded_ok: bool = False,
) -> list[tuple[Rect, bool]] | None:
    """A tag rectangle for each box, none intersecting another (``gap`` pixels apart), all inside ``canvas``
    ``(width, height)``; each with whether it sits next to its box.

    When some tag finds no free spot: ``None``, or with ``crowded_ok`` that tag at its first spot next to its box
    (overlapping; only for pictures too small for their labels at the smallest font).
    """
    placed: list[Rect] = []
    out: list[tuple[Rect, bool]] = []
    for box, size in zip(boxes, sizes, strict=True):
        rects, near = _candidates(box, size, canvas)
        fits = (rects[:, 2] <= canvas[0] + 1e-6) & (rects[:, 3] <= canvas[1] + 1e-6)
        grown = np.asarray(placed, dtype=np.float64).reshape(-1, 4) + np.array([-gap, -gap, gap, gap])
        free = np.flatnonzero(fits & ~_intersects(rects, grown))
        if not free.size:
            if not crowded_ok:
                return None
            free = np.zeros(1, dtype=np.int64)
        x1, y1, x2, y2 = (float(v) for v in rects[free[0]])
        placed.append((x1, y1, x2, y2))
        out.append(((x1, y1, x2, y2), bool(free[0] < near)))
    return out


def _tag_sizes(labels: Sequence[str], font: ImageFont.FreeTypeFont, pad: int) -> list[tuple[float, float]]:
    sizes: list[tuple[float, float]] = []
    for label in labels:
        left, top, right, bottom = font.getbbox(label)
        sizes.append((right - left + 2 * pad, bottom - top + 2 * pad))
    return sizes


def _dilate(mask: np.ndarray, width: int) -> np.ndarray:
    """A bool ``[H, W]`` mask grown by ``width`` pixels (4-neighbour steps; numpy shifts, no rank filter)."""
    out = mask.copy()
    for _ in range(width):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The inner rim ``width`` pixels wide of a bool ``[H, W]`` mask."""
    return mask & _dilate(~mask, width)


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels up to ``width`` outside a bool ``[H, W]`` mask, where its outline meets the background."""
    return _dilate(mask, width) & ~mask


def _box_edge(pixels: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The pixels along a box's four edges (``[N, 3]``), which its outline is drawn over."""
    height, width = pixels.shape[:2]
    x1, x2 = (int(np.clip(round(v), 0, width - 1)) for v in (box[0], box[2] - 1))
    y1, y2 = (int(np.clip(round(v), 0, height - 1)) for v in (box[1], box[3] - 1))
    return np.concatenate([pixels[y1, x1 : x2 + 1], pixels[y2, x1 : x2 + 1], pixels[y1 : y2 + 1, x1],
                           pixels[y1 : y2 + 1, x2]])  # fmt: skip


def _object_colours(
    pixels: np.ndarray, boxes: Sequence[tuple[str, Sequence[float]]], masks: Sequence[np.ndarray]
) -> list[Colour]:
    """One colour per object (masks first, then boxes without a mask; box ``i`` belongs with mask ``i``)."""
    colours: list[Colour] = []
    ring_px = max(2, round(max(pixels.shape[:2]) / 100))
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not rows.size:
            colours.append(contrasting_colour(pixels[:0], colours))
            continue
        # Only the mask's box, widened by the ring, matters: cropping keeps large images cheap.
        top, left = max(0, rows[0] - ring_px), max(0, cols[0] - ring_px)
        crop = (slice(top, rows[-1] + ring_px + 1), slice(left, cols[-1] + ring_px + 1))
        region, inside = pixels[crop], mask[crop]
        under = np.concatenate([region[inside], region[_ring(inside, ring_px)]])
        colours.append(contrasting_colour(under, colours))
    for _, box in boxes[len(masks) :]:
        colours.append(contrasting_colour(_box_edge(pixels, box), colours))
    return colours


def _scaled(pixels: np.ndarray) -> tuple[Image.Image, float]:
    picture = Image.fromarray(pixels)
    long_edge = max(picture.size)
    scale = min(OVERLAY_LONG_EDGE / long_edge, max(1.0, OVERLAY_MIN_LONG_EDGE / long_edge))
    if scale != 1.0:
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    return picture, scale


def _tint(picture: Image.Image, masks: Sequence[np.ndarray], colours: Sequence[Colour], line: int) -> Image.Image:
    image = np.asarray(picture, dtype=np.float32).copy()
    for mask, colour in zip(masks, colours, strict=False):
        scaled = Image.fromarray(mask.astype(np.uint8) * 255).resize(picture.size, Image.Resampling.NEAREST)
        inside = np.asarray(scaled) > 0
        image[inside] = (1 - TINT_ALPHA) * image[inside] + TINT_ALPHA * np.asarray(colour, dtype=np.float32)
        image[_outline(inside, line)] = colour
    return Image.fromarray(image.clip(0, 255).astype(np.uint8))


def _labels(
    boxes: Sequence[Rect], texts: Sequence[str], size: tuple[int, int]
) -> tuple[list[tuple[Rect, bool]], ImageFont.FreeTypeFont, int]:
    """Tags for every label, at the largest font size (from one scaled to the picture) at which they all fit."""
    font_px = max(MIN_FONT_PX + 4, round(max(size) / 32))
    while True:
        font, pad = label_font(font_px), max(2, font_px // 5)
        smallest = font_px <= MIN_FONT_PX
        layout = layout_labels(boxes, _tag_sizes(texts, font, pad), size, crowded_ok=smallest)
        if layout is not None:
            return layout, font, pad
        font_px = max(MIN_FONT_PX, font_px * 3 // 4)


def draw_overlay(
    pixels: np.ndarray,
    boxes: Sequence[tuple[str, Sequence[float]]] = (),
    masks: Sequence[np.ndarray] = (),
) -> Overlay:
    """The image with tinted, outlined masks and labelled boxes.

    Args:
        pixels: RGB uint8 ``[H, W, 3]``.
        boxes: ``(label, [x1, y1, x2, y2])`` in original pixels; the label (the object id) is drawn by the box. Box
            ``i`` and mask ``i`` are the same object and share a colour.
        masks: bool ``[H, W]`` masks.

    Returns:
        The picture (scaled to :data:`OVERLAY_MIN_LONG_EDGE`–:data:`OVERLAY_LONG_EDGE` on its long edge) and its
        labels' rectangles in the picture's pixels.
    """
    colours = _object_colours(pixels, boxes, masks)
    picture, scale = _scaled(pixels)
    line = max(2, round(max(picture.size) / 320))
    picture = _tint(picture, masks, colours, line)
    draw = ImageDraw.Draw(picture)
    scaled = [tuple(float(v) * scale for v in box) for _, box in boxes]
    rects: list[Rect] = [(r[0], r[1], r[2], r[3]) for r in scaled]
    for rect, colour in zip(rects, colours, strict=False):
        draw.rectangle(rect, outline=colour, width=line)
    layout, font, pad = _labels(rects, [label for label, _ in boxes], picture.size)
    placed: list[PlacedLabel] = []
    for (label, _), box, colour, (tag, near) in zip(boxes, rects, colours, layout, strict=False):
        if not near:  # a leader line from the tag to its box's nearest corner
            corner = (min(max(tag[0], box[0]), box[2]), min(max(tag[1], box[1]), box[3]))
            draw.line([((tag[0] + tag[2]) / 2, (tag[1] + tag[3]) / 2), corner], fill=colour, width=max(1, line // 2))
        draw.rectangle(tag, fill=colour, outline=text_colour(colour))
        left, top, _, _ = font.getbbox(label)
        draw.text((tag[0] + pad - left, tag[1] + pad - top), label, fill=text_colour(colour), font=font)
        placed.append(PlacedLabel(label, tag, colour))
    return Overlay(picture, placed)


def overlay_jpeg(
    pixels: np.ndarray,
    boxes: Sequence[tuple[str, Sequence[float]]] = (),
    masks: Sequence[np.ndarray] = (),
) -> bytes:
    """:func:`draw_overlay` as JPEG bytes under :data:`OVERLAY_MAX_BYTES` (quality lowered until they fit)."""
    picture = draw_overlay(pixels, boxes, masks).picture
    for quality in (88, 75, 60, 45, 30):
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=quality)
        if buffer.tell() <= OVERLAY_MAX_BYTES:
            break
    return buffer.getvalue()
