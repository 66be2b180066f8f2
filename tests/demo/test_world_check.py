"""The demo model's world check (``nextchat.demo.world_check``): it flags the procedural non-shapes images and
passes held-out scenes of the world, also after a JPEG or a resize.

Calibration figures (printed with ``-s``; recorded in ``nextchat/demo/README.md``): the share of each image the world
leaves unexplained, the smallest colour share and the smallest solid share, on both sides of the thresholds.
"""

import io

import numpy as np
import pytest
from non_shapes import KINDS, non_shapes_images
from PIL import Image

from nextchat.demo import world_check
from nextchat.demo.evaluate import held_out_scenes
from nextchat.demo.world import COLOURS, SHAPES


def flagged_share(images: list[np.ndarray]) -> float:
    return sum(bool(world_check.warnings(image)) for image in images) / len(images)


def test_non_shapes_images_of_every_kind_are_flagged() -> None:
    images = non_shapes_images(60, seed=1)
    by_kind = {kind.__name__: [image for name, image in images if name == kind.__name__] for kind in KINDS}
    shares = {kind: flagged_share(group) for kind, group in by_kind.items()}
    lowest = sorted(world_check.measure(image).unexplained for _, image in images)[:3]
    print(f"non-shapes flagged by kind {shares}; lowest unexplained shares {[round(v, 3) for v in lowest]}")
    assert flagged_share([image for _, image in images]) >= 0.95
    assert min(shares.values()) >= 0.8, shares


def scenes_fit(count: int) -> None:
    scenes = held_out_scenes(count, seed=16)
    fits = [world_check.measure(scene.image) for scene in scenes]
    flagged = sum(bool(fit.problems()) for fit in fits)
    smallest_colour = min(min(share for share in fit.colour_shares if share > 0) for fit in fits)
    print(
        f"held-out scenes: {flagged}/{count} flagged; most unexplained {max(f.unexplained for f in fits):.4f}, "
        f"smallest colour share {smallest_colour:.4f}, smallest solid share {min(f.solid for f in fits):.3f}"
    )
    assert flagged <= 0.01 * count


def test_held_out_scenes_are_not_flagged() -> None:
    scenes_fit(100)


@pytest.mark.slow
def test_500_held_out_scenes_are_not_flagged() -> None:
    scenes_fit(500)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def resized(image: np.ndarray, scale: float) -> np.ndarray:
    picture = Image.fromarray(image)
    size = (round(picture.width * scale), round(picture.height * scale))
    return np.asarray(picture.resize(size, Image.Resampling.BILINEAR))


@pytest.mark.parametrize(
    "change", [lambda i: jpeg(i, 75), lambda i: jpeg(i, 50), lambda i: resized(i, 0.6), lambda i: resized(i, 1.7)]
)
def test_scenes_stay_in_the_world_after_a_jpeg_or_a_resize(change) -> None:
    scenes = held_out_scenes(30, seed=17)
    assert flagged_share([change(scene.image) for scene in scenes]) <= 1 / 30


def test_the_hard_cases_each_rule_is_for() -> None:
    blank = np.full((200, 300, 3), 128, np.uint8)
    page = np.full((400, 600, 3), 255, np.uint8)
    page[380:392, 560:590] = COLOURS["blue"]  # a small blue button: far smaller than any shape of the world
    strokes = np.full((300, 300, 3), 255, np.uint8)
    for offset in range(20, 280, 12):  # thin red pen strokes on white paper
        strokes[offset : offset + 2, 20:280] = COLOURS["red"]
    ramp = np.linspace(40, 220, 300, dtype=np.float32)[None, :, None]
    shaded = np.broadcast_to(ramp, (200, 300, 3)).astype(np.uint8).copy()  # a grey gradient behind a solid shape
    shaded[60:140, 100:180] = COLOURS["green"]
    wall = np.full((200, 300, 3), COLOURS["yellow"], np.uint8)  # a yellow wall: no scene is mostly one shape colour
    expected = {
        "no part of it": blank,
        "smaller than any shape": page,
        "thin strokes": strokes,
        "neither one plain background": shaded,
        "covers more of it": wall,
    }
    for clause, image in expected.items():
        problems = world_check.measure(image).problems()
        assert any(clause in problem for problem in problems), (clause, problems)
        assert "does not look like the demo model's shapes world" in world_check.warnings(image)[0]


def test_the_scope_names_the_world_it_checks() -> None:
    assert all(name in world_check.SCOPE for name in (*SHAPES, *COLOURS))
