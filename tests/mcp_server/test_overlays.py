"""Overlay pictures a person can read: TrueType labels sized to the picture, label tags that never overlap (computed on
scenes with overlapping objects), and mask tints that differ from the pixels they cover."""

import itertools

import numpy as np
import pytest
from PIL import ImageFont

from mcp_server.overlays import (
    FONT_PATH,
    OVERLAY_LONG_EDGE,
    OVERLAY_MIN_LONG_EDGE,
    PALETTE,
    Overlay,
    colour_distance,
    contrasting_colour,
    draw_overlay,
    label_font,
)
from nextchat.demo.world import COLOURS, render_scene


def intersect(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def assert_labels_apart_and_inside(overlay: Overlay) -> None:
    width, height = overlay.picture.size
    for label in overlay.labels:
        x1, y1, x2, y2 = label.rect
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, label
    for a, b in itertools.combinations(overlay.labels, 2):
        assert not intersect(a.rect, b.rect), (a, b)


def crowded_boxes(boxes: list[tuple[float, float, float, float]], rng: np.random.Generator) -> list[list[float]]:
    """Each box, plus copies of it shifted by a few pixels, shrunk inside it and the same box again: labels placed
    naively at each box's corner would all land on each other."""
    out: list[list[float]] = []
    for x1, y1, x2, y2 in boxes:
        dx, dy = rng.integers(-4, 5, size=2)
        shifted, shrunk = [x1 + dx, y1 + dy, x2 + dx, y2 + dy], [x1 + 5, y1 + 5, x2 - 5, y2 - 5]
        out += [[x1, y1, x2, y2], shifted, shrunk, [x1, y1, x2, y2]]
    return out


def test_labels_of_overlapping_boxes_never_intersect_on_shapes_scenes() -> None:
    rng = np.random.default_rng(1604)
    for _ in range(40):
        scene = render_scene(rng, min_objects=2, max_objects=4)
        boxes = crowded_boxes([o.box for o in scene.objects], rng)
        masks = [o.mask for o in scene.objects[:2]]
        overlay = draw_overlay(scene.image, [(f"o{i + 1}", box) for i, box in enumerate(boxes)], masks)
        assert [label.text for label in overlay.labels] == [f"o{i + 1}" for i in range(len(boxes))]
        assert_labels_apart_and_inside(overlay)


@pytest.mark.parametrize(("width", "height"), [(160, 160), (640, 90), (90, 640), (3000, 2000)])
def test_fifty_labels_on_one_box_all_find_room(width: int, height: int) -> None:
    pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    box = [width * 0.4, height * 0.4, width * 0.6, height * 0.6]
    overlay = draw_overlay(pixels, [(f"o{i + 1}", box) for i in range(50)])
    assert len(overlay.labels) == 50
    assert_labels_apart_and_inside(overlay)


def test_labels_are_set_in_the_shipped_truetype_font_scaled_to_the_picture() -> None:
    assert FONT_PATH.is_file() and FONT_PATH.name == "DejaVuSans-Bold.ttf"
    font = label_font(20)
    assert isinstance(font, ImageFont.FreeTypeFont) and font.getname() == ("DejaVu Sans", "Bold")
    heights = {}
    for side in (160, 640, 1200, 4000):
        pixels = np.full((side, side, 3), 200, dtype=np.uint8)
        overlay = draw_overlay(pixels, [("o1", [side / 4, side / 4, side / 2, side / 2])])
        assert OVERLAY_MIN_LONG_EDGE <= max(overlay.picture.size) <= OVERLAY_LONG_EDGE
        (label,) = overlay.labels
        heights[side] = label.rect[3] - label.rect[1]
        x1, y1, x2, y2 = (round(v) for v in label.rect)
        tag = np.asarray(overlay.picture)[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].reshape(-1, 3)
        text_pixels = (colour_distance(tag, np.asarray(label.colour)) > 200).mean()
        assert 0.05 < text_pixels < 0.6, "the tag carries legible text in a contrasting colour"
    # Small images are enlarged, so their labels are as large as a 640-pixel picture's; large ones get larger labels.
    assert heights[160] == heights[640] >= 18
    assert heights[4000] > heights[1200] > heights[640]


@pytest.mark.parametrize("name", [*COLOURS, "white", "black", "grey"])
def test_a_mask_is_tinted_and_outlined_in_a_colour_unlike_the_object(name: str) -> None:
    rgb = COLOURS.get(name) or {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}[name]
    pixels = np.full((320, 320, 3), (90, 120, 110), dtype=np.uint8)
    rows, cols = np.indices((320, 320))
    mask = (rows - 160) ** 2 + (cols - 150) ** 2 < 80**2
    pixels[mask] = rgb
    overlay = draw_overlay(pixels, [("o1", [70, 80, 231, 241])], [mask])
    chosen = np.asarray(overlay.labels[0].colour)
    assert colour_distance(chosen[None], np.asarray(rgb))[0] > 250, f"{name} object got {tuple(chosen)}"
    picture = np.asarray(overlay.picture).astype(np.int32)  # 640 x 640: twice the image
    inside = picture[300:340, 280:320].reshape(-1, 3)  # well inside the disc
    assert colour_distance(inside.mean(axis=0)[None], np.asarray(rgb))[0] > 100, "the tint shows on the object"
    # Along the disc's upper-left diagonal (image (93, 103) → picture (187, 207)), away from the box's edges: the
    # outline in the object's colour, then the tint.
    diagonal = np.array([picture[207 + k, 187 + k] for k in range(-6, 7)])
    assert (colour_distance(diagonal, chosen) < 40).any(), "the mask is outlined in its colour"


def test_two_masks_of_one_colour_get_two_colours_and_their_boxes_match_them() -> None:
    pixels = np.full((200, 300, 3), 240, dtype=np.uint8)
    left, right = np.zeros((200, 300), dtype=bool), np.zeros((200, 300), dtype=bool)
    left[50:150, 20:120], right[50:150, 180:280] = True, True
    pixels[left | right] = COLOURS["red"]
    overlay = draw_overlay(pixels, [("o1", [20, 50, 120, 150]), ("o2", [180, 50, 280, 150])], [left, right])
    first, second = (label.colour for label in overlay.labels)
    assert first != second and first in PALETTE and second in PALETTE


def test_the_colour_choice_scores_most_pixels_not_only_their_mean() -> None:
    # Half red, half cyan: the mean is grey-ish, but neither red nor cyan can tint it visibly.
    half = np.array([COLOURS["red"]] * 50 + [(70, 240, 240)] * 50)
    chosen = contrasting_colour(half)
    assert chosen not in ((230, 25, 75), (70, 240, 240))
    assert contrasting_colour(np.zeros((0, 3))) in PALETTE  # an empty mask still gets a colour
