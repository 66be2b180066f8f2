"""Every result says which model answered and what it knows; on the demo model, an image outside the shapes world
carries a warning in every tool's result, so `found` is never true there without one (in-memory client).

Figures the done-when lines ask for: on 42 procedural non-shapes images (seven of each kind of
``tests/non_shapes.py``) every tool's result carries the warning (at least 95 % asserted); on held-out shapes scenes
none does (at most 1 % asserted; 500 scenes for the check itself in ``tests/demo/test_world_check.py``).
"""

import json

import numpy as np
import pytest
from mcp import Client
from non_shapes import non_shapes_images
from support import call, png_data_uri

from mcp_server.server import create_server
from mcp_server.settings import Settings
from nextchat.demo.evaluate import held_out_scenes
from nextchat.scopes import DEMO, NEXTCHAT, RANDOM_WEIGHTS


pytestmark = pytest.mark.anyio
IMAGE_TOOLS = ("locate_objects", "segment_object", "describe_region", "visual_qa")
OUT_OF_WORLD = "does not look like the demo model's shapes world"


@pytest.fixture
async def client(demo_server):
    async with Client(demo_server) as connected:
        yield connected


async def every_tool(client: Client, pixels: np.ndarray, query: str) -> dict[str, dict]:
    """Each image tool's result on one image: locate sends it, the others use its handle."""
    located = await call(client, "locate_objects", {"image": png_data_uri(pixels), "query": query})
    image = located["image"]["id"]
    height, width = pixels.shape[:2]
    box = [width * 0.25, height * 0.25, width * 0.75, height * 0.75]
    return {
        "locate_objects": located,
        "segment_object": await call(client, "segment_object", {"image": image, "box": box}),
        "describe_region": await call(client, "describe_region", {"image": image, "box": box}),
        "visual_qa": await call(client, "visual_qa", {"image": image, "question": "How many shapes are there?"}),
    }


async def test_out_of_world_images_carry_the_warning_in_every_tool(client: Client) -> None:
    images = non_shapes_images(42, seed=7)
    results = [await every_tool(client, pixels, "the red circle") for _, pixels in images]
    warned = [[OUT_OF_WORLD in " ".join(r[tool]["warnings"]) for tool in IMAGE_TOOLS] for r in results]
    share = float(np.mean(warned))
    found_without_warning = sum(r["locate_objects"]["found"] and not r["locate_objects"]["warnings"] for r in results)
    print(f"non-shapes images: {share:.1%} of {4 * len(images)} tool results carry the warning")
    assert share >= 0.95
    assert found_without_warning == 0
    for result in results:
        for tool in IMAGE_TOOLS:
            assert result[tool]["provenance"]["scope"] == DEMO.scope


async def test_shapes_scenes_carry_no_warning(client: Client) -> None:
    scenes = held_out_scenes(12, seed=23)
    results = [await every_tool(client, scene.image, f"the {scene.objects[0].name}") for scene in scenes]
    warned = sum(bool(r[tool]["warnings"]) for r in results for tool in IMAGE_TOOLS)
    assert warned <= 0.01 * 4 * len(scenes)
    assert all(r[tool]["provenance"]["scope"] == DEMO.scope for r in results for tool in IMAGE_TOOLS)


async def test_the_text_content_mirrors_the_warnings(client: Client) -> None:
    noise = np.random.default_rng(6).integers(0, 256, (180, 220, 3), dtype=np.uint8)
    result = await client.call_tool("locate_objects", {"image": png_data_uri(noise), "query": "the blue square"})
    text = json.loads(result.content[0].text)
    assert text["warnings"] == result.structured_content["warnings"] and OUT_OF_WORLD in text["warnings"][0]


async def test_the_instructions_descriptions_and_status_name_the_demo_scope(client: Client, demo_server) -> None:
    assert DEMO.scope in (demo_server.instructions or "")
    for tool in (await client.list_tools()).tools:
        assert (DEMO.scope in (tool.description or "")) is (tool.name in IMAGE_TOOLS), tool.name
    status = await call(client, "status", {})
    assert status["note"] == DEMO.scope


@pytest.mark.parametrize(
    ("model", "scope"), [("AoZhang/nextchat-7b-336", NEXTCHAT), ("tiny-checkpoint", RANDOM_WEIGHTS)]
)
async def test_another_model_gets_its_own_scope_before_it_loads(model, scope, tiny_checkpoint) -> None:
    model = str(tiny_checkpoint) if model == "tiny-checkpoint" else model
    server = create_server(Settings(model=model, device="cpu"))  # nothing loads until a connection opens
    assert scope.scope in (server.instructions or "") and DEMO.scope not in (server.instructions or "")
    for tool in await server.list_tools():
        assert (scope.scope in (tool.description or "")) is (tool.name in IMAGE_TOOLS), tool.name
    server.app.decoder.close()
