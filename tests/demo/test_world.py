"""Tests for the synthetic shapes world (nextchat.demo.world)."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from nextchat.demo import world
from nextchat.demo.world import (
    COLOURS,
    SHAPES,
    TASKS,
    Scene,
    ShapeObject,
    make_sample,
    render_scene,
    sample_tasks,
    shape_template,
)


N_SCENES = 200
BOX = re.escape("<at> <boxes>")
COLOUR_RE = "(?:" + "|".join(COLOURS) + ")"
SHAPE_RE = "(?:" + "|".join(SHAPES) + ")"
NAME_RE = f"{COLOUR_RE} {SHAPE_RE}"
FORMATS = {
    "locate": (f"Where is the ({NAME_RE}) in the image\\?", f"Answer: {BOX} \\."),
    "locate_all": (
        f"Where are all the (?:({SHAPE_RE})s|({COLOUR_RE}) shapes) in the image\\?",
        f"Answer: {BOX}(?: {BOX})* \\.",
    ),
    "describe": (f"Can you describe {BOX}\\?", f"A ({NAME_RE}) \\."),
    "count": ("How many shapes are there\\?", "The answer is ([1-4]) \\."),
    "colour": (f"What colour is the ({SHAPE_RE})\\?", f"The answer is ({COLOUR_RE}) \\."),
    "shape": (f"What shape is the ({COLOUR_RE}) object\\?", f"The answer is ({SHAPE_RE}) \\."),
    "exists": (f"Is there a ({NAME_RE})\\?", "The answer is (yes|no) \\."),
    "grounded": (
        "What shapes are in the image\\? Please mention related object locations\\.",
        f"There (?:is a {NAME_RE} {BOX}|are a {NAME_RE} {BOX}(?: , a {NAME_RE} {BOX})* and a {NAME_RE} {BOX}) \\.",
    ),
}


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(1234)
    return [render_scene(rng) for _ in range(N_SCENES)]


def full_mask(obj: ShapeObject, height: int, width: int) -> np.ndarray:
    """Unoccluded mask of ``obj``, re-rendered from its bounding square."""
    assert obj.square is not None
    x0, y0, x1, y1 = (int(v) for v in obj.square)
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = shape_template(obj.shape, x1 - x0)
    return mask


def tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def test_image_size_and_aspect(scenes: list[Scene]) -> None:
    for scene in scenes:
        assert scene.image.dtype == np.uint8
        assert scene.image.shape == (scene.height, scene.width, 3)
        assert 160 <= scene.width <= 640
        assert 160 <= scene.height <= 640
        assert max(scene.width, scene.height) <= 2 * min(scene.width, scene.height)


def test_object_counts(scenes: list[Scene]) -> None:
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3, 4}


def test_min_max_objects_respected() -> None:
    rng = np.random.default_rng(7)
    for _ in range(30):
        assert len(render_scene(rng, min_objects=4, max_objects=4).objects) == 4
    with pytest.raises(ValueError):
        render_scene(rng, min_objects=3, max_objects=2)


def test_object_size_rule(scenes: list[Scene]) -> None:
    for scene in scenes:
        short = min(scene.width, scene.height)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.square
            assert x1 - x0 == y1 - y0
            assert 0.15 * short <= x1 - x0 <= 0.40 * short
            assert x0 >= 0
            assert y0 >= 0
            assert x1 <= scene.width
            assert y1 <= scene.height


def test_shape_template_fills_its_square() -> None:
    for side in (24, 25, 64, 101, 256):
        for shape in SHAPES:
            assert tight_box(shape_template(shape, side)) == (0.0, 0.0, float(side), float(side))


def test_masks_visible_and_occlusion_exact(scenes: list[Scene]) -> None:
    for scene in scenes:
        fulls = [full_mask(o, scene.height, scene.width) for o in scene.objects]
        for i, obj in enumerate(scene.objects):
            assert obj.mask.dtype == bool
            assert obj.mask.shape == (scene.height, scene.width)
            later = np.zeros_like(obj.mask)
            for f in fulls[i + 1 :]:
                later |= f
            np.testing.assert_array_equal(obj.mask, fulls[i] & ~later)
            assert obj.mask.sum() >= 0.75 * fulls[i].sum() > 0


def test_box_is_tight_box_of_mask(scenes: list[Scene]) -> None:
    for scene in scenes:
        for obj in scene.objects:
            assert obj.box == tight_box(obj.mask)
            assert all(isinstance(v, float) for v in obj.box)


def test_masks_disjoint(scenes: list[Scene]) -> None:
    for scene in scenes:
        total = sum(o.mask.astype(np.int32) for o in scene.objects)
        assert total.max() == 1


def test_pixel_colours(scenes: list[Scene]) -> None:
    base = np.array(list(COLOURS.values()), dtype=np.float64)
    noisy = 0
    for scene in scenes:
        covered = np.zeros((scene.height, scene.width), dtype=bool)
        for obj in scene.objects:
            pixels = scene.image[obj.mask].astype(np.int32)
            assert (pixels == pixels[0]).all(), "objects are flat-coloured"
            assert np.abs(pixels[0] - np.array(COLOURS[obj.colour])).max() <= 15
            covered |= obj.mask
        channels = [scene.image[..., c][~covered] for c in range(3)]  # per channel: much faster than [N, 3]
        lo = np.array([ch.min() for ch in channels], dtype=np.float64)
        hi = np.array([ch.max() for ch in channels], dtype=np.float64)
        # Distance from each shape colour to the axis-aligned box holding every background pixel: a lower bound
        # on the per-pixel distance, computed without a per-pixel distance matrix. Expect 90 minus the worst-case
        # noise (|noise| <= 23 per channel, i.e. 23 * sqrt(3) ~ 40).
        gaps = np.maximum(np.maximum(lo - base, base - hi), 0.0)
        assert np.linalg.norm(gaps, axis=1).min() > 50
        noisy += bool((hi > lo).any())
    assert 0 < noisy < len(scenes), "both plain and noisy backgrounds occur"


def test_pairs_unique(scenes: list[Scene]) -> None:
    for scene in scenes:
        pairs = [(o.colour, o.shape) for o in scene.objects]
        assert len(pairs) == len(set(pairs))
        assert all(o.name == f"{o.colour} {o.shape}" for o in scene.objects)


def test_deterministic() -> None:
    for seed in (0, 1, 99):
        a = render_scene(np.random.default_rng(seed))
        b = render_scene(np.random.default_rng(seed))
        assert a.image.tobytes() == b.image.tobytes()
        assert [(o.name, o.box, o.square) for o in a.objects] == [(o.name, o.box, o.square) for o in b.objects]
        for oa, ob in zip(a.objects, b.objects, strict=True):
            np.testing.assert_array_equal(oa.mask, ob.mask)
        sa = sample_tasks(a, np.random.default_rng(seed))
        sb = sample_tasks(b, np.random.default_rng(seed))
        assert [(s.task, s.question, s.answer, s.boxes_in, s.boxes_out) for s in sa] == [
            (s.task, s.question, s.answer, s.boxes_in, s.boxes_out) for s in sb
        ]


def test_task_formats_and_semantics(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(5)
    seen = Counter()
    for scene in scenes:
        by_name = {o.name: o for o in scene.objects}
        for sample in sample_tasks(scene, rng):
            seen[sample.task] += 1
            q_re, a_re = FORMATS[sample.task]
            q, a = re.fullmatch(q_re, sample.question), re.fullmatch(a_re, sample.answer)
            assert q and a, (sample.task, sample.question, sample.answer)
            assert sample.question.count("<at> <boxes>") == len(sample.boxes_in)
            assert sample.answer.count("<at> <boxes>") == len(sample.boxes_out) == len(sample.masks_out)
            for box, mask in zip(sample.boxes_out, sample.masks_out, strict=True):
                assert box == tight_box(mask)
            if sample.task == "locate":
                assert sample.boxes_out == (by_name[q[1]].box,)
            elif sample.task == "describe":
                assert sample.boxes_in == (by_name[a[1]].box,)
            elif sample.task == "count":
                assert int(a[1]) == len(scene.objects)
            elif sample.task == "colour":
                matching = [o for o in scene.objects if o.shape == q[1]]
                assert len(matching) == 1
                assert matching[0].colour == a[1]
            elif sample.task == "shape":
                matching = [o for o in scene.objects if o.colour == q[1]]
                assert len(matching) == 1
                assert matching[0].shape == a[1]
            elif sample.task == "grounded":
                names = re.findall(NAME_RE, sample.answer)
                assert sorted(names) == sorted(by_name)
                ordered = sorted(scene.objects, key=lambda o: (o.box[0], o.box[1]))
                assert names == [o.name for o in ordered]
                assert sample.boxes_out == tuple(o.box for o in ordered)
    # count, describe, locate, grounded, locate_all and exists are always posable with >= 1 object.
    for task in ("locate", "locate_all", "describe", "count", "exists", "grounded"):
        assert seen[task] == len(scenes)
    assert 0 < seen["colour"] <= len(scenes)
    assert 0 < seen["shape"] <= len(scenes)


def test_locate_all_matches_and_order(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(11)
    kinds = Counter()
    for scene in scenes:
        for _ in range(3):
            sample = make_sample(scene, "locate_all", rng)
            assert sample is not None
            q = re.fullmatch(FORMATS["locate_all"][0], sample.question)
            assert q
            shape, colour = q[1], q[2]
            kinds["shape" if shape else "colour"] += 1
            matches = [o for o in scene.objects if (o.shape == shape if shape else o.colour == colour)]
            assert matches
            expected = sorted(matches, key=lambda o: (o.box[0], o.box[1]))
            assert sample.boxes_out == tuple(o.box for o in expected)
            keys = [(b[0], b[1]) for b in sample.boxes_out]
            assert keys == sorted(keys)
    assert kinds["shape"] > 0
    assert kinds["colour"] > 0


def test_exists_balanced_and_truthful(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(3)
    replies = Counter()
    for scene in scenes:
        present = {o.name for o in scene.objects}
        for _ in range(5):
            sample = make_sample(scene, "exists", rng)
            assert sample is not None
            name = re.fullmatch(FORMATS["exists"][0], sample.question)[1]
            reply = re.fullmatch(FORMATS["exists"][1], sample.answer)[1]
            replies[reply] += 1
            assert (name in present) == (reply == "yes")
    total = sum(replies.values())
    assert 0.4 < replies["yes"] / total < 0.6


def test_unposable_tasks_return_none() -> None:
    height, width = 200, 200
    objects = []
    for colour, x0 in (("red", 0), ("blue", 100)):
        mask = np.zeros((height, width), dtype=bool)
        mask[0:50, x0 : x0 + 50] = True
        objects.append(ShapeObject("circle", colour, (float(x0), 0.0, float(x0 + 50), 50.0), mask))
    scene = Scene(np.zeros((height, width, 3), dtype=np.uint8), tuple(objects))
    assert make_sample(scene, "colour", np.random.default_rng(0)) is None  # two circles: ambiguous
    assert make_sample(scene, "shape", np.random.default_rng(0)) is not None
    assert [s.task for s in sample_tasks(scene, np.random.default_rng(0))] == [t for t in TASKS if t != "colour"]
    assert [s.task for s in sample_tasks(scene, np.random.default_rng(0), ["count", "colour"])] == ["count"]
    with pytest.raises(ValueError):
        make_sample(scene, "nonsense", np.random.default_rng(0))


def test_plural() -> None:
    assert [world.plural(s) for s in SHAPES] == ["circles", "squares", "triangles"]


def test_subjects_name_the_objects_each_question_is_about(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(5)
    for scene in scenes[:60]:
        objs = scene.objects
        for task in TASKS:
            sample = make_sample(scene, task, rng)
            if sample is None:
                continue
            about = [objs[i] for i in sample.subjects]
            if task in ("locate", "locate_all"):
                assert tuple(o.box for o in about) == sample.boxes_out
            elif task == "describe":
                assert tuple(o.box for o in about) == sample.boxes_in
                assert sample.answer == f"A {about[0].name} ."
            elif task in ("count", "grounded"):
                assert sorted(sample.subjects) == list(range(len(objs)))
            elif task == "exists":
                name = re.fullmatch(FORMATS["exists"][0], sample.question)[1]
                assert [o.name for o in about] == ([name] if name in {o.name for o in objs} else [])
            else:  # colour / shape: the one object the question singles out
                (obj,) = about
                assert obj.colour in sample.answer or obj.shape in sample.answer
    scene = next(s for s in scenes if len(s.objects) >= 3)
    picks = [make_sample(scene, "locate", rng, subject=i).subjects for i in range(len(scene.objects))]
    assert picks == [(i,) for i in range(len(scene.objects))]
