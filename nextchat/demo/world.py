"""Synthetic "shapes world": random scenes of coloured shapes plus grounded Q&A samples.

All boxes are pixel xyxy with exclusive max (x1 = min column, y1 = min row, x2 = max column + 1,
y2 = max row + 1) in the original image frame. Images are uint8 RGB arrays of shape [H, W, 3] and
masks are bool arrays of shape [H, W]. Ground truth comes straight from the renderer, so masks and
boxes are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageDraw


SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 30),
}
TASKS: tuple[str, ...] = ("locate", "locate_all", "describe", "count", "colour", "shape", "exists", "grounded")
BOX_TOKEN = "<at> <boxes>"

MIN_SIDE, MAX_SIDE = 160, 640
MAX_ASPECT = 2.0
MIN_OBJECT_FRAC, MAX_OBJECT_FRAC = 0.15, 0.40
MIN_VISIBLE_FRAC = 0.75
COLOUR_JITTER = 15
MAX_NOISE_STD = 8.0
NOISY_PROB = 0.5
MIN_BG_DISTANCE = 90.0
PLACEMENT_RETRIES = 50
LAYOUT_RETRIES = 10

Box = tuple[float, float, float, float]

# Standard normal quantiles at the midpoints of 256 equal-probability bins; |z| <= 2.9, so noise stays bounded.
_NORMAL_QUANTILES = np.array([NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)])


@dataclass(frozen=True)
class ShapeObject:
    """One rendered object.

    Attributes:
        shape: One of ``SHAPES``.
        colour: One of ``COLOURS``.
        box: Tight box of the visible mask, pixel xyxy, exclusive max, original image frame.
        mask: Bool [H, W] mask of the visible part only (after occlusion by later objects).
        square: Bounding square of the unoccluded shape, pixel xyxy, exclusive max; its side is the object size.
    """

    shape: str
    colour: str
    box: Box
    mask: np.ndarray
    square: Box | None = None

    @property
    def name(self) -> str:
        """Referring name, e.g. ``"red circle"``."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A rendered scene: uint8 [H, W, 3] RGB image and its objects in drawing order."""

    image: np.ndarray
    objects: tuple[ShapeObject, ...]

    @property
    def width(self) -> int:
        """Image width W in pixels."""
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        """Image height H in pixels."""
        return int(self.image.shape[0])


@dataclass(frozen=True)
class Sample:
    """One question/answer pair about a scene.

    Each ``"<at> <boxes>"`` in ``question`` / ``answer`` corresponds, in order, to one entry of
    ``boxes_in`` / ``boxes_out`` (pixel xyxy, exclusive max, original image frame); ``masks_out`` holds the
    bool [H, W] visible masks matching ``boxes_out``. ``subjects`` are the indices (into ``scene.objects``) of the
    objects the question is about: the one to locate, describe or name an attribute of, the matches of "all the
    circles", every object for a count or a grounded answer; empty when the asked-for object is absent.
    """

    task: str
    question: str
    answer: str
    boxes_in: tuple[Box, ...]
    boxes_out: tuple[Box, ...]
    masks_out: tuple[np.ndarray, ...]
    subjects: tuple[int, ...] = ()


def plural(shape: str) -> str:
    """Plural of a shape name (all of ``SHAPES`` take a plain "s")."""
    return f"{shape}s"


