"""Masks and overlays as bytes: mask PNGs (0/255), COCO RLE, and numbered overlay pictures (numpy + Pillow only)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TypedDict

import numpy as np
from PIL import Image, ImageDraw, ImageFont


OVERLAY_LONG_EDGE = 1568  # what Claude's vision downsizes to anyway
OVERLAY_MAX_BYTES = 300_000
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]  # fmt: skip


def mask_png(mask: np.ndarray) -> bytes:
    """bool ``[H, W]`` → single-channel PNG, 0 outside and 255 inside."""
    buffer = io.BytesIO()
    # zlib at its default level: optimize=True took 1.8 ms a 336 px mask on the event loop for 25 % fewer bytes.
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


class CocoRleDict(TypedDict):
    """COCO compressed RLE: ``size`` is ``[H, W]``; ``counts`` the column-major run lengths, LEB128-like in ASCII."""

    size: list[int]
    counts: str


def coco_rle(mask: np.ndarray) -> CocoRleDict:
    """bool ``[H, W]`` → COCO compressed RLE ``{"size": [H, W], "counts": str}`` (pycocotools' format)."""
    flat = np.asfortranarray(mask).ravel(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs: list[int] = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:  # counts always start with a run of zeros
        runs = [0, *runs]
    chars: list[str] = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(chars)}


def decode_coco_rle(rle: CocoRleDict) -> np.ndarray:
    """Inverse of :func:`coco_rle` (for tests and scripted clients without pycocotools)."""
    height, width = rle["size"]
    counts: list[int] = []
    text = str(rle["counts"])
    p = 0
    while p < len(text):
        x = k = 0
        more = True
        while more:
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    flat = np.zeros(int(height) * int(width), dtype=bool)
    position, value = 0, False
    for run in counts:
        flat[position : position + run] = value
        position += run
        value = not value
    return flat.reshape((int(width), int(height))).T


def overlay_image(
    pixels: np.ndarray,
    boxes: Sequence[tuple[str, Sequence[float]]] = (),
    masks: Sequence[np.ndarray] = (),
) -> bytes:
    """A picture of the image with tinted masks and numbered boxes, small enough for a chat client.

    Args:
        pixels: RGB uint8 ``[H, W, 3]``.
        boxes: ``(label, [x1, y1, x2, y2])`` in original pixels; the label is drawn at the box (the object id).
        masks: bool ``[H, W]`` masks to tint.

    Returns:
        JPEG bytes under :data:`OVERLAY_MAX_BYTES` (quality lowered until they fit).
    """
    image = pixels.astype(np.float32)
    for i, mask in enumerate(masks):
        colour = np.asarray(PALETTE[i % len(PALETTE)], dtype=np.float32)
        image[mask] = 0.55 * image[mask] + 0.45 * colour
    picture = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    scale = min(1.0, OVERLAY_LONG_EDGE / max(picture.size))
    if scale < 1.0:
        picture = picture.resize(
            (round(picture.width * scale), round(picture.height * scale)), Image.Resampling.LANCZOS
        )
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(12, round(max(picture.size) / 40)))
    width = max(2, round(max(picture.size) / 300))
    for i, (label, box) in enumerate(boxes):
        colour = PALETTE[i % len(PALETTE)]
        x1, y1, x2, y2 = (v * scale for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((x1, y1), label, font=font)
        tag_top = max(0.0, y1 - (bottom - top) - 2 * width)
        draw.rectangle(
            (x1, tag_top, x1 + (right - left) + 2 * width, tag_top + (bottom - top) + 2 * width), fill=colour
        )
        draw.text((x1 + width, tag_top + width - (top - y1)), label, fill=(255, 255, 255), font=font)
    for quality in (88, 75, 60, 45, 30):
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=quality)
        if buffer.tell() <= OVERLAY_MAX_BYTES:
            break
    return buffer.getvalue()
