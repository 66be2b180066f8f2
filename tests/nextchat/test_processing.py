import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nextchat.processing import (
    ImageGeometry,
    box_of_mask,
    boxes_from_square,
    boxes_to_square,
    mask_logits_to_original,
    sam_pixel_values,
    vision_pixel_values,
)
from nextchat.resizing import expand_to_square, square_resized


SIZES = {"landscape": (200, 120), "portrait": (90, 160), "square": (128, 128)}


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_boxes_round_trip_between_original_and_square_frames(size: tuple[int, int]) -> None:
    geometry = ImageGeometry(*size)
    w, h = size
    boxes = np.array([[0, 0, w, h], [10.5, 20.25, 40, 60], [w - 5, h - 7, w, h]], dtype=np.float64)
    square = boxes_to_square(boxes, geometry)
    assert square.min() >= 0
    assert square.max() <= 1
    back = boxes_from_square(square, geometry)
    assert torch.allclose(back, torch.from_numpy(boxes), atol=1e-4)


def test_square_frame_puts_the_image_centred() -> None:
    geometry = ImageGeometry(200, 120)  # landscape: rows are padded by (200 - 120) // 2 = 40
    square = boxes_to_square(np.array([[0, 0, 200, 120]]), geometry)
    assert torch.allclose(square, torch.tensor([[0.0, 0.2, 1.0, 0.8]]))
    portrait = ImageGeometry(90, 160)  # columns padded by 35, as the official Expand2square
    assert torch.allclose(
        boxes_to_square(np.array([[10, 40, 70, 120]]), portrait), torch.tensor([[0.28125, 0.25, 0.65625, 0.75]])
    )


def test_output_boxes_are_clamped_and_ordered_inside_the_image() -> None:
    geometry = ImageGeometry(200, 120)
    raw = torch.tensor([[0.9, -0.2, 0.1, 1.3]])  # corners swapped and outside the picture
    assert boxes_from_square(raw, geometry)[0].tolist() == pytest.approx([20.0, 0.0, 180.0, 120.0], abs=1e-4)
    unclamped = boxes_from_square(raw, geometry, clamp=False)
    assert unclamped[0, 1] < 0


def test_expand_to_square_pads_white_around_the_centred_image() -> None:
    image = np.zeros((10, 30, 3), dtype=np.uint8)
    square = expand_to_square(image)
    assert square.shape == (30, 30, 3)
    assert (square[:10] == 255).all()
    assert (square[20:] == 255).all()
    assert (square[10:20] == 0).all()


def test_model_inputs_have_the_configured_sizes() -> None:
    image = np.full((60, 100, 3), 128, dtype=np.uint8)
    assert vision_pixel_values(image, 56).shape == (3, 56, 56)
    sam = sam_pixel_values(image, 64)
    assert sam.shape == (3, 64, 64)
    # Long side 100 → 64, short side 60 → 38 (rounded), zero padding of 13 rows above, centred.
    assert (sam[:, :13] == 0).all()
    assert (sam[:, 13 + 38 :] == 0).all()
    assert (sam[:, 13:51] != 0).all()


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_mask_logits_come_back_at_the_original_size_and_place(size: tuple[int, int]) -> None:
    w, h = size
    geometry = ImageGeometry(w, h)
    sam_size = 64
    # A SAM-frame logit map that is positive exactly on the padded image area's left half.
    low = torch.full((1, 1, 16, 16), -10.0)
    resized_w, resized_h = geometry.sam_resized_size(sam_size)
    left, top = geometry.sam_padding(sam_size)
    scale = 16 / sam_size
    low[
        ..., int(top * scale) : int((top + resized_h) * scale), int(left * scale) : int((left + resized_w / 2) * scale)
    ] = 10
    logits = mask_logits_to_original(low, geometry, sam_size)
    assert logits.shape == (1, h, w)
    mask = (logits[0] > 0).numpy()
    box = box_of_mask(mask)
    assert box is not None
    assert box[0] <= 0.1 * w
    assert abs(box[2] - w / 2) <= 0.15 * w


def test_box_of_mask_is_tight_with_exclusive_max() -> None:
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:9, 10:21] = True
    assert box_of_mask(mask) == (10.0, 5.0, 21.0, 9.0)
    assert box_of_mask(np.zeros((4, 4), dtype=bool)) is None


def square_then_resized(image: np.ndarray, size: int) -> np.ndarray:
    """The official order, in full: the white ``L × L`` square, then PIL's bicubic resize."""
    return np.asarray(Image.fromarray(expand_to_square(image)).resize((size, size), Image.Resampling.BICUBIC))


# (height, width, size): wide; tall and narrow (a few output columns reach the image); tall and wide (PIL's pass in
# bands); upscaled (square no larger than the output); odd sizes whose scales are not round.
RESIZE_CASES = [(8, 2048, 224), (1000, 9, 336), (1200, 7, 56), (545, 229, 224), (797, 351, 336), (40, 30, 56)]
RESIZE_CASES += [(1277, 958, 224), (58, 1149, 336), (1335, 116, 448), (668, 229, 448)]


@pytest.mark.parametrize(("height", "width", "size"), RESIZE_CASES)
def test_square_resized_is_pil_on_the_full_square_bit_for_bit(height: int, width: int, size: int) -> None:
    image = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert np.array_equal(square_resized(image, size), square_then_resized(image, size))


@pytest.mark.parametrize("shape", [(8, 16384), (16384, 8)], ids=["wide", "tall"])
def test_vision_input_of_a_long_thin_image_never_builds_the_square(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    tracemalloc.start()
    try:
        pixels = vision_pixel_values(image, 336)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pixels.shape == (3, 336, 336)
    assert peak < 64 << 20  # numpy's allocations (the 16384² square alone was 768 MiB)


def full_square_mask_logits(low_res: torch.Tensor, geometry: ImageGeometry, sam_size: int) -> torch.Tensor:
    """The official order, in full: bilinear to S × S, to L × L, then the crop."""
    x = F.interpolate(low_res.float(), (sam_size, sam_size), mode="bilinear", align_corners=False)
    x = F.interpolate(x, (geometry.side, geometry.side), mode="bilinear", align_corners=False)[:, 0]
    left, top = geometry.square_offset
    return x[:, top : top + geometry.height, left : left + geometry.width]


@pytest.mark.parametrize("size", [(2000, 9), (9, 2000), (333, 517), (700, 700), (40, 25)])
def test_mask_logits_match_the_full_square_computation(size: tuple[int, int]) -> None:
    geometry = ImageGeometry(*size)
    low = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(sum(size))) * 10
    logits = mask_logits_to_original(low, geometry, 64)
    torch.testing.assert_close(logits, full_square_mask_logits(low, geometry, 64), atol=1e-4, rtol=1e-4)


def test_a_side_too_thin_for_the_sam_frame_keeps_one_pixel() -> None:
    geometry = ImageGeometry(16384, 8)  # 8 × 256 / 16384 = 0.125 rows: the official resize fails here
    assert geometry.sam_resized_size(256) == (256, 1)
    assert geometry.sam_padding(256) == (0, 127)
    assert sam_pixel_values(np.zeros((8, 16384, 3), dtype=np.uint8), 256).shape == (3, 256, 256)
