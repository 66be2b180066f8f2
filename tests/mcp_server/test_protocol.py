"""The tools' mechanics through the in-memory MCP client, in both protocol modes, on a tiny random model.

What the random model says means nothing; these tests check the contract around it: schemas, handles and ids that
chain across tools, masks as resources, RLE, overlays, errors that say what to change. Behaviour on real pixels is
tested with the demo model in test_tools.py.
"""

import base64
import io

import numpy as np
import pytest
from mcp import Client, MCPError
from PIL import Image
from support import call, error_text, png_data_uri

from mcp_server.rendering import decode_coco_rle


pytestmark = pytest.mark.anyio


@pytest.fixture(params=["auto", "legacy"])
async def client(request: pytest.FixtureRequest, tiny_server):
    async with Client(tiny_server, mode=request.param) as connected:
        yield connected


async def read_png(client: Client, uri: str) -> np.ndarray:
    resource = await client.read_resource(uri)
    assert resource.contents[0].mime_type == "image/png"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(resource.contents[0].blob))))


async def test_every_tool_has_a_title_read_only_annotations_and_an_output_schema(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {"locate_objects", "segment_object", "describe_region", "visual_qa", "status"}
    for tool in tools.values():
        assert tool.title and tool.description and tool.output_schema
        assert tool.annotations.read_only_hint and tool.annotations.idempotent_hint
    templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
    assert templates == {"mask://{mask_id}.png", "overlay://{overlay_id}.jpg"}


async def test_ids_chain_from_locate_to_segment_and_describe(client: Client, scenes, image_dir) -> None:
    path = str(image_dir / "scene0.png")
    located = await call(client, "segment_object", {"image": path, "query": "the red circle"})
    image = located["image"]
    assert (image["width"], image["height"]) == (scenes[0].width, scenes[0].height)
    assert image["id"].startswith("img_") and len(image["sha256_prefix"]) == 16
    object_id = located["object_id"]
    again = await call(client, "segment_object", {"image": image["id"], "object_id": object_id})
    assert again["object_id"] == object_id and again["prompt_box"] == located["prompt_box"]
    assert again["iou_prediction"] == pytest.approx(located["iou_prediction"], abs=1e-6)  # the stored state, reused
    region = await call(client, "describe_region", {"image": image["id"], "object_id": object_id})
    assert region["region"]["object_id"] == object_id and region["region"]["box"] == located["prompt_box"]
    same_bytes = await call(client, "locate_objects", {"image": path, "query": "the blue square"})
    assert same_bytes["image"]["id"] == image["id"]  # the same image content keeps its handle


async def test_a_mask_is_a_png_resource_of_the_image_size_matching_its_rle_and_area(client: Client, scenes) -> None:
    scene = scenes[1]
    result = await call(client, "segment_object", {"image": png_data_uri(scene.image), "box": [5, 5, 60, 50]})
    mask = await read_png(client, result["mask_uri"])
    assert mask.shape == (scene.height, scene.width) and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(decode_coco_rle(result["rle"]), mask > 127)
    assert result["area_px"] == int((mask > 127).sum())
    assert result["area_fraction"] == pytest.approx(result["area_px"] / mask.size, abs=1e-6)
    assert result["filtered_low_iou"] == (result["iou_prediction"] < 0.3)
    assert result["empty"] == (result["area_px"] == 0) == (result["box"] is None)
    assert result["object_id"] is None and result["prompt_box"] == [5, 5, 60, 50]


async def test_boxes_are_pixels_in_the_image_with_a_normalized_twin(client: Client, scenes) -> None:
    scene = scenes[2]
    result = await call(client, "visual_qa", {"image": png_data_uri(scene.image), "question": "What is here?"})
    located = await call(client, "segment_object", {"image": result["image"]["id"], "query": "the shape"})
    x1, y1, x2, y2 = located["prompt_box"]
    assert 0 <= x1 <= x2 <= scene.width and 0 <= y1 <= y2 <= scene.height
    space = located["coordinate_space"]
    assert (space["units"], space["origin"], space["image_width"]) == ("px", "top-left", scene.width)
    for obj in result["evidence"]:
        scale = [scene.width, scene.height, scene.width, scene.height]
        assert obj["box_normalized"] == pytest.approx([v / s for v, s in zip(obj["box"], scale, strict=True)], abs=1e-4)


async def test_overlay_is_a_small_jpeg_as_content_and_as_a_resource(client: Client, image_dir) -> None:
    result = await client.call_tool(
        "segment_object", {"image": str(image_dir / "scene3.png"), "box": [10, 10, 80, 80], "overlay": True}
    )
    assert not result.is_error
    assert [b.type for b in result.content] == ["text", "image", "resource_link", "resource_link"]
    picture = result.content[1]
    jpeg = base64.b64decode(picture.data)
    assert picture.mime_type == "image/jpeg" and len(jpeg) < 300_000
    assert max(Image.open(io.BytesIO(jpeg)).size) <= 1568
    overlay = await client.read_resource(result.structured_content["overlay_uri"])
    assert overlay.contents[0].mime_type == "image/jpeg"


async def test_fixable_mistakes_are_tool_errors_that_say_what_to_change(client: Client, image_dir, tmp_path) -> None:
    path = str(image_dir / "scene0.png")
    assert "allowed director" in await error_text(
        client, "locate_objects", {"image": str(tmp_path / "a.png"), "query": "a"}
    )
    handle = "img_" + "0" * 32
    assert "expired or was never issued" in await error_text(client, "locate_objects", {"image": handle, "query": "a"})
    image_id = (await call(client, "locate_objects", {"image": path, "query": "the thing"}))["image"]["id"]
    assert "call locate_objects again" in await error_text(
        client, "segment_object", {"image": image_id, "object_id": "o999"}
    )
    both = {"image": image_id, "object_id": "o1", "box": [0, 0, 5, 5]}
    assert "exactly one" in await error_text(client, "segment_object", both)
    outside = {"image": image_id, "box": [5000, 5000, 6000, 6000]}
    assert "outside the" in await error_text(client, "describe_region", outside)
    assert "x1 < x2" in await error_text(client, "describe_region", {"image": image_id, "box": [50, 10, 20, 40]})
    invalid = await client.call_tool("locate_objects", {"image": path, "query": "x", "max_objects": "3"})
    assert invalid.is_error  # strict: a string is not an int
    with pytest.raises(MCPError, match="mask not found"):
        await client.read_resource("mask://" + "0" * 32 + ".png")


async def test_status_reports_the_model_device_and_queue(client: Client) -> None:
    status = await call(client, "status", {})
    assert status["state"] == "ready" and status["device"] == "cpu" and status["dtype"] == "float32"
    assert status["queue_depth"] == 0 and status["handle_lifetime_s"] == 3600
