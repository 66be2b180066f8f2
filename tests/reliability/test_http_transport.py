"""R17 / T16-T17: the streamable-HTTP transport on 127.0.0.1: handles bound to their session, DNS-rebinding and
Origin checks, the bearer token, and two sessions whose JSON-RPC ids collide getting their own answers.

The app is built as ``nextchat-mcp --transport streamable-http`` builds it (``streamable_http_app()``, wrapped in
:func:`mcp_server.cli.bearer_guard` when a token is set) and served by uvicorn on a loopback socket.
"""

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2
import pytest
import uvicorn
from mcp import Client, MCPError
from nonces import MIX, Nonce, Tally, request

from mcp_server.cli import bearer_guard
from mcp_server.server import create_server
from mcp_server.settings import Settings


pytestmark = pytest.mark.anyio
TOKEN = "correct-horse-battery-staple"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "probe", "version": "0"},
    },
}
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


class LoopbackHttp:
    """An ASGI app served by uvicorn in a thread, on a socket bound to 127.0.0.1 before the thread starts (so a client
    may connect at once: the kernel queues the connection until uvicorn accepts it)."""

    def __init__(self, app) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def __enter__(self) -> "LoopbackHttp":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


def serve(checkpoint: Path, token: str | None = None) -> Iterator[tuple[LoopbackHttp, object]]:
    settings = Settings(model=str(checkpoint), device="cpu", transport="streamable-http", token=token)
    server = create_server(settings)
    app = server.streamable_http_app()
    with LoopbackHttp(bearer_guard(app, token) if token else app) as http:
        yield http, server
    server.app.executor.stop()


@pytest.fixture(scope="module")
def http(tiny_checkpoint: Path):
    yield from serve(tiny_checkpoint)


@pytest.fixture(scope="module")
def http_with_runner(tiny_checkpoint: Path):
    """The HTTP server, and its runner once built (the executor builds it in its own thread)."""
    from mcp_server.runner import NextChatRunner

    runners: list[NextChatRunner] = []

    def build() -> NextChatRunner:
        runners.append(NextChatRunner.load(str(tiny_checkpoint), "cpu"))
        return runners[-1]

    server = create_server(Settings(model=str(tiny_checkpoint), device="cpu", transport="streamable-http"), build)
    with LoopbackHttp(server.streamable_http_app()) as service:
        yield service, runners
    server.app.executor.stop()
    server.app.decoder.close()


@pytest.fixture(scope="module")
def http_with_token(tiny_checkpoint: Path):
    yield from serve(tiny_checkpoint, TOKEN)


def text(result) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


async def test_handles_belong_to_the_http_session_that_created_them(http) -> None:
    service, _ = http
    nonce = Nonce.make(1)
    with anyio.fail_after(300):
        async with Client(service.url, mode="legacy") as alice, Client(service.url, mode="legacy") as bob:
            located = await alice.call_tool("locate_objects", {"image": nonce.uri, "query": "the red box"})
            assert not located.is_error, text(located)
            image_id = located.structured_content["image"]["id"]
            segmented = await alice.call_tool("segment_object", {"image": image_id, "box": nonce.box, "overlay": True})
            assert not segmented.is_error, text(segmented)
            mask_uri, overlay_uri = (segmented.structured_content[k] for k in ("mask_uri", "overlay_uri"))

            # Another session: the same strings name nothing, and say so exactly as for an expired handle.
            for tool, args in [
                ("locate_objects", {"image": image_id, "query": "the red box"}),
                ("segment_object", {"image": image_id, "object_id": "o1"}),
                ("describe_region", {"image": image_id, "box": nonce.box}),
                ("visual_qa", {"image": image_id, "question": "what?"}),
            ]:
                refused = await bob.call_tool(tool, args)
                assert refused.is_error and "not found" in text(refused), (tool, text(refused))
            for uri in (mask_uri, overlay_uri):
                with pytest.raises(MCPError, match="not found"):
                    await bob.read_resource(uri)

            # The same bytes from the other session get their own handle, without the first session's objects.
            own = await bob.call_tool("segment_object", {"image": nonce.uri, "box": nonce.box})
            assert not own.is_error, text(own)
            assert own.structured_content["image"]["id"] != image_id
            borrowed = await bob.call_tool(
                "segment_object", {"image": own.structured_content["image"]["id"], "object_id": "o1"}
            )
            assert borrowed.is_error and "not found" in text(borrowed)

            # The owner still has everything.
            assert (await alice.read_resource(mask_uri)).contents[0].mime_type == "image/png"
            again = await alice.call_tool("describe_region", {"image": image_id, "box": nonce.box})
            assert not again.is_error, text(again)


