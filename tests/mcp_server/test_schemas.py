"""The tool schemas: the committed copies in tools_schema/ are what the server publishes, and what it publishes is the
contract clients are written against (argument names and types, which are required, result fields)."""

import json
from pathlib import Path

import pytest

from mcp_server.schema_files import published_tools


SCHEMAS = Path(__file__).resolve().parents[2] / "tools_schema"
IMAGE_TOOLS = ("locate_objects", "segment_object", "describe_region", "visual_qa")
# Each tool's arguments and their JSON types ("string|null": optional, may be null).
ARGUMENTS = {
    "locate_objects": {"image": "string", "query": "string", "max_objects": "integer", "overlay": "boolean"},
    "segment_object": {
        "image": "string",
        "object_id": "string|null",
        "box": "array|null",
        "query": "string|null",
        "overlay": "boolean",
    },
    "describe_region": {
        "image": "string",
        "object_id": "string|null",
        "box": "array|null",
        "question": "string|null",
        "overlay": "boolean",
    },
    "visual_qa": {"image": "string", "question": "string", "ground": "boolean", "overlay": "boolean"},
    "status": {},
}
REQUIRED = {
    "locate_objects": {"image", "query"},
    "segment_object": {"image"},
    "describe_region": {"image"},
    "visual_qa": {"image", "question"},
    "status": set(),
}
IMAGE_RESULT = {"warnings", "image", "coordinate_space", "provenance", "overlay_uri"}
RESULTS = {
    "locate_objects": IMAGE_RESULT | {"query", "found", "objects", "explanation"},
    "segment_object": IMAGE_RESULT
    | {"object_id", "phrase", "mask_uri", "empty", "box", "box_normalized", "prompt_box", "area_px", "area_fraction"}
    | {"iou_prediction", "rle", "filtered_low_iou", "prompt_box_clipped", "box_margin_px"},
    "describe_region": IMAGE_RESULT | {"region", "question", "description", "objects"},
    "visual_qa": IMAGE_RESULT | {"question", "answer", "grounded", "evidence"},
    "status": {"model", "note", "device", "dtype", "state", "error", "queue_depth", "running", "uptime_s"}
    | {"images_cached", "handle_lifetime_s"},
}


@pytest.fixture(scope="module")
def published() -> dict[str, dict]:
    return published_tools()


def json_types(prop: dict) -> str:
    return "|".join(json_types(branch) for branch in prop["anyOf"]) if "anyOf" in prop else prop["type"]


def test_committed_tool_schemas_match_what_the_server_publishes(published: dict[str, dict]) -> None:
    committed = {p.stem: json.loads(p.read_text()) for p in SCHEMAS.glob("*.json")}
    assert committed.keys() == published.keys(), "run: python -m mcp_server.schema_files --write"
    for name, tool in published.items():
        assert committed[name] == tool, (
            f"tools_schema/{name}.json is stale; run: python -m mcp_server.schema_files --write"
        )


def test_the_server_publishes_the_four_image_tools_and_status(published: dict[str, dict]) -> None:
    assert set(published) == {*IMAGE_TOOLS, "status"}


@pytest.mark.parametrize("name", sorted(ARGUMENTS))
def test_each_tool_takes_exactly_its_arguments_with_their_types_and_requires_only_its_own(
    published: dict[str, dict], name: str
) -> None:
    inputs = published[name]["inputSchema"]
    assert inputs["type"] == "object"
    assert {arg: json_types(prop) for arg, prop in inputs["properties"].items()} == ARGUMENTS[name]
    assert set(inputs.get("required", [])) == REQUIRED[name]


@pytest.mark.parametrize("name", IMAGE_TOOLS)
def test_the_image_argument_is_one_bounded_string_on_every_image_tool(published: dict[str, dict], name: str) -> None:
    image = published[name]["inputSchema"]["properties"]["image"]
    assert (image["type"], image["minLength"], image["maxLength"]) == ("string", 1, 40_000_000)
    assert "image id" in image["description"] and "https:// URL" in image["description"]


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_each_tool_publishes_an_output_schema_with_exactly_its_result_fields(
    published: dict[str, dict], name: str
) -> None:
    output = published[name]["outputSchema"]
    assert output["type"] == "object" and output["additionalProperties"] is False
    assert set(output["properties"]) == RESULTS[name]
    assert set(output["required"]) == RESULTS[name] - {"overlay_uri"}  # an overlay is only there when asked for


def test_every_tool_is_read_only_and_only_the_image_tools_reach_the_open_world(published: dict[str, dict]) -> None:
    for name, tool in published.items():
        hints = tool["annotations"]
        assert hints["readOnlyHint"] is True and hints["destructiveHint"] is False, name
        assert hints["openWorldHint"] is (name in IMAGE_TOOLS), name  # an image may be an https URL
