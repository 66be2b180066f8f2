"""``nextchat-mcp``: serve over stdio (default) or streamable HTTP; ``nextchat-mcp call TOOL JSON`` runs one tool.

Nothing but protocol goes to stdout when serving; logs go to stderr.

Process lifetime: end of stdin (stdio) stops the server, exit status 0. SIGTERM or SIGINT drains it: new calls get a
"shutting down" error, admitted ones finish (up to ``--drain-timeout``; the rest fail explicitly), then it exits
with 0; a second signal stops waiting. A device failure fails the work in flight and exits with
:data:`EXIT_DEVICE_FAILURE` within :data:`FATAL_EXIT_S`, so a supervisor restarts the process on a clean device.
Every exit skips interpreter finalisation (:func:`end_process`), and :func:`exit_soon` bounds one that hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import io
import ipaddress
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import anyio

from mcp_server import stdio_lines
from mcp_server.call_command import call_main
from mcp_server.http_auth import ASGIApp, bearer_guard
from mcp_server.settings import OptionParser, Settings


if TYPE_CHECKING:
    from mcp.server import MCPServer
    from mcp.server.context import CallNext, HandlerResult, ServerRequestContext

    from mcp_server.executor import Executor
    from mcp_server.state import AppState


log = logging.getLogger("nextchat_mcp")

EXIT_DEVICE_FAILURE = 70  # sysexits' EX_SOFTWARE: the device failed; restarting the process is the remedy
FATAL_EXIT_S = 5.0  # after a device failure the process is gone within this, even if a thread hangs on the device
ANSWER_GRACE_S = 5.0  # after the executor drained, how long the finished calls get to write their answers
# The SDK writes a call's answer after its handler returns, and end of input cancels whatever is still unwritten; a
# short quiet pause before it lets the last answers (and the "shutting down" errors of calls that came in meanwhile)
# reach the client.
ANSWER_FLUSH_S = 0.2
# After --drain-timeout, the calls still in progress are failed (decode workers killed, model jobs stopped) and get this
# long to write their answers; the process is gone by drain timeout + SHUTDOWN_MARGIN_S whatever still runs.
LAST_ANSWERS_S = 0.5
SHUTDOWN_MARGIN_S = 1.5
# After a drain every admitted call has ended, so the model thread only has to leave its loop; a model still loading
# is not waited for (it held a SIGTERM during start-up until the exit timer, drain + 1.5 s).
STOP_AFTER_DRAIN_S = 0.5
EXIT_BACKSTOP_S = 0.4  # after exit_soon's timer was due, the C watchdog ends the process (status 1)

HTTP_PATH = "/mcp"  # where the streamable-HTTP endpoint answers


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


def serve(settings: Settings) -> int:
    """Run the server until stdin closes (stdio), or until SIGTERM / SIGINT or a device failure; the exit status."""
    from mcp_server.server import create_server

    server = create_server(settings)
    if settings.transport == "stdio":
        return anyio.run(serve_stdio, server, server.app, settings)
    if not is_loopback(settings.host) and not settings.token:
        raise SystemExit("refusing to serve HTTP on a non-loopback address without --token (or NEXTCHAT_TOKEN)")
    return serve_http(server, server.app, settings)


class _ExitWatchdog:
    """The last resort behind :func:`exit_soon`'s timer: :mod:`faulthandler`'s watchdog, a C thread that needs
    neither the GIL nor a live interpreter. One per process; it keeps the earliest deadline asked for."""

    deadline = math.inf

    @classmethod
    def arm(cls, after_s: float) -> None:
        deadline = time.monotonic() + after_s
        if deadline < cls.deadline:
            # Without a real stderr (None, or a stream with no file descriptor) there is no watchdog: the timer stays.
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                faulthandler.dump_traceback_later(after_s, exit=True)
                cls.deadline = deadline


def exit_soon(status: int, after_s: float = FATAL_EXIT_S) -> None:
    """End the process with ``status`` after ``after_s`` unless it has ended by then (a thread stuck in a device
    call, or a client that never reads, must not keep a broken server alive).

    The timer is a Python thread: it runs only when it gets the GIL, which C code may hold, and never once
    interpreter finalisation has begun. So :data:`EXIT_BACKSTOP_S` later, a C watchdog ends the process whatever the
    interpreter is doing, with status 1 and every thread's traceback on stderr: the status says the exit was forced
    and the tracebacks say what hung.
    """

    def end() -> None:
        sys.stderr.flush()
        os._exit(status)

    timer = threading.Timer(after_s, end)
    timer.daemon = True
    timer.start()
    _ExitWatchdog.arm(after_s + EXIT_BACKSTOP_S)


def end_process(status: int) -> NoReturn:
    """Exit with ``status`` now, without interpreter finalisation: after a drained demo server, finalisation (from
    the last ``atexit`` callback to the process's end) took 1.1 and 1.2 s on a quiet machine, and it freezes the
    daemon threads, :func:`exit_soon`'s timer among them, so nothing bounded it. Everything that must outlive the
    server is closed by then (decode workers killed, executor stopped, answers written); only buffered output is
    left to flush."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def exit_now(signum: int) -> None:
    """A second SIGTERM / SIGINT: end the process at once, with the shell's status for death by that signal."""
    log.warning("%s again: exiting without waiting", signal.Signals(signum).name)
    sys.stderr.flush()
    os._exit(128 + signum)


class ToolCallTracker:
    """Server middleware that counts tool calls in progress, so a shutdown can wait until their answers are out.

    Create it inside the event loop.
    """

    def __init__(self) -> None:
        self.in_progress = 0
        self._changed = anyio.Event()

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method != "tools/call":
            return await call_next(ctx)
        self.in_progress += 1
        try:
            return await call_next(ctx)
        finally:
            self.in_progress -= 1
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until no tool call is in progress, nor starts within :data:`ANSWER_FLUSH_S`;
        True when none is."""
        with anyio.move_on_after(timeout_s):
            while True:
                while self.in_progress:
                    await self._changed.wait()
                await anyio.sleep(ANSWER_FLUSH_S)
                if not self.in_progress:
                    break
        return self.in_progress == 0


class StdioRelay:
    """The stdio transport's streams while serving: ``sys.stdin`` is a pipe that a daemon thread fills from the real
    stdin, line by line; ``sys.stdout`` hands the SDK a writer of whole lines on the wire.

    The SDK reads stdin in a worker thread that nothing can interrupt, so while a client keeps stdin open the server
    could never stop on its own (SIGTERM, device failure). Through this pipe, :meth:`close` gives the server end of
    input, exactly as a client closing stdin does; the thread still blocked on the real stdin is a daemon and does
    not hold the process. Each line is screened on the way (:func:`mcp_server.stdio_lines.screen`): a malformed
    request is answered on the wire instead of reaching the SDK, which would drop it unanswered.
    """

    def __init__(self) -> None:
        read_fd, self._write_fd = os.pipe()
        self.reader = io.TextIOWrapper(os.fdopen(read_fd, "rb"), encoding="utf-8", errors="replace")
        self._lock = threading.Lock()
        self._closed = False
        self._previous: tuple[Any, Any] | None = None
        self._wire: stdio_lines.ProtocolOut | None = None

    def start(self) -> None:
        """Take over stdin and stdout (until :meth:`restore`) and start relaying."""
        self._wire = stdio_lines.ProtocolOut.divert()
        self._previous = sys.stdin, sys.stdout
        sys.stdin, sys.stdout = self.reader, self._wire.stand_in
        threading.Thread(target=self._copy, name="stdin-relay", daemon=True).start()

    def restore(self) -> None:
        """Give stdin and stdout back and end the input."""
        if self._previous is not None and self._wire is not None:
            sys.stdin, sys.stdout = self._previous
            self._wire.restore()
        self.close()

    def _copy(self) -> None:
        pending = bytearray()
        try:
            while chunk := os.read(0, 1 << 16):
                searched = len(pending)  # a long line is searched for its end once, not once per chunk
                pending += chunk
                start = 0
                while (end := pending.find(b"\n", max(start, searched))) >= 0:
                    self._relay(bytes(pending[start:end]))
                    start = end + 1
                del pending[:start]
            if pending:
                self._relay(bytes(pending))  # a last line without its newline
        except OSError:
            log.exception("reading stdin failed")
        finally:
            self.close()

    def _relay(self, line: bytes) -> None:
        forward, answer = stdio_lines.screen(line)
        if answer is not None and self._wire is not None:
            self._wire.write_line(answer)
        if forward is None:
            return
        with self._lock:
            if self._closed:
                return
            stdio_lines.write_all(self._write_fd, forward + b"\n")

    def close(self) -> None:
        """End the input the server sees (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._write_fd)


async def serve_stdio(server: MCPServer, app: AppState, settings: Settings) -> int:
    """Serve over stdio until end of input, a drain after SIGTERM / SIGINT, or a device failure; the exit status."""
    executor = app.executor
    tracker = ToolCallTracker()
    server.middleware.append(tracker)
    relay = StdioRelay()
    failed = anyio.Event()
    loop = asyncio.get_running_loop()
    status = 0

    def on_fatal(_message: str) -> None:  # called in the executor's worker thread
        loop.call_soon_threadsafe(failed.set)

    executor.on_fatal = on_fatal

    async def drain() -> None:
        exit_soon(0, settings.drain_timeout_s + SHUTDOWN_MARGIN_S)  # whatever hangs, the process ends by then
        executor.begin_shutdown()
        ends = time.monotonic() + settings.drain_timeout_s
        drained = await executor.drain(settings.drain_timeout_s) and await tracker.wait_idle(ends - time.monotonic())
        if not drained:
            log.warning("requests still running after %.0f s of draining are failed", settings.drain_timeout_s)
            app.decoder.close()  # decodes in progress end now, with "shutting down"
            await anyio.to_thread.run_sync(executor.stop, 0.5)
        await tracker.wait_idle(LAST_ANSWERS_S if not drained else ANSWER_GRACE_S)
        relay.close()

    async def on_signals(task_group: anyio.abc.TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if executor.draining:
                    exit_now(signum)
                log.info("%s: finishing admitted requests, refusing new ones", signal.Signals(signum).name)
                task_group.start_soon(drain)

    async def on_device_failure() -> None:
        nonlocal status
        await failed.wait()
        status = EXIT_DEVICE_FAILURE
        exit_soon(status)
        await tracker.wait_idle(1.0)  # the failed calls say why before the process goes
        relay.close()

    relay.start()
    try:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(on_signals, task_group)
            task_group.start_soon(on_device_failure)
            await server.run_stdio_async()
            task_group.cancel_scope.cancel()
    finally:
        relay.restore()
    app.decoder.close()
    await anyio.to_thread.run_sync(executor.stop, STOP_AFTER_DRAIN_S if executor.draining else 5.0)
    return status


def endpoint_url(host: str, port: int) -> str:
    """The URL clients connect to: ``http://HOST:PORT/mcp`` (an IPv6 address in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{HTTP_PATH}"


def serve_http(server: MCPServer, app: AppState, settings: Settings) -> int:
    """Serve streamable HTTP until SIGTERM / SIGINT (drained by uvicorn) or a device failure; the exit status."""
    import uvicorn

    executor: Executor = app.executor

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Calls on open connections get "shutting down"; uvicorn waits for the running ones (cancelling them
            # after --drain-timeout, which kills their decode workers). Unlike uvicorn's own handler this one does
            # not re-raise the signal after the shutdown: a drained server exits with 0. A second signal ends it now.
            if self.should_exit:
                exit_now(sig)
            executor.begin_shutdown()
            exit_soon(0, settings.drain_timeout_s + SHUTDOWN_MARGIN_S)
            self.should_exit = True

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # bound and listening: say where (uvicorn's own line is below --log-level warning)
                log.info("serving MCP over streamable HTTP at %s", endpoint_url(settings.host, settings.port))

    asgi: ASGIApp = server.streamable_http_app(streamable_http_path=HTTP_PATH)  # type: ignore[assignment]
    if settings.token:
        asgi = bearer_guard(asgi, settings.token)
    config = uvicorn.Config(
        asgi,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
    )
    http = DrainingServer(config)
    status = 0

    def on_fatal(_message: str) -> None:
        nonlocal status
        status = EXIT_DEVICE_FAILURE
        exit_soon(status)
        http.should_exit = True

    executor.on_fatal = on_fatal
    http.run()
    app.decoder.close()
    executor.stop(timeout_s=STOP_AFTER_DRAIN_S if executor.draining else 1.0)
    return status


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    argv = sys.argv[1:] if argv is None else argv
    _quiet_libraries()
    if argv and argv[0] == "call":
        raise SystemExit(call_main(argv[1:]))
    p = OptionParser(
        "serve",
        description="MCP server: NExT-Chat grounding tools (locate_objects, segment_object, describe_region, "
        "visual_qa). Serves over stdio by default. `nextchat-mcp call TOOL JSON [options]` runs one tool and prints "
        "its result (`nextchat-mcp call TOOL --help` lists its options).",
    )
    settings, _ = p.parse_settings(argv)
    end_process(serve(settings))
