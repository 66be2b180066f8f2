"""Server subprocesses for tests: raw JSON-RPC over stdio (the test decides exactly when each message and signal goes
out, and sees each answer's arrival time), and streamable HTTP on a free loopback port."""

import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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


def free_port() -> int:
    """A loopback port nothing listens on now (the server binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_for_port(port: int, process: Process, within_s: float = 120.0) -> None:
    """Wait until the server subprocess accepts connections on ``port``."""
    with anyio.fail_after(within_s):
        while True:
            assert process.returncode is None, "the HTTP server ended before listening"
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.1)
                continue
            await stream.aclose()
            return


@asynccontextmanager
async def http_server(*args: str) -> AsyncIterator[tuple[str, Process]]:
    """A streamable-HTTP server subprocess on the demo model: its URL and process (stopped on exit)."""
    port = free_port()
    command = server_command("demo", "--transport", "streamable-http", "--port", str(port), *args)
    process = await anyio.open_process(command, env=server_env(), stdout=None, stderr=None)
    try:
        await wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}/mcp", process
    finally:
        await stop(process)


async def stop(process: Process) -> None:
    """End a server subprocess (SIGTERM, then SIGKILL after 10 s)."""
    if process.returncode is None:
        process.terminate()
        with anyio.move_on_after(10):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    return parents


def decode_workers(server_pid: int) -> list[int]:
    """The server's decode workers: its child processes running ``mcp_server.decode_worker``."""
    workers = []
    for pid, parent in _parents().items():
        try:
            if parent == server_pid and b"mcp_server.decode_worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.append(pid)
        except OSError:
            continue  # ended meanwhile
    return workers


def decode_worker_cpu_s(server_pid: int) -> float:
    """CPU seconds used so far by the server's decode workers."""
    total = 0.0
    for pid in decode_workers(server_pid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended (a zombie waiting to be reaped has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def wait_until_decoding(process: Process, cpu_s: float = 0.5, within_s: float = 60.0) -> None:
    """Wait until the server's decode workers have used ``cpu_s`` of CPU: a decode is under way."""
    with anyio.fail_after(within_s):
        while decode_worker_cpu_s(process.pid) < cpu_s:
            assert process.returncode is None, "the server ended"
            await anyio.sleep(0.05)
