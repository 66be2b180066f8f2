"""Helpers shared by test modules (fixtures live in the conftest files)."""

import base64
import io

import numpy as np
from PIL import Image


def make_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A noisy RGB uint8 [H, W, 3] image with a red rectangle."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[height // 4 : height // 2, width // 4 : width // 2] = (220, 30, 30)
    return image


def png_data_uri(pixels: np.ndarray) -> str:
    """An RGB uint8 image as a data:image/png;base64 URI."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