def shape_template(shape: str, side: int) -> np.ndarray:
    """Bool [side, side] mask of ``shape`` filling its bounding square (it touches all four edges)."""
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    corners = (0, 0, side - 1, side - 1)
    if shape == "circle":
        draw.ellipse(corners, fill=255)
    elif shape == "square":
        draw.rectangle(corners, fill=255)
    elif shape == "triangle":
        draw.polygon([(0, side - 1), (side - 1, side - 1), ((side - 1) / 2, 0)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(canvas) > 0


def mask_box(mask: np.ndarray) -> Box:
    """Tight box of a non-empty bool [H, W] mask, pixel xyxy, exclusive max."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def _sample_size(rng: np.random.Generator) -> tuple[int, int]:
    width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    lo = max(MIN_SIDE, math.ceil(width / MAX_ASPECT))
    hi = min(MAX_SIDE, math.floor(width * MAX_ASPECT))
    return width, int(rng.integers(lo, hi + 1))


def _sample_background(rng: np.random.Generator, margin: int) -> np.ndarray:
    """Background RGB (uint8 [3]) far from all shape colours, each channel within [margin, 255 - margin]."""
    shape_colours = np.array(list(COLOURS.values()), dtype=np.float64)
    for _ in range(100):
        colour = rng.integers(margin, 256 - margin, size=3)
        if np.linalg.norm(shape_colours - colour, axis=1).min() >= MIN_BG_DISTANCE:
            return colour.astype(np.uint8)
    # Roughly half of all colours are accepted, so this fallback is practically unreachable; it only bounds the loop.
    return np.array([128, 128, 128], dtype=np.uint8)


def _noise_lut(std: float) -> np.ndarray:
    """Rounded Gaussian noise at the 256 equiprobable quantiles, as int8 bit patterns in a uint8 [256] table."""
    return np.rint(std * _NORMAL_QUANTILES).astype(np.int8).view(np.uint8)


def _background_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Plain or lightly noisy background, uint8 [H, W, 3]."""
    noisy = bool(rng.random() < NOISY_PROB)
    lut = _noise_lut(float(rng.uniform(1.0, MAX_NOISE_STD))) if noisy else None
    margin = int(np.abs(lut.view(np.int8)).max()) if lut is not None else 0
    colour = _sample_background(rng, margin)
    image = np.empty((height, width, 3), dtype=np.uint8)
    # Broadcasting a whole row is ~30x faster than filling with a 3-vector (stride-3 writes).
    image[:] = np.tile(colour, (width, 1))
    if lut is not None:
        # Gaussian noise by inverse-CDF lookup of random bytes: far cheaper than standard_normal on large images.
        # The margin keeps bg + noise inside [0, 255], so the wrapping uint8 add is exact.
        size = height * width * 3
        raw = rng.integers(0, 2**64 - 1, size=(size + 7) // 8, dtype=np.uint64, endpoint=True)
        noise = np.take(lut, raw.view(np.uint8)[:size]).reshape(height, width, 3)
        image += noise
    return image


@dataclass
class _Placed:
    shape: str
    colour: str
    rgb: np.ndarray
    template: np.ndarray
    x0: int
    y0: int
    mask: np.ndarray  # visible part, updated as later objects occlude it
    visible: int
    area: int

    @property
    def window(self) -> tuple[slice, slice]:
        side = self.template.shape[0]
        return slice(self.y0, self.y0 + side), slice(self.x0, self.x0 + side)


def _place_objects(rng: np.random.Generator, width: int, height: int, n: int) -> list[_Placed]:
    """Place up to ``n`` objects with distinct (colour, shape) pairs, each kept mostly visible."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    short = min(width, height)
    side_lo, side_hi = math.ceil(MIN_OBJECT_FRAC * short), math.floor(MAX_OBJECT_FRAC * short)
    placed: list[_Placed] = []
    for idx in rng.permutation(len(pairs))[:n]:
        colour, shape = pairs[idx]
        side = int(rng.integers(side_lo, side_hi + 1))
        template = shape_template(shape, side)
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        rgb = np.clip(np.array(COLOURS[colour]) + jitter, 0, 255).astype(np.uint8)
        for _ in range(PLACEMENT_RETRIES):
            x0 = int(rng.integers(0, width - side + 1))
            y0 = int(rng.integers(0, height - side + 1))
            window = (slice(y0, y0 + side), slice(x0, x0 + side))
            # The new object is on top, so only earlier objects can lose area.
            losses = [int(np.count_nonzero(p.mask[window] & template)) for p in placed]
            if all(p.visible - lost >= MIN_VISIBLE_FRAC * p.area for p, lost in zip(placed, losses, strict=True)):
                break
        else:
            continue  # give up on this object rather than loop forever
        for p, lost in zip(placed, losses, strict=True):
            if lost:
                p.mask[window] &= ~template
                p.visible -= lost
        mask = np.zeros((height, width), dtype=bool)
        mask[window] = template
        area = int(np.count_nonzero(template))
        placed.append(_Placed(shape, colour, rgb, template, x0, y0, mask, area, area))
    return placed


def render_scene(rng: np.random.Generator, *, min_objects: int = 1, max_objects: int = 4) -> Scene:
    """Render a random scene.

    Args:
        rng: Source of all randomness; the same seed gives a byte-identical scene.
        min_objects: Minimum number of objects (best effort: an object that cannot be placed mostly visible
            within bounded retries is dropped, and a short layout is redone a bounded number of times).
        max_objects: Maximum number of objects (at most 12, the number of (colour, shape) pairs).

    Returns:
        Scene with a uint8 [H, W, 3] RGB image, H and W in [160, 640], aspect at most 2:1, and its objects
        in drawing order, each with its exact visible bool [H, W] mask and tight pixel xyxy box (exclusive max).
    """
    if not 1 <= min_objects <= max_objects <= len(COLOURS) * len(SHAPES):
        raise ValueError(f"invalid object range [{min_objects}, {max_objects}]")
    width, height = _sample_size(rng)
    image = _background_image(rng, width, height)
    n = int(rng.integers(min_objects, max_objects + 1))
    placed = _place_objects(rng, width, height, n)
    for _ in range(LAYOUT_RETRIES):
        if len(placed) >= min_objects:
            break
        placed = _place_objects(rng, width, height, n)

    objects = []
    for p in placed:
        # Painting full shapes in drawing order reproduces the occlusion encoded in the visible masks.
        image[p.window][p.template] = p.rgb
        side = p.template.shape[0]
        x1, y1, x2, y2 = mask_box(p.mask[p.window])
        box = (x1 + p.x0, y1 + p.y0, x2 + p.x0, y2 + p.y0)
        square = (float(p.x0), float(p.y0), float(p.x0 + side), float(p.y0 + side))
        objects.append(ShapeObject(shape=p.shape, colour=p.colour, box=box, mask=p.mask, square=square))
    return Scene(image=image, objects=tuple(objects))


def _left_to_right(objects: Sequence[ShapeObject], indices: Sequence[int]) -> list[int]:
    """``indices`` into ``objects`` ordered by their boxes' left edge, then top edge."""
    return sorted(indices, key=lambda i: (objects[i].box[0], objects[i].box[1]))


def _answer(obj_list: Sequence[ShapeObject]) -> tuple[tuple[Box, ...], tuple[np.ndarray, ...]]:
    return tuple(o.box for o in obj_list), tuple(o.mask for o in obj_list)


def make_sample(scene: Scene, task: str, rng: np.random.Generator, subject: int | None = None) -> Sample | None:
    """Pose one question of the given task about ``scene``.

    Args:
        scene: The scene to ask about.
        task: One of ``TASKS``.
        rng: Source of randomness for the choice of object / attribute.
        subject: For "locate" and "describe", the index of the object to ask about (random when None).

    Returns:
        The sample (boxes pixel xyxy, exclusive max, original image frame), or None when the task cannot be
        posed for this scene (e.g. "colour" when no shape occurs exactly once).
    """
    objs = scene.objects
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    if task == "count":
        every = tuple(range(len(objs)))
        return Sample(task, "How many shapes are there?", f"The answer is {len(objs)} .", (), (), (), every)
    if task == "exists":
        present = {(o.colour, o.shape) for o in objs}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        want_yes = bool(rng.random() < 0.5)
        if (want_yes and present) or not absent:
            colour, shape = sorted(present)[int(rng.integers(len(present)))]
            reply = "yes"
            subjects = tuple(i for i, o in enumerate(objs) if (o.colour, o.shape) == (colour, shape))
        else:
            colour, shape = absent[int(rng.integers(len(absent)))]
            reply, subjects = "no", ()
        return Sample(task, f"Is there a {colour} {shape}?", f"The answer is {reply} .", (), (), (), subjects)
    if not objs:
        return None
    if task in ("locate", "describe"):
        index = int(rng.integers(len(objs))) if subject is None else subject
        obj = objs[index]
        if task == "describe":
            return Sample(task, f"Can you describe {BOX_TOKEN}?", f"A {obj.name} .", (obj.box,), (), (), (index,))
        boxes, masks = _answer([obj])
        question = f"Where is the {obj.name} in the image?"
        return Sample(task, question, f"Answer: {BOX_TOKEN} .", (), boxes, masks, (index,))
    if task == "locate_all":
        by_shape = rng.random() < 0.5
        values = sorted({o.shape if by_shape else o.colour for o in objs})
        value = values[int(rng.integers(len(values)))]
        matches = _left_to_right(objs, [i for i, o in enumerate(objs) if (o.shape if by_shape else o.colour) == value])
        words = plural(value) if by_shape else f"{value} shapes"
        question = f"Where are all the {words} in the image?"
        boxes, masks = _answer([objs[i] for i in matches])
        answer = f"Answer: {' '.join([BOX_TOKEN] * len(matches))} ."
        return Sample(task, question, answer, (), boxes, masks, tuple(matches))
    if task in ("colour", "shape"):
        attr = "shape" if task == "colour" else "colour"
        values = [getattr(o, attr) for o in objs]
        unique = sorted(v for v in set(values) if values.count(v) == 1)
        if not unique:
            return None
        value = unique[int(rng.integers(len(unique)))]
        index = next(i for i, o in enumerate(objs) if getattr(o, attr) == value)
        obj = objs[index]
        if task == "colour":
            return Sample(task, f"What colour is the {value}?", f"The answer is {obj.colour} .", (), (), (), (index,))
        question = f"What shape is the {value} object?"
        return Sample(task, question, f"The answer is {obj.shape} .", (), (), (), (index,))
    # grounded
    order = _left_to_right(objs, range(len(objs)))
    ordered = [objs[i] for i in order]
    parts = [f"a {o.name} {BOX_TOKEN}" for o in ordered]
    answer = f"There is {parts[0]} ." if len(parts) == 1 else f"There are {' , '.join(parts[:-1])} and {parts[-1]} ."
    boxes, masks = _answer(ordered)
    question = "What shapes are in the image? Please mention related object locations."
    return Sample(task, question, answer, (), boxes, masks, tuple(order))


def sample_tasks(scene: Scene, rng: np.random.Generator, tasks: Sequence[str] | None = None) -> list[Sample]:
    """One sample per posable task, in the order of ``tasks`` (all of ``TASKS`` when None)."""
    samples = []
    for task in TASKS if tasks is None else tasks:
        sample = make_sample(scene, task, rng)
        if sample is not None:
            samples.append(sample)
    return samples