async def test_two_sessions_with_colliding_request_ids_each_get_their_own_answers(http) -> None:
    service, _ = http
    tally = Tally()

    async def session(first: int) -> None:
        async with Client(service.url, mode="legacy") as client:  # both number their requests 1, 2, 3...
            for turn in range(8):
                await request(client, MIX[turn % len(MIX)], Nonce.make(first + turn), tally)

    with anyio.fail_after(300):
        async with anyio.create_task_group() as group:
            group.start_soon(session, 10_000)
            group.start_soon(session, 20_000)
    assert not tally.problems, "\n".join(tally.problems)
    assert tally.answered == tally.sent == 16


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Host": "evil.example"}, 421),  # a rebound name still points here, with its own Host header
        ({"Host": "evil.example:80"}, 421),
        ({"Origin": "http://evil.example"}, 403),  # a web page in the user's browser
        ({"Origin": "null"}, 403),
    ],
)
async def test_foreign_host_or_origin_is_refused_before_any_tool_runs(http, headers: dict, status: int) -> None:
    service, server = http
    images = len(server.app.images)
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "status", "arguments": {}}}
    async with httpx2.AsyncClient(timeout=30) as client:
        for body in (INITIALIZE, call):
            response = await client.post(service.url, headers=HEADERS | headers, content=json.dumps(body))
            assert response.status_code == status, response.text
    assert len(server.app.images) == images


async def test_loopback_host_and_origin_are_accepted(http) -> None:
    service, _ = http
    origin = {"Origin": f"http://127.0.0.1:{service.port}"}
    async with httpx2.AsyncClient(timeout=30) as client:
        response = await client.post(service.url, headers=HEADERS | origin, content=json.dumps(INITIALIZE))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("authorization", "status"),
    [(None, 401), ("Bearer wrong", 401), (f"bearer {TOKEN}", 401), (TOKEN, 401), (f"Bearer {TOKEN}", 200)],
)
async def test_a_set_token_is_required_on_every_request(http_with_token, authorization: str | None, status) -> None:
    service, server = http_with_token
    images = len(server.app.images)
    headers = HEADERS | ({"Authorization": authorization} if authorization else {})
    async with httpx2.AsyncClient(timeout=30) as client:
        response = await client.post(service.url, headers=headers, content=json.dumps(INITIALIZE))
    assert response.status_code == status, response.text
    if status == 401:
        assert TOKEN not in response.text
    assert len(server.app.images) == images


async def test_stateless_2026_requests_are_served_and_see_no_session_handles(http) -> None:
    """The 2026-07-28 HTTP path has no session: its calls work, and a session's handles are not theirs to use."""
    service, _ = http
    nonce = Nonce.make(2)
    with anyio.fail_after(300):
        async with Client(service.url, mode="legacy") as session, Client(service.url) as stateless:
            created = await session.call_tool("segment_object", {"image": nonce.uri, "box": nonce.box})
            assert not created.is_error, text(created)
            image_id = created.structured_content["image"]["id"]
            refused = await stateless.call_tool("describe_region", {"image": image_id, "box": nonce.box})
            assert refused.is_error and "not found" in text(refused)
            with pytest.raises(MCPError, match="not found"):
                await stateless.read_resource(created.structured_content["mask_uri"])
            served = await stateless.call_tool("describe_region", {"image": nonce.uri, "box": nonce.box})
            assert not served.is_error, text(served)
            assert served.structured_content["image"]["sha256_prefix"] == nonce.sha_prefix


async def test_the_encoder_caches_are_not_shared_between_sessions(http_with_runner) -> None:
    """No cross-session timing signal: the same bytes from a second session are a cache miss (encoded again), so
    how fast its answer comes says nothing about what another session sent. Within one session they are a hit."""
    service, runners = http_with_runner
    nonce = Nonce.make(3)
    with anyio.fail_after(300):
        async with Client(service.url, mode="legacy") as alice, Client(service.url, mode="legacy") as bob:
            for client, expected in [(alice, (0, 1)), (alice, (1, 1)), (bob, (1, 2)), (bob, (2, 2))]:
                result = await client.call_tool("locate_objects", {"image": nonce.uri, "query": "the red box"})
                assert not result.is_error, text(result)
                features = runners[0].features
                assert (features.hits, features.misses) == expected, (client is alice, features.hits, features.misses)
    owners = {key.rsplit("/", 1)[0] for key in runners[0].features._items}  # keys are "owner/sha256"
    assert len(owners) == 2 and "" not in owners, owners  # one entry per session, none shared
