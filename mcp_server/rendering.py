"""Masks as bytes and text: mask PNGs (0/255) and COCO RLE (numpy + Pillow only). Overlay pictures: overlays.py."""

from __future__ import annotations

import io
from typing import TypedDict

import numpy as np
from PIL import Image


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
