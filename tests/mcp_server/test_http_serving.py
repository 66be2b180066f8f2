"""``nextchat-mcp --transport streamable-http`` as a user runs it: it logs the URL to connect to (with ``/mcp``), and a
request without the right bearer token gets 401 with an RFC 6750 challenge and an error the SDK client shows."""

import json
import os
import signal
import socket
import sys
from pathlib import Path

import anyio
import httpx2
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream
from mcp import Client, MCPError

from mcp_server.cli import endpoint_url
from mcp_server.http_auth import bearer_guard


pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]
TOKEN = "a-token-for-this-test-only"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}},
}
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def leaves(error: BaseException) -> list[str | BaseException]:
    """The exceptions inside (nested) exception groups; the client raises its connect failure from a task group."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def logged_url(process: Process) -> str:
    """The URL the server logs once it listens (read from its stderr)."""
    assert process.stderr is not None
    seen = ""
    with anyio.fail_after(120):
        async for chunk in TextReceiveStream(process.stderr):
            seen += chunk
            for line in seen.splitlines():
                if "serving MCP over streamable HTTP at " in line:
                    return line.split(" at ", 1)[1].strip()
    raise AssertionError(f"the server ended without logging its URL: {seen}")


async def test_the_server_logs_its_mcp_url_and_refuses_a_missing_token_with_a_bearer_challenge(
    tiny_checkpoint: Path,
) -> None:
    port = free_port()
    command = [sys.executable, "-m", "mcp_server", "--model", str(tiny_checkpoint), "--device", "cpu",
               "--transport", "streamable-http", "--port", str(port), "--token", TOKEN]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    async with await anyio.open_process(command, env=env) as process:
        try:
            url = await logged_url(process)
            assert url == f"http://127.0.0.1:{port}/mcp"
            async with httpx2.AsyncClient(timeout=30) as http:
                missing = await http.post(url, headers=HEADERS, content=json.dumps(INITIALIZE))
                wrong = await http.post(
                    url, headers=HEADERS | {"Authorization": "Bearer nope"}, content=json.dumps(INITIALIZE)
                )
                right = await http.post(
                    url, headers=HEADERS | {"Authorization": f"Bearer {TOKEN}"}, content=json.dumps(INITIALIZE)
                )
            assert missing.status_code == wrong.status_code == 401
            assert missing.headers["www-authenticate"] == 'Bearer realm="nextchat-mcp"'
            assert wrong.headers["www-authenticate"].startswith('Bearer realm="nextchat-mcp", error="invalid_token"')
            assert right.status_code == 200, right.text
            assert TOKEN not in missing.text + wrong.text + str(wrong.headers)
            # The SDK's client shows the reason instead of "Server returned an error response".
            with anyio.fail_after(60), pytest.raises(Exception) as refused:  # leaves checked below
                async with Client(url) as client:
                    await client.list_tools()
            (error,) = set(leaves(refused.value))
            assert isinstance(error, MCPError)
            assert str(error).startswith("this server needs a bearer token: send the header 'Authorization: Bearer")
        finally:
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(60):
                await process.wait()
    assert process.returncode == 0


async def test_the_guard_passes_only_the_exact_token_and_lets_lifespan_events_through() -> None:
    reached: list[str] = []

    async def app(scope, receive, send) -> None:
        reached.append(scope["type"])

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    guarded = bearer_guard(app, TOKEN)
    for header in (None, b"Bearer " + TOKEN.encode() + b"x", b"Bearer " + TOKEN.encode()[:-1], TOKEN.encode()):
        headers = [(b"authorization", header)] if header else []
        await guarded({"type": "http", "headers": headers}, None, send)
    await guarded({"type": "http", "headers": [(b"authorization", f"Bearer {TOKEN}".encode())]}, None, send)
    await guarded({"type": "lifespan"}, None, send)
    assert reached == ["http", "lifespan"]
    statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert statuses == [401] * 4
    challenges = [dict(m["headers"])[b"www-authenticate"] for m in sent if m["type"] == "http.response.start"]
    assert challenges[0] == b'Bearer realm="nextchat-mcp"' and all(b"invalid_token" in c for c in challenges[1:])


def test_the_endpoint_url_brackets_an_ipv6_host() -> None:
    assert endpoint_url("::1", 8000) == "http://[::1]:8000/mcp"
    assert endpoint_url("0.0.0.0", 9000) == "http://0.0.0.0:9000/mcp"
