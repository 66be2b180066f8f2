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
        """``(w, h)`` of the image resized so its long side is ``sam_size`` (``ResizeLongestSide`` rounding).

        A side that rounds to 0 (an image thinner than ``side / sam_size`` / 2 pixels, where the official resize
        fails) is kept at 1 pixel.
        """
        scale = sam_size / self.side
        return max(1, int(self.width * scale + 0.5)), max(1, int(self.height * scale + 0.5))

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
    crop size is the identity), rescale to 0–1 and normalise. The result is the official one to the last bit, but
    the ``L × L`` square is never built when it is larger than the input (see :func:`square_resized`).
    """
    x = square_resized(image, size).astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def square_resized(image: np.ndarray, size: int) -> np.ndarray:
    """An RGB uint8 ``[H, W, 3]`` image expanded to a white ``L × L`` square and resized (PIL bicubic) to
    ``[size, size, 3]`` uint8: bit for bit what PIL gives for the square, in memory bounded by the image and
    ``L × size``, never ``L²`` (a 16384×8 strip built a 768 MiB square, and resizing it took seconds).

    PIL resizes in two passes, each rounded to uint8: across the rows (horizontal), then down the columns
    (vertical), and a pass over one axis only is the same computation. The padding of a wide image is rows of
    white, whose horizontal pass is one white row: so the image alone goes through the horizontal pass, and the
    ``L × size`` intermediate (image rows between white ones) through the vertical pass. A tall image's rows are
    padded left and right: for a narrow one, only the few output columns whose bicubic window reaches the image
    differ from white, and those are computed with PIL's own coefficients (:func:`_pil_bicubic_taps`); a wider one
    goes through PIL's horizontal pass in bands of padded rows.
    """
    h, w = image.shape[:2]
    side = max(h, w)
    if h == w or side <= size:  # nothing to pad, or a square no larger than the output
        square = Image.fromarray(expand_to_square(image))
        return np.asarray(square if square.size == (size, size) else square.resize((size, size), _BICUBIC))
    white = np.asarray(Image.new("RGB", (side, 1), (255, 255, 255)).resize((size, 1), _BICUBIC))[0]  # [size, 3]
    between = np.empty((side, size, 3), dtype=np.uint8)  # the horizontal pass of the whole square
    between[:] = white
    if w == side:  # wide: white rows above and below
        top = (side - h) // 2
        between[top : top + h] = np.asarray(Image.fromarray(image).resize((size, h), _BICUBIC))
    else:  # tall: white on the left and right of every row
        _horizontal_pass_of_padded_rows(image, (side - w) // 2, side, between)
    return np.asarray(Image.fromarray(between).resize((size, size), _BICUBIC))  # the vertical pass alone


_BICUBIC = Image.Resampling.BICUBIC
_PRECISION_BITS = 22  # PIL's fixed-point coefficients for 8-bit images (32 - 8 - 2)
_PADDED_ROWS_PIXELS = 1 << 21  # padded rows resized by PIL at once (about 6 MiB of RGB)


def _horizontal_pass_of_padded_rows(image: np.ndarray, left: int, side: int, out: np.ndarray) -> None:
    """Fill ``out`` ``[side, size, 3]`` (white already) with the horizontal pass of ``image``'s rows padded white to
    ``side`` columns, the image starting at column ``left``."""
    h, w = image.shape[:2]
    size = out.shape[1]
    taps = _pil_bicubic_taps(side, size)
    reaching = [o for o, (first, weights) in enumerate(taps) if first < left + w and first + len(weights) > left]
    if len(reaching) * 16 > size:  # a wide share of the output: PIL's pass over bands of padded rows is faster
        rows_at_once = max(1, _PADDED_ROWS_PIXELS // side)
        for start in range(0, h, rows_at_once):
            band = np.full((min(rows_at_once, h - start), side, 3), 255, dtype=np.uint8)
            band[:, left : left + w] = image[start : start + len(band)]
            out[start : start + len(band)] = np.asarray(Image.fromarray(band).resize((size, len(band)), _BICUBIC))
        return
    for o in reaching:
        first, weights = taps[o]
        total = np.full((h, 3), 1 << (_PRECISION_BITS - 1), dtype=np.int64)
        for column, weight in enumerate(weights, start=first):
            inside = left <= column < left + w
            total += image[:, column - left].astype(np.int64) * weight if inside else 255 * weight
        out[:, o] = np.clip(total >> _PRECISION_BITS, 0, 255)


def _pil_bicubic_taps(length: int, out: int) -> list[tuple[int, list[int]]]:
    """PIL's bicubic resize of ``length`` pixels to ``out``: per output, its first input and fixed-point weights.

    The arithmetic of Pillow's ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` (``Resample.c``), in the same
    order in double precision, so the weights are PIL's to the bit.
    """
    scale = length / out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    taps: list[tuple[int, list[int]]] = []
    for o in range(out):
        centre = 0.0 + (o + 0.5) * scale
        first = max(0, int(centre - support + 0.5))
        count = min(length, int(centre + support + 0.5)) - first
        raw = [_bicubic(((x + first) - centre + 0.5) * (1.0 / filterscale)) for x in range(count)]
        norm = 0.0
        for value in raw:
            norm += value
        fixed = [value / norm if norm != 0.0 else value for value in raw]
        taps.append((first, [int((-0.5 if v < 0 else 0.5) + v * (1 << _PRECISION_BITS)) for v in fixed]))
    return taps


def _bicubic(x: float) -> float:
    """PIL's bicubic kernel (a = -0.5), written as Pillow writes it."""
    a = -0.5
    x = -x if x < 0.0 else x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


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
