"""Procedural images that are not scenes of the demo world: gradients, noise, photo-like textures, rendered UI
screenshots with text and line drawings."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    return np.broadcast_to(start + (end - start) * t, (h, w, 3)).astype(np.uint8)


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Photo-like: smooth random fields per channel (sums of a few sinusoids) plus grain."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    image = np.zeros((h, w, 3))
    for channel in range(3):
        for _ in range(4):
            fx, fy, phase = rng.uniform(0.005, 0.08), rng.uniform(0.005, 0.08), rng.uniform(0, 6.3)
            image[..., channel] += np.sin(fx * x + fy * y + phase)
    image = (image - image.min()) / (np.ptp(image) + 1e-9) * 255 + rng.normal(0, 6, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _screenshot(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A rendered UI: light page, title bar, panels, buttons and lines of text."""
    page = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(235, 256, 3)))
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=int(rng.integers(11, 16)))
    draw.rectangle((0, 0, w, 28), fill=tuple(int(v) for v in rng.integers(40, 120, 3)))
    draw.text((8, 6), "Settings - Account", fill=(255, 255, 255), font=font)
    y = 40
    while y < h - 20:
        if rng.random() < 0.25:
            draw.rounded_rectangle((10, y, 110, y + 22), radius=4, fill=(90, 90, 200), outline=(40, 40, 120))
            draw.text((18, y + 4), "Save changes", fill=(255, 255, 255), font=font)
        else:
            words = " ".join(rng.choice(["lorem", "ipsum", "user", "email", "profile", "enabled", "42"], 8))
            draw.text((10, y), words, fill=(30, 30, 30), font=font)
            draw.line((10, y + 19, w - 10, y + 19), fill=(200, 200, 200))
        y += 26
    return np.asarray(page)


def _drawing(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A line drawing: pen strokes and outlined figures on paper."""
    paper = Image.new("RGB", (w, h), (250, 248, 240))
    draw = ImageDraw.Draw(paper)
    for _ in range(int(rng.integers(25, 50))):
        points = [tuple(float(v) for v in rng.uniform(0, (w, h))) for _ in range(int(rng.integers(2, 6)))]
        pen = tuple(int(v) for v in rng.integers(0, 160, 3))
        draw.line(points, fill=pen, width=int(rng.integers(1, 5)))
    for _ in range(int(rng.integers(3, 8))):
        x, y = rng.uniform(0, w - 40), rng.uniform(0, h - 40)
        draw.ellipse((x, y, x + rng.uniform(20, 120), y + rng.uniform(20, 120)), outline=(20, 20, 20), width=2)
    return np.asarray(paper)


KINDS = (_gradient, _noise, _texture, _screenshot, _drawing)


def non_shapes_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` procedural RGB uint8 ``[H, W, 3]`` images that are not scenes of the demo world, the kinds in turn."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        h, w = int(rng.integers(160, 400)), int(rng.integers(160, 400))
        images.append(KINDS[index % len(KINDS)](rng, h, w))
    return images
