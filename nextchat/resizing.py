"""The first resize of an image for each of the model's two branches: numpy and Pillow only, no torch.

These are the steps whose cost grows with the image: they run where untrusted images are decoded (the server's
decode workers), and :mod:`nextchat.processing` takes their results to the model's tensors. Frames as in
:mod:`nextchat.processing`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


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


@dataclass(frozen=True)
class InputSides:
    """The sides of the model's two image inputs: the vision tower's square and SAM's (its long side)."""

    vision: int
    sam: int


@dataclass(frozen=True)
class ResizedImage:
    """An image's first resize for each branch, made once, where it was decoded.

    Only a branch whose input is smaller than the image gets one: that resize costs work (and the image held before
    it, memory) in proportion to the image. Enlarging a smaller image costs no more than the model's input size, and
    its result would be larger than the image it came from, so that is left to the model's side.

    Attributes:
        sides: what they were made for.
        square: RGB uint8 ``[vision, vision, 3]`` (:func:`square_resized`), or ``None``.
        sam: RGB uint8 ``[h, w, 3]`` with long side ``sam`` (:func:`sam_resized_image`), or ``None``.
    """

    sides: InputSides
    square: np.ndarray | None
    sam: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return sum(int(array.nbytes) for array in (self.square, self.sam) if array is not None)


def resize_for_model(image: np.ndarray, sides: InputSides) -> ResizedImage:
    """The first resizes of an RGB uint8 ``[H, W, 3]`` image that shrink it (see :class:`ResizedImage`)."""
    side = max(image.shape[:2])
    return ResizedImage(
        sides,
        square_resized(image, sides.vision) if side > sides.vision else None,
        sam_resized_image(image, sides.sam) if side > sides.sam else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# LLM branch: expand to square (white), then resize (PIL bicubic).


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
# SAM branch: resize the long side (PIL bilinear).


def sam_resized_image(image: np.ndarray, sam_size: int) -> np.ndarray:
    """RGB uint8 ``[h, w, 3]`` resized (bilinear, PIL) so its long side is ``sam_size``."""
    geometry = ImageGeometry(image.shape[1], image.shape[0])
    w, h = geometry.sam_resized_size(sam_size)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
