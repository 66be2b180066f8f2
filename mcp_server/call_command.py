"""``nextchat-mcp call TOOL 'JSON' [--save DIR] [options]``: run one tool in-process and print its structured result.

The call goes through the same server as a client's would (the in-memory SDK client), with one difference: the model
loads only when the tool needs it. So whatever can be wrong with the call itself (an unknown tool, arguments that
are not JSON, an unknown or misspelt key, a path outside ``--allow-dir`` or missing, an image that does not decode)
is answered at once, without waiting minutes for a checkpoint to load. Once it loads, the call waits for it to
finish loading however long that takes (a "retry later" would only load it again).

Masks and overlays are resources (``mask://``, ``overlay://``) that die with the process: ``--save DIR`` writes
them to files and prints their paths on stderr, keeping stdout the result's JSON.
"""

from __future__ import annotations

import base64
import difflib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from mcp_server.settings import OptionParser, Settings


EXIT_TOOL_ERROR = 1
EXIT_USAGE = 2
# How long `call` waits for its model to load: loading is part of the command, so this only bounds a hung load.
CALL_LOAD_WAIT_S = 3600.0
SAVED_RESOURCES = ("mask_uri", "overlay_uri")  # result fields that name a picture the call made


class UsageError(Exception):
    """A mistake in the command line, answered in one line with exit status 2 before any model work."""


@dataclass
class CallOutcome:
    """What one call printed: its structured result or error text, and the files it saved."""

    structured: dict[str, Any] | None
    text: str
    is_error: bool
    saved: list[Path] = field(default_factory=list[Path])


def parse_arguments(text: str) -> dict[str, Any]:
    """The tool's arguments: a JSON object."""
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError as error:
        example = '{"query": "the dog"}'
        raise UsageError(f"arguments are not JSON: {error}; pass one JSON object, e.g. '{example}'") from None
    if not isinstance(arguments, dict):
        raise UsageError(f"arguments must be a JSON object, not {type(arguments).__name__}; e.g. '{{}}'")
    return arguments  # pyright: ignore[reportUnknownVariableType]  # JSON objects have string keys


def save_directory(text: str | None) -> Path | None:
    """The ``--save`` directory, created if missing; refused when it cannot be made or is not a directory."""
    if text is None:
        return None
    directory = Path(text).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        problem = f"cannot create the directory ({error.strerror})"
        raise UsageError(f"--save {text}: {problem}; pass a writable directory") from None
    if not directory.is_dir():
        raise UsageError(f"--save {text} is not a directory; pass a directory")
    return directory


def check_tool(name: str, tools: list[str]) -> None:
    """Refuse a tool the server does not have, naming the closest one."""
    if name in tools:
        return
    close = difflib.get_close_matches(name, tools, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"unknown tool {name[:60]!r}{hint} (tools: {', '.join(tools)})")


async def call_tool(
    settings: Settings, tool: str, arguments: dict[str, Any], save_dir: Path | None = None
) -> CallOutcome:
    """Run one tool through the server in-process; the model loads only if the tool gets as far as needing it.

    Raises:
        UsageError: ``tool`` is not one of the server's tools.
    """
    from mcp import Client

    from mcp_server.server import create_server

    server = create_server(settings.model_copy(update={"ready_wait_s": CALL_LOAD_WAIT_S}), load_model_at_start=False)
    check_tool(tool, list(server.argument_names))
    app = server.app
    try:
        async with Client(server) as client:
            if tool == "status":  # the status of a model that never loaded would say little
                app.start()
                await app.executor.wait_ready(CALL_LOAD_WAIT_S)
            result = await client.call_tool(tool, arguments)
            text = "\n".join(getattr(b, "text", "") for b in result.content if getattr(b, "type", "") == "text")
            outcome = CallOutcome(result.structured_content, text, bool(result.is_error))
            if save_dir is not None and not outcome.is_error:
                outcome.saved = await save_pictures(client, outcome.structured or {}, save_dir)
    finally:
        app.executor.stop()
        app.decoder.close()
    return outcome


async def save_pictures(client: Any, structured: dict[str, Any], directory: Path) -> list[Path]:
    """Write the masks and overlays a result names (``mask://<id>.png`` → ``mask-<id>.png``) into ``directory``."""
    saved: list[Path] = []
    for key in SAVED_RESOURCES:
        uri = structured.get(key)
        if not isinstance(uri, str):
            continue
        kind, _, name = uri.partition("://")
        contents = (await client.read_resource(uri)).contents[0]
        path = directory / f"{kind}-{Path(name).name}"
        path.write_bytes(base64.b64decode(contents.blob))
        saved.append(path)
    return saved


def call_main(argv: list[str]) -> int:
    """``nextchat-mcp call TOOL 'JSON' [--save DIR] [options]``: print the tool's structured result as JSON."""
    p = OptionParser(
        "call",
        description="Run one tool in-process and print its structured result as JSON. Mistakes in the call are "
        "answered before the model loads.",
    )
    p.add_argument("tool", help="locate_objects, segment_object, describe_region, visual_qa or status")
    p.add_argument("arguments", nargs="?", default="{}", help="the tool's arguments as a JSON object")
    p.add_argument(
        "--save",
        metavar="DIR",
        help="write the masks and overlay pictures the call returns (mask://, overlay://; they do not outlive the "
        "command) into DIR, created if missing, and print their paths on stderr",
    )
    settings, args = p.parse_settings(argv)
    logging.getLogger("mcp").setLevel(logging.WARNING)  # the SDK's per-call INFO lines repeat the error printed below
    try:
        arguments, save_dir = parse_arguments(args.arguments), save_directory(args.save)
        outcome = anyio.run(call_tool, settings, args.tool, arguments, save_dir)
    except UsageError as error:
        print(f"{p.prog}: {error}", file=sys.stderr)
        return EXIT_USAGE
    if outcome.is_error:
        print(outcome.text, file=sys.stderr)
        return EXIT_TOOL_ERROR
    print(json.dumps(outcome.structured, indent=2))
    for path in outcome.saved:
        print(f"saved {path}", file=sys.stderr)
    if save_dir is not None and not outcome.saved:
        hint = 'pass "overlay": true for a picture'
        print(f"saved nothing: the result names no mask or overlay ({hint})", file=sys.stderr)
    return 0
