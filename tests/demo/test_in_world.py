"""The demo world check flags procedural non-shapes images and passes held-out shapes scenes.

Calibration: the threshold (MIN_EXPLAINED) was set between the lowest explained share on 500 held-out scenes and the
highest on the non-shapes images; this test prints both so a change to either side shows.
"""

import numpy as np
from non_shapes import non_shapes_images

from nextchat.demo.evaluate import held_out_scenes
from nextchat.demo.in_world import MIN_EXPLAINED, explained_fraction, out_of_world_warning


def test_non_shapes_images_are_flagged() -> None:
    images = non_shapes_images(60)
    shares = [explained_fraction(image) for image in images]
    flagged = sum(out_of_world_warning(image) is not None for image in images)
    print(f"non-shapes: flagged {flagged}/{len(images)}, explained shares {sorted(round(s, 3) for s in shares)[-5:]}")
    assert flagged >= 0.95 * len(images)


def test_held_out_scenes_are_not_flagged() -> None:
    scenes = held_out_scenes(500, seed=16)
    shares = [explained_fraction(np.asarray(scene.image)) for scene in scenes]
    flagged = sum(share < MIN_EXPLAINED for share in shares)
    print(f"held-out scenes: flagged {flagged}/{len(scenes)}, lowest explained share {min(shares):.3f}")
    assert flagged <= 0.01 * len(scenes)
