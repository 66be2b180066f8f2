"""Process lifetime over stdio, on a real subprocess with the tiny checkpoint: SIGTERM drains (admitted calls finish,
new ones are told the server is shutting down) and exits 0; end of stdin exits 0.

Raw JSON-RPC lines rather than the SDK client, so the test decides exactly when the signal and each call go out.
"""

import base64
import json
import os
import signal
import sys
import time
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream
from support import make_image, png_data_uri, rle8_bmp


pytestmark = pytest.mark.anyio


class RawSession:
    """JSON-RPC over a server subprocess's stdin and stdout, one message a line."""

    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self._lines = TextReceiveStream(process.stdout)
        self._buffer = ""
        self.answers: dict[int, dict] = {}

    async def send(self, message: dict) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send((json.dumps(message) + "\n").encode())

    async def read(self) -> dict | None:
        """The next message from the server, or None at end of its output."""
        while "\n" not in self._buffer:
            try:
                self._buffer += await self._lines.receive()
            except anyio.EndOfStream:
                return None
        line, self._buffer = self._buffer.split("\n", 1)
        message = json.loads(line)
        if "id" in message:
            self.answers[message["id"]] = message
        return message

    async def answer(self, request_id: int) -> dict:
        while request_id not in self.answers:
            assert await self.read() is not None, f"the server ended without answering {request_id}"
        return self.answers[request_id]

    async def call(self, request_id: int, tool: str, arguments: dict) -> None:
        await self.send({"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                         "params": {"name": tool, "arguments": arguments}})  # fmt: skip

    async def initialize(self) -> None:
        await self.send({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                         "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                    "clientInfo": {"name": "test", "version": "1"}}})  # fmt: skip
        assert "result" in await self.answer(0)
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})


def structured(answer: dict) -> dict:
    assert "result" in answer and not answer["result"].get("isError"), answer
    return answer["result"]["structuredContent"]


def error_text(answer: dict) -> str:
    assert answer["result"]["isError"], answer
    return answer["result"]["content"][0]["text"]


async def start(checkpoint: Path, *args: str) -> Process:
    env = {**os.environ, "NEXTCHAT_DEVICE": "cpu"}
    command = [sys.executable, "-m", "mcp_server", "--model", str(checkpoint), "--ready-wait", "100", *args]
    return await anyio.open_process(command, env=env, stderr=None)


async def test_sigterm_lets_admitted_calls_finish_refuses_new_ones_and_exits_zero(tiny_checkpoint) -> None:
    image = png_data_uri(make_image(80, 64, seed=5))
    # Long answers (the tiny model's whole context) keep calls running while the signal arrives; the drain bound is
    # set well above their run time on a slow or busy machine, so only the behaviour is tested, not the speed.
    process = await start(tiny_checkpoint, "--fixed-new-tokens", "400", "--max-batch", "4", "--drain-timeout", "200")
    session = RawSession(process)
    with anyio.fail_after(240):
        await session.initialize()
        await session.call(1, "locate_objects", {"image": image, "query": "the red square"})
        structured(await session.answer(1))  # the model is loaded
        for request_id in (2, 3):
            await session.call(request_id, "locate_objects", {"image": image, "query": f"object {request_id}"})
        admitted = 0
        while admitted < 2 and not {2, 3} <= set(session.answers):  # both with the executor (or, if fast, done)
            await session.call(10, "status", {})
            admitted = structured(await session.answer(10))["queue_depth"]
            del session.answers[10]
        process.send_signal(signal.SIGTERM)
        await session.call(4, "locate_objects", {"image": image, "query": "too late"})
        for request_id in (2, 3):
            assert structured(await session.answer(request_id))["image"]["width"] == 80
        assert "shutting down" in error_text(await session.answer(4))
        while await session.read() is not None:
            pass
        assert await process.wait() == 0


async def test_end_of_stdin_exits_zero(tiny_checkpoint) -> None:
    process = await start(tiny_checkpoint)
    session = RawSession(process)
    with anyio.fail_after(240):
        await session.initialize()
        await session.call(1, "locate_objects", {"image": png_data_uri(make_image(40, 30)), "query": "the square"})
        structured(await session.answer(1))
        assert process.stdin is not None
        await process.stdin.aclose()
        while await session.read() is not None:
            pass
        assert await process.wait() == 0


BROKEN_DEVICE_SERVER = """
import sys

import anyio

from mcp_server.cli import serve_stdio
from mcp_server.messages import DeviceFailure
from mcp_server.server import create_server
from mcp_server.settings import Settings


class BrokenDevice:
    def __init__(self):
        self.jobs = []

    def submit(self, job):
        self.jobs.append(job)

    def step(self):
        self.jobs.clear()
        raise DeviceFailure("CUDA error: an illegal memory access was encountered")

    def cancel(self, job_id):
        pass

    def has_work(self):
        return bool(self.jobs)


server = create_server(Settings(), runner_factory=BrokenDevice)
sys.exit(anyio.run(serve_stdio, server, server.app, Settings()))
"""


async def test_a_device_failure_fails_the_call_in_flight_and_exits_non_zero() -> None:
    from mcp_server.cli import EXIT_DEVICE_FAILURE

    process = await anyio.open_process([sys.executable, "-c", BROKEN_DEVICE_SERVER], stderr=None)
    session = RawSession(process)
    with anyio.fail_after(60):
        await session.initialize()
        await session.call(1, "locate_objects", {"image": png_data_uri(make_image(40, 30)), "query": "the square"})
        assert "device failed" in error_text(await session.answer(1))
        while await session.read() is not None:  # the server leaves although the client keeps stdin open
            pass
        assert await process.wait() == EXIT_DEVICE_FAILURE


def slow_image_uri() -> str:
    """A run-length BMP (data URI) whose decode takes seconds of CPU in a decode worker, under every cap."""
    return "data:image/bmp;base64," + base64.b64encode(rle8_bmp(3000, 2000)).decode()


async def decoding(drain_timeout: int) -> tuple[Process, RawSession]:
    """Start the demo server, send it a slow decode (call 1) and wait until it has taken it: a status call sent after
    it is answered (quickly: status waits for no decode)."""
    process = await start(Path("demo"), "--drain-timeout", str(drain_timeout), "--timeout", "60")
    session = RawSession(process)
    with anyio.fail_after(60):
        await session.initialize()
        await session.call(1, "locate_objects", {"image": slow_image_uri(), "query": "the red square"})
        await session.call(2, "status", {})
        assert "result" in await session.answer(2)
    return process, session


async def test_sigterm_during_a_decode_kills_the_worker_and_exits_zero_within_drain_plus_two_seconds() -> None:
    process, session = await decoding(drain_timeout=1)
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    with anyio.fail_after(10):
        assert "shutting down" in error_text(await session.answer(1))
        assert await process.wait() == 0
    assert time.monotonic() - signalled < 1 + 2


async def test_a_second_sigterm_exits_at_once() -> None:
    process, session = await decoding(drain_timeout=100)
    process.send_signal(signal.SIGTERM)
    await session.call(3, "status", {})
    with anyio.fail_after(10):
        await session.answer(3)  # the first signal has been handled: the server is draining, call 1 still decodes
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert await process.wait() == 128 + signal.SIGTERM
    assert time.monotonic() - signalled < 2
