"""segment_object's flags are true on held-out shapes scenes (demo model, in-memory client): ``empty`` agrees with
the PNG, a caller's box keeps its mask within the stated margin, a box past the image is clipped and says so."""

import base64
import io

import numpy as np
import pytest
from mcp import Client
from PIL import Image
from support import call, error_text, png_data_uri

from mcp_server.box_masks import components_touching, keep_in_box, margin_px
from nextchat.demo.evaluate import held_out_scenes


pytestmark = pytest.mark.anyio

SCENES = 200


@pytest.fixture
async def client(demo_server):
    async with Client(demo_server) as connected:
        yield connected


async def read_mask(client: Client, uri: str) -> np.ndarray:
    """The mask resource as bool ``[H, W]``."""
    blob = (await client.read_resource(uri)).contents[0].blob
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(blob)))) > 127


def prompt_for(scene, index: int, rng: np.random.Generator) -> list[float]:
    """A caller's box of four kinds in turn: around an object, anywhere, reaching past the image, a background
    corner."""
    w, h = scene.width, scene.height
    kind = index % 4
    if kind == 0:
        x1, y1, x2, y2 = scene.objects[int(rng.integers(len(scene.objects)))].box
        return [x1 - 3, y1 - 3, x2 + 3, y2 + 3]
    if kind == 1:
        x1, y1 = float(rng.uniform(0, w - 20)), float(rng.uniform(0, h - 20))
        return [x1, y1, float(rng.uniform(x1 + 10, w)), float(rng.uniform(y1 + 10, h))]
    if kind == 2:
        x1, y1 = float(rng.uniform(0, w - 20)), float(rng.uniform(0, h - 20))
        return [x1, y1, x1 + w, y1 + h]
    return [0.0, 0.0, 50.0, 50.0]


def outside_margin(mask: np.ndarray, box: list[float], margin: int) -> int:
    """Mask pixels whose centre lies farther than ``margin`` outside ``box``."""
    rows, cols = np.nonzero(mask)
    x, y = cols + 0.5, rows + 0.5
    far = (x < box[0] - margin) | (x > box[2] + margin) | (y < box[1] - margin) | (y > box[3] + margin)
    return int(far.sum())


async def test_empty_agrees_with_the_png_and_box_masks_stay_within_the_margin(client: Client) -> None:
    rng = np.random.default_rng(16)
    counts = {"empty": 0, "filtered": 0, "clipped": 0, "masks": 0, "object_masks": 0}
    for index, scene in enumerate(held_out_scenes(SCENES, seed=16)):
        box = prompt_for(scene, index, rng)
        arguments = {"image": png_data_uri(scene.image), "box": box}
        result = await call(client, "segment_object", arguments)
        mask = await read_mask(client, result["mask_uri"])
        counts["masks"] += 1
        assert result["empty"] == (not mask.any()), (index, result)
        assert (result["box"] is None) == result["empty"] and result["area_px"] == int(mask.sum())
        counts["empty"] += result["empty"]
        if index % 4 == 0:  # a box around an object: the filter must leave its mask
            counts["object_masks"] += not result["empty"]
        counts["filtered"] += result["filtered_low_iou"]
        assert not result["filtered_low_iou"] or result["empty"]
        clipped = [max(0.0, box[0]), max(0.0, box[1]), min(scene.width, box[2]), min(scene.height, box[3])]
        assert result["prompt_box_clipped"] == (clipped != box), (index, box)
        counts["clipped"] += result["prompt_box_clipped"]
        assert result["prompt_box"] == pytest.approx(clipped, abs=0.06)
        assert result["box_margin_px"] == margin_px(clipped)
        assert outside_margin(mask, clipped, result["box_margin_px"]) == 0, (index, box)
        if index % 20 == 0:  # masks from an object id too: empty must agree with the PNG for them as well
            target = scene.objects[0].name
            by_query = await call(client, "segment_object", {"image": result["image"]["id"], "query": f"the {target}"})
            query_mask = await read_mask(client, by_query["mask_uri"])
            assert by_query["empty"] == (not query_mask.any()) and by_query["box_margin_px"] is None
            counts["masks"] += 1
    assert counts["clipped"] >= SCENES // 4  # every box of the third kind reaches past the image
    assert counts["empty"] > 0  # background corners: the case the flag used to get wrong
    assert counts["object_masks"] >= 0.95 * SCENES / 4
    print(f"segment flags: {counts}")


async def test_a_background_box_does_not_return_another_objects_mask(client: Client, scenes) -> None:
    scene = scenes[0]
    # A box well away from every object: whatever SAM answers, nothing of the mask lies beyond the box's margin.
    free = np.ones((scene.height, scene.width), dtype=bool)
    for obj in scene.objects:
        x1, y1, x2, y2 = (int(v) for v in obj.box)
        free[max(0, y1 - 30) : y2 + 30, max(0, x1 - 30) : x2 + 30] = False
    rows, cols = np.nonzero(free[: scene.height - 20, : scene.width - 20])
    assert rows.size, "the scene has no free corner"
    box = [float(cols[0]), float(rows[0]), float(cols[0]) + 20, float(rows[0]) + 20]
    result = await call(client, "segment_object", {"image": png_data_uri(scene.image), "box": box})
    mask = await read_mask(client, result["mask_uri"])
    assert outside_margin(mask, box, result["box_margin_px"]) == 0


async def test_a_box_missing_the_image_is_an_error_naming_the_image_size(client: Client, scenes) -> None:
    scene = scenes[0]
    text = await error_text(client, "segment_object", {"image": png_data_uri(scene.image), "box": [-90, -90, -10, -5]})
    assert f"outside the {scene.width}x{scene.height} image" in text


async def test_describe_region_says_when_the_box_was_clipped(client: Client, scenes) -> None:
    scene = scenes[0]
    box = [scene.width - 40.0, scene.height - 40.0, scene.width + 100.0, scene.height + 100.0]
    result = await call(client, "describe_region", {"image": png_data_uri(scene.image), "box": box})
    assert result["region"]["clipped"] is True
    assert result["region"]["box"] == [scene.width - 40.0, scene.height - 40.0, scene.width, scene.height]


def test_keep_in_box_keeps_only_components_that_overlap_the_box() -> None:
    mask = np.zeros((100, 100), dtype=bool)
    mask[10:28, 10:28] = True  # overlaps the box, reaches 3 px past it: kept whole (the margin is 4 px)
    mask[10:20, 30:33] = True  # inside the margin, but not touching the box's component: dropped
    mask[60:90, 60:90] = True  # far away: dropped
    kept = keep_in_box(mask, [5, 5, 25, 25])
    assert kept[10:28, 10:28].all() and kept.sum() == 18 * 18
    big = np.zeros((100, 100), dtype=bool)
    big[0:100, 20:30] = True  # crosses the box and runs far past it: cut at the margin
    cut = keep_in_box(big, [10, 40, 50, 60])
    assert cut[36:64, 20:30].all() and cut.sum() == 28 * 10


def test_components_join_diagonal_neighbours() -> None:
    region = np.eye(6, dtype=bool)
    seeds = np.zeros_like(region)
    seeds[0, 0] = True
    assert np.array_equal(components_touching(region, seeds), region)
