"""``nextchat-mcp``: serve over stdio (default) or streamable HTTP; ``nextchat-mcp call TOOL JSON`` runs one tool.

Nothing but protocol goes to stdout when serving; logs go to stderr.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from mcp_server.settings import Settings, parser, settings_from_args


log = logging.getLogger("nextchat_mcp")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def _quiet_libraries() -> None:
    # Libraries that print at import or load time must not reach stdout (the stdio protocol stream).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts local connections."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer_guard(app: ASGIApp, token: str) -> ASGIApp:
    """Refuse HTTP requests without ``Authorization: Bearer <token>`` (401) before they reach the MCP app."""
    expected = f"Bearer {token}".encode()

    async def guarded(
        scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
    ) -> None:
        if scope["type"] == "http" and dict(scope.get("headers") or []).get(b"authorization") != expected:
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"missing or wrong bearer token"})
            return
        await app(scope, receive, send)

    return guarded


def serve(settings: Settings) -> None:
    """Run the server until stdin closes (stdio) or the process is stopped (HTTP)."""
    from mcp_server.server import create_server

    server = create_server(settings)
    if settings.transport == "stdio":
        server.run("stdio")
        return
    if not is_loopback(settings.host) and not settings.token:
        raise SystemExit("refusing to serve HTTP on a non-loopback address without --token (or NEXTCHAT_TOKEN)")
    import uvicorn

    app: ASGIApp = server.streamable_http_app()  # type: ignore[assignment]
    if settings.token:
        app = bearer_guard(app, settings.token)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


async def call_tool(
    settings: Settings, tool: str, arguments: dict[str, Any]
) -> tuple[dict[str, Any] | None, str, bool]:
    """Run one tool through the same server in-process; returns (structured result, text, is_error)."""
    from mcp import Client

    from mcp_server.server import create_server

    server = create_server(settings)
    try:
        async with Client(server) as client:
            result = await client.call_tool(tool, arguments)
    finally:
        server.state.executor.stop()  # type: ignore[attr-defined]
    text = "\n".join(getattr(block, "text", "") for block in result.content if getattr(block, "type", "") == "text")
    return result.structured_content, text, bool(result.is_error)


def call_main(argv: list[str]) -> int:
    """``nextchat-mcp call TOOL 'JSON' [serve options]``: print the tool's structured result as JSON."""
    p = argparse.ArgumentParser(prog="nextchat-mcp call", parents=[parser()], add_help=False,
                                description="Run one tool in-process and print its structured result.")  # fmt: skip
    p.add_argument("tool", help="locate_objects, segment_object, describe_region, visual_qa or status")
    p.add_argument("arguments", nargs="?", default="{}", help="the tool's arguments as a JSON object")
    args = p.parse_args(argv)
    try:
        arguments = json.loads(args.arguments)
    except json.JSONDecodeError as error:
        print(f"arguments are not JSON: {error}", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    structured, text, is_error = anyio.run(call_tool, settings, args.tool, arguments)
    if is_error:
        print(text, file=sys.stderr)
        return 1
    print(json.dumps(structured, indent=2))
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    argv = sys.argv[1:] if argv is None else argv
    _quiet_libraries()
    if argv and argv[0] == "call":
        raise SystemExit(call_main(argv[1:]))
    serve(settings_from_args(parser().parse_args(argv)))
