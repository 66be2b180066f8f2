"""Image preprocessing, box frames and mask post-processing, as the official NExT-Chat code does them.

Frames used throughout:

- **original**: pixel xyxy in the image as supplied (W × H), origin top-left.
- **square**: the image pasted centred on a white ``L × L`` square, ``L = max(W, H)``
  (``Expand2square``); boxes there are normalised by ``L`` to 0–1. ``loc_encoder`` takes and
  ``loc_decoder`` emits boxes in this frame.
- **sam**: the original image resized so its long side is ``S`` (SAM's input size) and zero-padded *centred* to
  ``S × S``. Because both paddings are centred, ``square box × S`` lands (up to rounding) on the object in this frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ImageGeometry:
    """Where an ``width × height`` image sits in the square and SAM frames."""

    width: int
    height: int

    @property
    def side(self) -> int:
        """Side ``L`` of the expand-to-square frame."""
        return max(self.width, self.height)

    @property
    def square_offset(self) -> tuple[int, int]:
        """Left/top offset of the image in the square (``Expand2square`` pastes at ``((L-w)//2, (L-h)//2)``)."""
        return (self.side - self.width) // 2, (self.side - self.height) // 2

    def sam_resized_size(self, sam_size: int) -> tuple[int, int]:
        """``(w, h)`` of the image resized so its long side is ``sam_size`` (``ResizeLongestSide`` rounding)."""
        scale = sam_size / self.side
        return int(self.width * scale + 0.5), int(self.height * scale + 0.5)

    def sam_padding(self, sam_size: int) -> tuple[int, int]:
        """Left/top zero padding of the resized image inside ``sam_size × sam_size`` (centred)."""
        w, h = self.sam_resized_size(sam_size)
        return (sam_size - w) // 2, (sam_size - h) // 2


# ----------------------------------------------------------------------------------------------------------------
# LLM branch: expand to square (white), then CLIP-style resize / normalise.


def expand_to_square(image: np.ndarray, fill: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Paste an RGB uint8 ``[H, W, 3]`` image centred on a ``[L, L, 3]`` canvas of ``fill`` (official: white).

    A square image is returned as it is (not copied): there is nothing to paste.
    """
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[...] = np.asarray(fill, dtype=np.uint8)
    left, top = (side - w) // 2, (side - h) // 2
    canvas[top : top + h, left : left + w] = image
    return canvas


def vision_pixel_values(
    image: np.ndarray,
    size: int,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> torch.Tensor:
    """The vision tower's input for an RGB uint8 ``[H, W, 3]`` image: float32 ``[3, size, size]``.

    Expand to a white square, resize (bicubic, as ``CLIPImageProcessor``; the centre crop of a square resized to the
    crop size is the identity), rescale to 0–1 and normalise.
    """
    square = Image.fromarray(expand_to_square(image))
    if square.size != (size, size):
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(square, dtype=np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------------------------------------
# SAM branch: resize long side, normalise, centred zero padding.


def sam_resized_image(image: np.ndarray, sam_size: int) -> np.ndarray:
    """RGB uint8 ``[h, w, 3]`` resized (bilinear, PIL) so its long side is ``sam_size``."""
    geometry = ImageGeometry(image.shape[1], image.shape[0])
    w, h = geometry.sam_resized_size(sam_size)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def sam_pixel_values(image: np.ndarray, sam_size: int) -> torch.Tensor:
    """SAM's input for an RGB uint8 ``[H, W, 3]`` image: float32 ``[3, S, S]``, normalised, zero-padded centred."""
    geometry = ImageGeometry(image.shape[1], image.shape[0])
    resized = torch.from_numpy(np.array(sam_resized_image(image, sam_size))).permute(2, 0, 1)
    mean = torch.tensor(SAM_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(SAM_STD, dtype=torch.float32).view(3, 1, 1)
    x = (resized - mean) / std
    left, top = geometry.sam_padding(sam_size)
    h, w = x.shape[1:]
    return F.pad(x, (left, sam_size - w - left, top, sam_size - h - top))


# ----------------------------------------------------------------------------------------------------------------
# Boxes between frames.


def boxes_to_square(boxes: np.ndarray | torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """Original-frame pixel xyxy ``[N, 4]`` → square-frame normalised xyxy ``[N, 4]``, clamped to 0–1."""
    b = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    left, top = geometry.square_offset
    shift = torch.tensor([left, top, left, top], dtype=torch.float64)
    return ((b + shift) / geometry.side).clamp(0.0, 1.0).float()


def boxes_from_square(boxes: torch.Tensor, geometry: ImageGeometry, clamp: bool = True) -> torch.Tensor:
    """Square-frame normalised xyxy ``[N, 4]`` → original-frame pixel xyxy ``[N, 4]`` (float64).

    The official ``de_transform_box`` does not clip; with ``clamp`` (the default) the box is clipped to the image
    and its corners put in order, so a result always lies inside the picture.
    """
    b = boxes.detach().to(torch.float64).reshape(-1, 4) * geometry.side
    left, top = geometry.square_offset
    b = b - torch.tensor([left, top, left, top], dtype=torch.float64)
    if clamp:
        x = b[:, 0::2].clamp(0, geometry.width)
        y = b[:, 1::2].clamp(0, geometry.height)
        b = torch.stack([x.min(1).values, y.min(1).values, x.max(1).values, y.max(1).values], dim=1)
    return b


# ----------------------------------------------------------------------------------------------------------------
# Masks from SAM's low-resolution logits back to the original image.


def mask_logits_to_original(low_res: torch.Tensor, geometry: ImageGeometry, sam_size: int) -> torch.Tensor:
    """SAM decoder logits ``[N, 1, s, s]`` → logits on the original image ``[N, H, W]`` (float32).

    As the official code: bilinear to ``S × S``, bilinear to ``L × L`` (L = long side), then crop the centred band of
    the short side. Threshold at 0 for the binary mask.
    """
    x = low_res.float()
    x = F.interpolate(x, (sam_size, sam_size), mode="bilinear", align_corners=False)
    side = geometry.side
    x = F.interpolate(x, (side, side), mode="bilinear", align_corners=False)[:, 0]
    left, top = geometry.square_offset
    return x[:, top : top + geometry.height, left : left + geometry.width]


def box_of_mask(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight pixel xyxy (exclusive max) of a bool ``[H, W]`` mask, or ``None`` when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)
