"""Issue 15: one caller's hostile image neither stalls the server nor slows another caller down.

Real server subprocesses on the embedded demo model, with ``--timeout 5``, over stdio and over streamable HTTP. One
caller sends two bombs at once, both as files under ``--allow-dir`` (HTTP bodies are capped at 4 MiB; the point here
is the decode, not the transport):

- the issue's progressive-JPEG scan bomb at the 20 MiB cap, which the structure caps refuse before any decoder runs;
- a 20 MiB, 40 MP run-length BMP that passes every cap and takes Pillow's Python decoder about 15 s, so a decode
  worker really runs until the parent kills it at the call's deadline.

Both must be refused within the deadline plus 1 s. Meanwhile another caller (over stdio: the same client's other
requests; over HTTP: a second session) keeps calling ``locate_objects`` on a small image and ``status``; the median of
each must stay within 2× its median measured just before, on the same server, with no bomb in flight. Medians, not
maxima: this 2-core machine is shared, and a single late sample says more about the neighbours than about the server.
"""

import contextlib
import signal
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from mcp import Client
from reliability_support import record_figures
from server_process import (
    RawSession,
    http_server,
    server_command,
    server_env,
    stop,
    structured,
    tool_error,
    wait_until_decoding,
)
from support import make_image, png_data_uri, scan_bomb, slow_bmp


pytestmark = [pytest.mark.anyio, pytest.mark.timeout(600)]

TIMEOUT_S = 5.0
REFUSAL_MARGIN_S = 1.0
SLOWDOWN_BOUND = 2.0
UNLOADED_ROUNDS = 8
PROBE = (64, 48)  # the other caller's small image (a new one each call: each is decoded and encoded)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding ``scan-bomb.jpg`` (refused by structure) and ``slow.bmp`` (under every cap, about 15 s to
    decode), both at the 20 MiB cap."""
    directory = tmp_path_factory.mktemp("bombs")
    (directory / "scan-bomb.jpg").write_bytes(scan_bomb())
    (directory / "slow.bmp").write_bytes(slow_bmp())
    return directory


@dataclass
class Probes:
    """The other caller's latencies, in seconds."""

    locate: list[float] = field(default_factory=list)
    status: list[float] = field(default_factory=list)

    def figures(self) -> dict[str, float]:
        return {
            "locate_median_ms": round(statistics.median(self.locate) * 1000, 1),
            "locate_max_ms": round(max(self.locate) * 1000, 1),
            "status_median_ms": round(statistics.median(self.status) * 1000, 1),
            "status_max_ms": round(max(self.status) * 1000, 1),
            "rounds": len(self.locate),
        }


class Caller:
    """What the test needs from a transport: a tool call (its structured result, or its error text) and its time."""

    async def call(self, tool: str, arguments: dict) -> tuple[bool, dict | str, float]:
        """(succeeded, structured result or error text, seconds from send to answer)."""
        raise NotImplementedError


async def probe_round(caller: Caller, seed: int, probes: Probes) -> None:
    image = png_data_uri(make_image(*PROBE, seed=seed))
    ok, result, seconds = await caller.call("locate_objects", {"image": image, "query": "the red square"})
    assert ok and isinstance(result, dict) and result["image"]["width"] == PROBE[0], result
    probes.locate.append(seconds)
    ok, result, seconds = await caller.call("status", {})
    assert ok, result
    probes.status.append(seconds)


