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

import numpy as np
import torch
import torch.nn.functional as F

from nextchat.resizing import ImageGeometry, ResizedImage, sam_resized_image, square_resized


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


# ----------------------------------------------------------------------------------------------------------------
# LLM branch: expand to square (white), then CLIP-style resize / normalise.


def vision_pixel_values(
    image: np.ndarray,
    size: int,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    first: ResizedImage | None = None,
) -> torch.Tensor:
    """The vision tower's input for an RGB uint8 ``[H, W, 3]`` image: float32 ``[3, size, size]``.

    Expand to a white square, resize (bicubic, as ``CLIPImageProcessor``; the centre crop of a square resized to the
    crop size is the identity), rescale to 0–1 and normalise. The result is the official one to the last bit, but
    the ``L × L`` square is never built when it is larger than the input (see :func:`square_resized`). ``first``:
    the image's first resizes where they were already made (:mod:`nextchat.resizing`); its square is used when it
    was made for ``size``.
    """
    square = first.square if first is not None and first.sides.vision == size else None
    if square is None:
        square = square_resized(image, size)
    x = square.astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------------------------------------
# SAM branch: resize long side, normalise, centred zero padding.


def sam_pixel_values(image: np.ndarray, sam_size: int, first: ResizedImage | None = None) -> torch.Tensor:
    """SAM's input for an RGB uint8 ``[H, W, 3]`` image: float32 ``[3, S, S]``, normalised, zero-padded centred.

    ``first``: as in :func:`vision_pixel_values`; its SAM resize is used when it was made for ``sam_size``.
    """
    geometry = ImageGeometry(image.shape[1], image.shape[0])
    small = first.sam if first is not None and first.sides.sam == sam_size else None
    if small is None:
        small = sam_resized_image(image, sam_size)
    resized = torch.from_numpy(np.array(small)).permute(2, 0, 1)
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
    the short side. Threshold at 0 for the binary mask. Only the cropped band of the ``L × L`` map is computed
    (:func:`_bilinear_rows`, PyTorch's own source positions and weights), so a 16384×8 image costs its own pixels,
    not a 1 GiB square per mask.
    """
    x = F.interpolate(low_res.float(), (sam_size, sam_size), mode="bilinear", align_corners=False)[:, 0]
    side = geometry.side
    left, top = geometry.square_offset
    rows = (top, top + geometry.height)
    cols = (left, left + geometry.width)
    if geometry.height <= geometry.width:  # the short side's band first: the smaller intermediate
        return _bilinear_rows(_bilinear_rows(x, side, rows).transpose(1, 2), side, cols).transpose(1, 2)
    return _bilinear_rows(_bilinear_rows(x.transpose(1, 2), side, cols).transpose(1, 2), side, rows)


def _bilinear_rows(x: torch.Tensor, out_size: int, span: tuple[int, int]) -> torch.Tensor:
    """Rows ``span`` of ``x`` ``[N, R, C]`` resized along its rows to ``out_size`` (``F.interpolate`` bilinear,
    ``align_corners=False``): ``[N, span length, C]``. Source positions and weights are PyTorch's, in float32."""
    size = x.shape[1]
    scale = torch.tensor(float(size), dtype=torch.float32) / out_size
    target = torch.arange(span[0], span[1], dtype=torch.float32)
    source = (scale * (target + 0.5) - 0.5).clamp(min=0)
    below = source.long()
    above = torch.where(below < size - 1, below + 1, below)
    weight = (source - below).clamp(0, 1)[None, :, None]
    return x[:, below] * (1 - weight) + x[:, above] * weight


def box_of_mask(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight pixel xyxy (exclusive max) of a bool ``[H, W]`` mask, or ``None`` when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)
