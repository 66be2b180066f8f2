"""Raw JSON-RPC over a stdio server subprocess: the test decides exactly when each message and signal goes out, and
sees each answer's arrival time."""

import json
import os
import sys
import time
from pathlib import Path

import anyio
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream


class RawSession:
    """JSON-RPC over a server subprocess's stdin and stdout, one message a line."""

    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self._lines = TextReceiveStream(process.stdout)
        self._buffer = ""
        self.answers: dict[int, dict] = {}
        self.arrived: dict[int, float] = {}  # request id -> time.monotonic() when its answer was read

    async def send(self, message: dict) -> None:
        await self.send_line(json.dumps(message).encode())

    async def send_line(self, line: bytes) -> None:
        """One raw line (a newline is added), sent as is: for malformed messages."""
        assert self.process.stdin is not None
        await self.process.stdin.send(line + b"\n")

    async def read(self) -> dict | list | None:
        """The next message from the server, or None at end of its output."""
        while "\n" not in self._buffer:
            try:
                self._buffer += await self._lines.receive()
            except anyio.EndOfStream:
                return None
        line, self._buffer = self._buffer.split("\n", 1)
        message = json.loads(line)
        if isinstance(message, dict) and "id" in message:
            self.answers[message["id"]] = message
            self.arrived[message["id"]] = time.monotonic()
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


def tool_error(answer: dict) -> str:
    assert answer["result"]["isError"], answer
    return answer["result"]["content"][0]["text"]


def server_command(checkpoint: Path | str, *args: str) -> list[str]:
    """The command line of a server on ``checkpoint`` (waiting up to 100 s for the model on a first call)."""
    return [sys.executable, "-m", "mcp_server", "--model", str(checkpoint), "--ready-wait", "100", *args]


def server_env() -> dict[str, str]:
    """The test's environment (its PYTHONPATH, so the server runs this checkout's code), on the CPU."""
    return {**os.environ, "NEXTCHAT_DEVICE": "cpu"}


async def start(checkpoint: Path | str, *args: str) -> Process:
    """A stdio server subprocess; its log goes to the test's stderr."""
    return await anyio.open_process(server_command(checkpoint, *args), env=server_env(), stderr=None)
