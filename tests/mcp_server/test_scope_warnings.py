"""Every result names its model's scope; on the demo model an image outside the shapes world carries a warning,
so `found` is never true there without one (in-memory client, demo model)."""

import numpy as np
import pytest
from mcp import Client
from non_shapes import non_shapes_images
from support import call, png_data_uri

from nextchat.demo.in_world import SCOPE


pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(demo_server):
    async with Client(demo_server) as connected:
        yield connected


async def test_out_of_world_images_carry_the_warning_whatever_the_tool(client: Client) -> None:
    images = non_shapes_images(10, seed=7)
    found_without_warning = 0
    for index, image in enumerate(images):
        located = await call(client, "locate_objects", {"image": png_data_uri(image), "query": "the red circle"})
        provenance = located["provenance"]
        assert provenance["scope"] == SCOPE
        found_without_warning += located["found"] and not provenance["warnings"]
        assert provenance["warnings"] and "outside the demo model's world" in provenance["warnings"][0], index
        image_id = located["image"]["id"]  # a handle carries the warning too
        answered = await call(client, "visual_qa", {"image": image_id, "question": "How many shapes are there?"})
        assert answered["provenance"]["warnings"]
    assert found_without_warning == 0


async def test_shapes_scenes_carry_no_warning(client: Client, scenes) -> None:
    for scene in scenes:
        image = png_data_uri(np.asarray(scene.image))
        located = await call(client, "locate_objects", {"image": image, "query": f"the {scene.objects[0].name}"})
        assert located["provenance"]["warnings"] == [] and located["provenance"]["scope"] == SCOPE
        masked = await call(client, "segment_object", {"image": located["image"]["id"], "box": [0, 0, 40, 40]})
        assert masked["provenance"]["warnings"] == []
