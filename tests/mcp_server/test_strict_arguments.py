"""Strict arguments: every unknown or misspelt key of every tool is refused by name, with the closest valid one;
blank text is refused like empty text; the published input schemas say ``additionalProperties: false``."""

import numpy as np
import pytest
from mcp import Client
from support import error_text

from mcp_server.schema_files import published_tools


pytestmark = pytest.mark.anyio

VALID = {
    "locate_objects": {"image": "img_" + "0" * 32, "query": "the red circle"},
    "segment_object": {"image": "img_" + "0" * 32, "box": [0, 0, 10, 10]},
    "describe_region": {"image": "img_" + "0" * 32, "box": [0, 0, 10, 10]},
    "visual_qa": {"image": "img_" + "0" * 32, "question": "How many shapes are there?"},
    "status": {},
}


def misspellings(key: str, rng: np.random.Generator) -> list[str]:
    """Typos an agent makes: a letter dropped, doubled, swapped or changed, a plural, a past tense, another case,
    underscores removed or turned into dashes."""
    out = {key + "s", key + "ed", key.upper(), key.capitalize(), key.replace("_", ""), key.replace("_", "-")}
    for _ in range(6):
        i = int(rng.integers(len(key)))
        out.add(key[:i] + key[i + 1 :])
        out.add(key[:i] + key[i] + key[i:])
        out.add(key[:i] + chr(int(rng.integers(97, 123))) + key[i + 1 :])
        if i + 1 < len(key):
            out.add(key[:i] + key[i + 1] + key[i] + key[i + 2 :])
    return sorted(out - {key, ""})


def random_keys(rng: np.random.Generator, n: int) -> list[str]:
    alphabet = list("abcdefghijklmnopqrstuvwxyz_-0123456789 ")
    return ["".join(rng.choice(alphabet, size=int(rng.integers(1, 12)))) for _ in range(n)] + [
        "foo",
        "max_object",
        "overlays",
        "__proto__",
        "ctx",
        "é",
    ]


@pytest.fixture
async def client(tiny_server):
    async with Client(tiny_server) as connected:
        yield connected


def test_every_published_input_schema_forbids_unknown_keys() -> None:
    for name, tool in published_tools().items():
        assert tool["inputSchema"]["additionalProperties"] is False, name


async def test_misspelt_keys_of_every_tool_are_refused_with_their_name_and_the_key_they_meant(client: Client) -> None:
    rng = np.random.default_rng(16)
    tools = {t.name: t for t in (await client.list_tools()).tools}
    checked = 0
    for name, valid in VALID.items():
        names = list(tools[name].input_schema["properties"])
        for key in names:
            for typo in misspellings(key, rng):
                if typo in names:
                    continue
                text = await error_text(client, name, {**valid, typo: True})
                assert f"unknown argument {typo!r}" in text, (name, typo, text)
                assert "did you mean '" in text, (name, typo, text)
                suggested = text.split("did you mean '")[1].split("'")[0]
                assert suggested in names, (name, typo, text)
                checked += 1
    assert checked > 150


async def test_random_unknown_keys_of_every_tool_are_refused_with_their_name(client: Client) -> None:
    rng = np.random.default_rng(1616)
    for name, valid in VALID.items():
        for key in random_keys(rng, 12):
            if key in valid or key.strip() in ("image", "query", "box", "object_id", "overlay", "question", "ground"):
                continue
            text = await error_text(client, name, {**valid, key: 1})
            assert f"unknown argument {key!r}" in text, (name, key, text)
            assert "this tool takes:" in text


async def test_the_reported_misspellings_get_the_sentence_the_issue_asks_for(client: Client) -> None:
    text = await error_text(client, "visual_qa", {**VALID["visual_qa"], "grounded": False})
    assert "unknown argument 'grounded'; did you mean 'ground'?" in text
    text = await error_text(client, "segment_object", {"image": VALID["segment_object"]["image"], "objectid": "o1"})
    assert "unknown argument 'objectid'; did you mean 'object_id'?" in text
    text = await error_text(client, "locate_objects", {**VALID["locate_objects"], "max_object": 3})
    assert "did you mean 'max_objects'?" in text


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("locate_objects", {"query": "   "}),
        ("segment_object", {"query": "\t\n "}),
        ("visual_qa", {"question": "  "}),
        ("describe_region", {"box": [0, 0, 10, 10], "question": " \u3000 "}),
    ],
)
async def test_blank_text_is_refused_like_empty_text(client: Client, tool: str, arguments: dict) -> None:
    text = await error_text(client, tool, {"image": VALID["locate_objects"]["image"], **arguments})
    assert "is blank (only whitespace); give some words" in text


async def test_server_info_carries_the_package_version(tiny_server) -> None:
    import importlib.metadata

    async with Client(tiny_server, mode="legacy") as legacy:
        assert legacy.server_info is not None
        assert legacy.server_info.version == importlib.metadata.version("nextchat-mcp")