async def bombs_against_probes(attacker: Caller, victim: Caller, bombs: Path, transport: str) -> None:
    """Warm up, measure the victim alone, then again while the attacker's bombs are in flight; check both bounds."""
    for seed in range(3):  # the model loads; the first calls pay one-off costs
        await probe_round(victim, seed, Probes())
    alone = Probes()
    for seed in range(UNLOADED_ROUNDS):
        await probe_round(victim, 100 + seed, alone)

    refusals: dict[str, tuple[str, float]] = {}

    async def bomb(name: str) -> None:
        ok, text, seconds = await attacker.call("locate_objects", {"image": str(bombs / name), "query": "anything"})
        assert not ok and isinstance(text, str), f"{name} was decoded: {text}"
        refusals[name] = (text, seconds)

    loaded = Probes()
    async with anyio.create_task_group() as group:
        group.start_soon(bomb, "scan-bomb.jpg")
        group.start_soon(bomb, "slow.bmp")
        seed = 1000
        while len(refusals) < 2:
            await probe_round(victim, seed, loaded)
            seed += 1

    record_figures(
        f"issue 15 bombs over {transport}, --timeout 5",
        {
            "scan_bomb_refused_s": round(refusals["scan-bomb.jpg"][1], 3),
            "slow_decode_refused_s": round(refusals["slow.bmp"][1], 3),
        }
        | {f"alone_{k}": v for k, v in alone.figures().items()}
        | {f"during_{k}": v for k, v in loaded.figures().items()},
    )
    text, seconds = refusals["scan-bomb.jpg"]
    assert "progressive scans" in text and seconds < TIMEOUT_S + REFUSAL_MARGIN_S, refusals
    text, seconds = refusals["slow.bmp"]
    assert "took too long to decode" in text and seconds < TIMEOUT_S + REFUSAL_MARGIN_S, refusals
    assert len(loaded.locate) >= 3, "too few calls while the bombs were in flight to judge their latency"
    for name in ("locate", "status"):
        before, during = statistics.median(getattr(alone, name)), statistics.median(getattr(loaded, name))
        assert during <= SLOWDOWN_BOUND * before, (
            f"{name}: median {during * 1000:.1f} ms during the bombs against {before * 1000:.1f} ms alone",
            alone.figures(),
            loaded.figures(),
        )


# ----------------------------------------------------------------------------------------------------------------
# stdio: one client, its requests in flight together


class StdioCaller(Caller):
    """Calls over one stdio session; a reader task files each answer as it arrives."""

    def __init__(self, session: RawSession) -> None:
        self.session = session
        self._ids = iter(range(1, 1 << 30))
        self._news = anyio.Event()

    async def pump(self) -> None:
        while await self.session.read() is not None:
            self._news.set()
            self._news = anyio.Event()
        self._news.set()

    async def call(self, tool: str, arguments: dict) -> tuple[bool, dict | str, float]:
        request_id = next(self._ids)
        sent = time.monotonic()
        await self.session.call(request_id, tool, arguments)
        while request_id not in self.session.answers:
            assert self.session.process.returncode is None, "the server ended"
            await self._news.wait()
        answer = self.session.answers[request_id]
        seconds = self.session.arrived[request_id] - sent
        if answer["result"].get("isError"):
            return False, tool_error(answer), seconds
        return True, structured(answer), seconds


@pytest.mark.slow
async def test_bombs_over_stdio_are_refused_in_time_and_slow_no_other_call(bombs: Path) -> None:
    command = server_command("demo", "--timeout", str(TIMEOUT_S), "--allow-dir", str(bombs))
    process = await anyio.open_process(command, env=server_env(), stderr=None)
    try:
        session = RawSession(process)
        with anyio.fail_after(300):
            await session.initialize()
            caller = StdioCaller(session)
            async with anyio.create_task_group() as group:
                group.start_soon(caller.pump)
                await bombs_against_probes(caller, caller, bombs, "stdio")
                group.cancel_scope.cancel()
    finally:
        await stop(process)


# ----------------------------------------------------------------------------------------------------------------
# streamable HTTP: two sessions


class HttpCaller(Caller):
    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(self, tool: str, arguments: dict) -> tuple[bool, dict | str, float]:
        sent = time.monotonic()
        result = await self.client.call_tool(tool, arguments)
        seconds = time.monotonic() - sent
        if result.is_error:
            return False, "".join(getattr(block, "text", "") for block in result.content), seconds
        assert result.structured_content is not None
        return True, result.structured_content, seconds


@pytest.mark.slow
async def test_bombs_over_http_are_refused_in_time_and_slow_no_other_session(bombs: Path) -> None:
    async with http_server("--timeout", str(TIMEOUT_S), "--allow-dir", str(bombs)) as (url, _):
        with anyio.fail_after(300):
            async with Client(url, mode="legacy") as attacker, Client(url, mode="legacy") as victim:
                await bombs_against_probes(HttpCaller(attacker), HttpCaller(victim), bombs, "streamable HTTP")


# ----------------------------------------------------------------------------------------------------------------
# SIGTERM while a worker decodes the slow bomb: exit 0 within the drain timeout + 2 s; a second SIGTERM within 1 s


DRAIN_MARGIN_S = 2.0
SECOND_SIGNAL_S = 1.0


@dataclass
class BombInFlight:
    """A server whose decode worker is busy with the slow bomb: over stdio, the session that sent it (call 0); over
    HTTP, the server's URL (the bomb went through another connection)."""

    process: Process
    stdio: StdioCaller | None = None
    url: str = ""


