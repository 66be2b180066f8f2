"""A mask for a caller's box kept to that box: only the connected parts that overlap it, within a stated margin.

SAM prompted with a box over background may answer with a nearby object's mask, outside the box the caller gave;
an agent would take it for what is inside the box. So a box-prompted mask keeps only its 8-connected components
that have a pixel (centre) inside the box, and no pixel whose centre is farther than :func:`margin_px` outside it
(an object that the box cuts through keeps the part just past the box edge, up to the margin). Masks are bool
``[H, W]`` on the original image; boxes are pixel ``[x1, y1, x2, y2]``, exclusive max, origin top-left. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np


MARGIN_FRACTION = 0.1  # of the box's longer side
MIN_MARGIN_PX = 4

MARGIN_RULE = "10 % of the box's longer side, at least 4 px"


def margin_px(box: Sequence[float]) -> int:
    """How far (in pixels) a box-prompted mask may reach past the box on each side."""
    return max(MIN_MARGIN_PX, math.ceil(MARGIN_FRACTION * max(box[2] - box[0], box[3] - box[1])))


def pixel_window(box: Sequence[float], margin: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel columns and rows ``(col0, row0, col1, row1)`` (exclusive ends) whose centres lie in the box grown
    by ``margin``, clipped to a ``width`` × ``height`` image (pixel ``c`` spans ``[c, c + 1)``, centre ``c + 0.5``)."""
    return (
        max(0, math.ceil(box[0] - margin - 0.5)),
        max(0, math.ceil(box[1] - margin - 0.5)),
        min(width, math.floor(box[2] + margin - 0.5) + 1),
        min(height, math.floor(box[3] + margin - 0.5) + 1),
    )


def keep_in_box(mask: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The part of bool ``[H, W]`` ``mask`` that belongs to ``box``: the 8-connected components (within the box
    grown by :func:`margin_px`) that have a pixel inside the box; a new bool ``[H, W]`` array."""
    height, width = mask.shape
    c0, r0, c1, r1 = pixel_window(box, margin_px(box), width, height)
    kept = np.zeros_like(mask, dtype=bool)
    window = mask[r0:r1, c0:c1]
    if not window.any():
        return kept
    inside = np.zeros_like(window)
    b0, b1, b2, b3 = pixel_window(box, 0, width, height)
    inside[b1 - r0 : b3 - r0, b0 - c0 : b2 - c0] = True
    kept[r0:r1, c0:c1] = components_touching(window, window & inside)
    return kept


def components_touching(region: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The pixels of bool ``[h, w]`` ``region`` whose 8-connected component contains a pixel of ``seeds``.

    Labels horizontal runs and joins runs of adjacent rows that touch (a union-find over runs, so the Python loop is
    over runs, not pixels).
    """
    height, width = region.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = region
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)
    _, ends = np.nonzero(steps == -1)  # row-major order pairs each end with its start; ends are exclusive
    parent = list(range(rows.size))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = cast("list[int]", np.searchsorted(rows, np.arange(height + 1)).tolist())  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]
    start_list: list[int] = starts.tolist()
    end_list: list[int] = ends.tolist()
    for row in range(1, height):
        above, here = first[row - 1], first[row]
        stop_above, stop_here = here, first[row + 1]
        while above < stop_above and here < stop_here:
            # Runs [s, e) in adjacent rows touch, diagonals included, when s <= e' and s' <= e.
            if start_list[above] <= end_list[here] and start_list[here] <= end_list[above]:
                parent[root(above)] = root(here)
            if end_list[above] < end_list[here]:
                above += 1
            else:
                here += 1
    seed_sums = np.zeros((height, width + 1), dtype=np.int64)
    np.cumsum(seeds, axis=1, out=seed_sums[:, 1:])
    seeded = seed_sums[rows, ends] > seed_sums[rows, starts]
    seeded_runs: list[int] = np.flatnonzero(seeded).tolist()
    wanted = {root(i) for i in seeded_runs}
    keep = np.array([root(i) in wanted for i in range(rows.size)], dtype=bool)
    out = np.zeros((height, width + 1), dtype=np.int32)
    np.add.at(out, (rows[keep], starts[keep]), 1)
    np.add.at(out, (rows[keep], ends[keep]), -1)
    return np.cumsum(out, axis=1)[:, :width] > 0
