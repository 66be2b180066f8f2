"""Procedural images that are not scenes of the demo model's shapes world, for the out-of-world checks.

Six kinds, in turn: photo-like textures (smooth random fields with grain), photo-like landscapes (sky gradient,
ground, sun, trees), gradients (linear or radial), noise (uniform, Gaussian or salt-and-pepper), rendered UI
screenshots with text (title bar, inputs, buttons such as "Login", lines of text) and drawings (pen strokes and
outlined figures on paper). Everything is seeded; sizes are 160-480 px a side.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont


Rng = np.random.Generator
WORDS = ("Login", "Password", "Email", "Settings", "Profile", "Save", "Cancel", "Search", "Home", "Account", "42")


def _colour(rng: Rng, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(low, high, 3))
    return r, g, b


def texture(rng: Rng, height: int, width: int) -> np.ndarray:
    """Photo-like: per channel, a sum of a few random sinusoids (smooth light and colour), plus sensor grain."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.zeros((height, width, 3))
    for channel in range(3):
        for _ in range(4):
            fx, fy, phase = rng.uniform(0.004, 0.06), rng.uniform(0.004, 0.06), rng.uniform(0, 2 * np.pi)
            image[..., channel] += np.sin(fx * x + fy * y + phase)
    image = (image - image.min()) / (np.ptp(image) + 1e-9) * rng.uniform(120, 255) + rng.uniform(0, 60)
    image += rng.normal(0, rng.uniform(2, 8), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def landscape(rng: Rng, height: int, width: int) -> np.ndarray:
    """Photo-like: a sky gradient, a horizon, textured ground, a sun and blurred trees."""
    horizon = int(height * rng.uniform(0.4, 0.7))
    top, bottom = np.array(_colour(rng, 60, 200)), np.array(_colour(rng, 150, 256))
    t = np.linspace(0, 1, horizon)[:, None, None]
    image = np.empty((height, width, 3))
    image[:horizon] = top + (bottom - top) * t
    ground = np.array(_colour(rng, 30, 140))
    image[horizon:] = ground + rng.normal(0, 14, (height - horizon, width, 3))
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    sun_x, sun_y, radius = rng.uniform(0, width), rng.uniform(0, horizon / 2), rng.uniform(8, 30)
    draw.ellipse((sun_x - radius, sun_y - radius, sun_x + radius, sun_y + radius), fill=_colour(rng, 200, 256))
    for _ in range(int(rng.integers(2, 8))):
        x, size = rng.uniform(0, width), rng.uniform(15, 60)
        draw.ellipse((x - size / 2, horizon - size, x + size / 2, horizon + size / 4), fill=_colour(rng, 10, 120))
    return np.asarray(picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0))))


def gradient(rng: Rng, height: int, width: int) -> np.ndarray:
    """A linear gradient at a random angle, or a radial one, between two random colours at least 100 apart."""
    start, end = np.array(_colour(rng)), np.array(_colour(rng))
    while np.linalg.norm(start - end) < 100:  # closer colours make a plain image, not a gradient
        end = np.array(_colour(rng))
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        ramp = x * np.cos(angle) + y * np.sin(angle)
    else:
        ramp = np.hypot(x - rng.uniform(0, width), y - rng.uniform(0, height))
    t = ((ramp - ramp.min()) / (np.ptp(ramp) + 1e-9))[..., None]
    return (start + (end - start) * t).astype(np.uint8)


def noise(rng: Rng, height: int, width: int) -> np.ndarray:
    """Uniform noise, Gaussian noise around a random colour, or salt-and-pepper on a plain colour."""
    kind = int(rng.integers(3))
    if kind == 0:
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == 1:
        image = np.array(_colour(rng, 40, 216)) + rng.normal(0, rng.uniform(25, 60), (height, width, 3))
        return np.clip(image, 0, 255).astype(np.uint8)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = _colour(rng)
    speckled = rng.random((height, width)) < rng.uniform(0.05, 0.3)
    image[speckled] = rng.integers(0, 256, (int(speckled.sum()), 3), dtype=np.uint8)
    return image


def screenshot(rng: Rng, height: int, width: int) -> np.ndarray:
    """A rendered UI: a page, a title bar, input fields, buttons with labels and lines of text."""
    page = Image.new("RGB", (width, height), _colour(rng, 225, 256))
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=int(rng.integers(11, 18)))
    bar = int(rng.integers(22, 36))
    draw.rectangle((0, 0, width, bar), fill=_colour(rng, 30, 140))
    draw.text((8, bar // 4), " - ".join(rng.choice(WORDS, 2)), fill=(255, 255, 255), font=font)
    y = bar + 12
    while y < height - 24:
        choice = rng.random()
        if choice < 0.3:
            label = str(rng.choice(WORDS))
            fill = _colour(rng, 0, 256)
            draw.rounded_rectangle((12, y, 12 + 12 * len(label) + 24, y + 24), radius=5, fill=fill)
            draw.text((24, y + 5), label, fill=(255, 255, 255) if sum(fill) < 380 else (0, 0, 0), font=font)
        elif choice < 0.5:
            draw.text((12, y), f"{rng.choice(WORDS)}:", fill=(60, 60, 60), font=font)
            draw.rectangle((110, y - 2, width - 12, y + 20), outline=(150, 150, 150), fill=(255, 255, 255))
        else:
            words = " ".join(str(w).lower() for w in rng.choice(WORDS, int(rng.integers(3, 9))))
            draw.text((12, y), words, fill=_colour(rng, 0, 90), font=font)
        y += int(rng.integers(28, 40))
    return np.asarray(page)


def drawing(rng: Rng, height: int, width: int) -> np.ndarray:
    """A drawing: pen strokes, outlined figures and a scribbled word on paper."""
    paper = Image.new("RGB", (width, height), _colour(rng, 230, 256))
    draw = ImageDraw.Draw(paper)
    for _ in range(int(rng.integers(15, 45))):
        points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(int(rng.integers(2, 6)))]
        draw.line(points, fill=_colour(rng, 0, 200), width=int(rng.integers(1, 5)))
    for _ in range(int(rng.integers(2, 7))):
        x, y = float(rng.uniform(0, width - 40)), float(rng.uniform(0, height - 40))
        corners = (x, y, x + float(rng.uniform(20, 120)), y + float(rng.uniform(20, 120)))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(corners, outline=_colour(rng, 0, 120), width=2)
    font = ImageFont.load_default(size=int(rng.integers(14, 28)))
    draw.text(
        (float(rng.uniform(0, width / 2)), float(rng.uniform(0, height - 30))), "hello", fill=(20, 20, 60), font=font
    )
    return np.asarray(paper)


KINDS: tuple[Callable[[Rng, int, int], np.ndarray], ...] = (texture, landscape, gradient, noise, screenshot, drawing)


def non_shapes_images(count: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """``count`` pairs of (kind, uint8 RGB ``[H, W, 3]`` image), the kinds in turn, from ``seed``."""
    rng = np.random.default_rng([1916, seed])
    images = []
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        height, width = (int(v) for v in rng.integers(160, 481, 2))
        images.append((kind.__name__, kind(rng, height, width)))
    return images