@asynccontextmanager
async def decoding_bomb(transport: str, bombs: Path, drain_s: float) -> AsyncIterator[BombInFlight]:
    """A demo server (``--timeout 60``) with its model loaded, whose decode worker has started on the slow bomb when
    the block starts. (While the model is still importing, torch's import holds the GIL for long stretches and the
    exit timer runs late: see docs/reliability.md.)"""
    args = ("--drain-timeout", str(drain_s), "--timeout", "60", "--allow-dir", str(bombs))
    bomb = {"image": str(bombs / "slow.bmp"), "query": "anything"}
    if transport == "stdio":
        process = await anyio.open_process(server_command("demo", *args), env=server_env(), stderr=None)
        try:
            caller = StdioCaller(RawSession(process))
            async with anyio.create_task_group() as group:
                with anyio.fail_after(120):
                    await caller.session.initialize()
                    group.start_soon(caller.pump)
                    await model_ready(caller)
                    await caller.session.call(0, "locate_objects", bomb)
                    await wait_until_decoding(process)
                yield BombInFlight(process, stdio=caller)
                group.cancel_scope.cancel()
        finally:
            await stop(process)
        return
    async with (
        http_server(*args) as (url, process),
        Client(url, mode="legacy") as client,
        anyio.create_task_group() as group,
    ):
        with anyio.fail_after(120):
            await model_ready(HttpCaller(client))
            group.start_soon(call_ignoring_the_outcome, client, bomb)
            await wait_until_decoding(process)
        yield BombInFlight(process, url=url)
        group.cancel_scope.cancel()


async def model_ready(caller: Caller) -> None:
    """Wait until ``status`` reports the model ready."""
    while True:
        ok, result, _ = await caller.call("status", {})
        assert ok and isinstance(result, dict), result
        if result["state"] == "ready":
            return
        assert result["state"] in ("starting", "loading"), result
        await anyio.sleep(0.1)


async def call_ignoring_the_outcome(client: Client, arguments: dict) -> None:
    """The bomb call over HTTP: whether it ends with an error or a closed connection, the exit is what is tested."""
    with contextlib.suppress(Exception):
        await client.call_tool("locate_objects", arguments)


# Slow for both transports, and so outside `make test`: on a quiet machine 12 of 13 runs ended within drain + 2 s and
# one took 3.35 s (drain 1 s), against cli.exit_soon's timer at drain + 1.5 s; on a heavily loaded machine up to
# 9.5 s. The timer is a Python thread, so it fires only once it gets the GIL (docs/reliability.md).
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_sigterm_during_a_bomb_decode_exits_zero_within_drain_plus_two_seconds(bombs, transport) -> None:
    drain_s = 1.0
    async with decoding_bomb(transport, bombs, drain_s) as server:
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        with anyio.fail_after(30):
            assert await server.process.wait() == 0
        exit_s = time.monotonic() - signalled
        if server.stdio:  # the bomb's caller was told why (over HTTP the connection may just close)
            assert "shutting down" in tool_error(await server.stdio.session.answer(0))
    record_figures(f"issue 15 SIGTERM during a bomb decode over {transport}", {"drain_s": drain_s, "exit_s": exit_s})
    assert exit_s < drain_s + DRAIN_MARGIN_S


@pytest.mark.parametrize("transport", ["stdio", pytest.param("http", marks=pytest.mark.slow)])
async def test_a_second_sigterm_during_a_bomb_decode_exits_within_one_second(bombs, transport) -> None:
    async with decoding_bomb(transport, bombs, drain_s=100) as server:
        server.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            await first_signal_handled(server)
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert await server.process.wait() == 128 + signal.SIGTERM
        exit_s = time.monotonic() - signalled
    record_figures(f"issue 15 second SIGTERM over {transport}", {"exit_s": exit_s})
    assert exit_s < SECOND_SIGNAL_S


async def first_signal_handled(server: BombInFlight) -> None:
    """Wait until the server is draining (the bomb still decodes: the drain timeout is 100 s): over stdio a new tool
    call is refused as shutting down; over HTTP the server stops accepting connections."""
    if server.stdio:
        image = png_data_uri(make_image(*PROBE))
        ok, text, _ = await server.stdio.call("locate_objects", {"image": image, "query": "the red square"})
        assert not ok and "shutting down" in str(text), text
        return
    port = int(server.url.split(":")[2].split("/")[0])
    while True:
        try:
            stream = await anyio.connect_tcp("127.0.0.1", port)
        except OSError:
            return
        await stream.aclose()
        await anyio.sleep(0.05)
