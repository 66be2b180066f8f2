"""Process lifetime over stdio, on a real subprocess with the tiny checkpoint: SIGTERM drains (admitted calls finish,
new ones are told the server is shutting down) and exits 0; end of stdin exits 0, without waiting for interpreter
teardown; and the exit watchdog ends a process whose GIL is held.

Raw JSON-RPC lines rather than the SDK client, so the test decides exactly when the signal and each call go out.
"""

import signal
import sys
import time

import anyio
import pytest
from server_process import RawSession, server_env, start, structured, tool_error
from support import make_image, png_data_uri


pytestmark = pytest.mark.anyio


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
        assert "shutting down" in tool_error(await session.answer(4))
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
        assert "device failed" in tool_error(await session.answer(1))
        while await session.read() is not None:  # the server leaves although the client keeps stdin open
            pass
        assert await process.wait() == EXIT_DEVICE_FAILURE


# The served process ends without interpreter finalisation (cli.end_process): here a module-level object whose
# finaliser never returns stands in for a slow teardown (after a drained demo server it took over 1 s, and it freezes
# the daemon threads, the exit timer among them).
HANGING_TEARDOWN_SERVER = """
import sys
import time

from mcp_server.cli import main


class TeardownThatHangs:
    def __del__(self):
        time.sleep(600)


teardown = TeardownThatHangs()
main(sys.argv[1:])
"""


async def test_end_of_stdin_exits_zero_without_waiting_for_interpreter_teardown(tiny_checkpoint) -> None:
    command = [sys.executable, "-c", HANGING_TEARDOWN_SERVER, "--model", str(tiny_checkpoint)]
    process = await anyio.open_process(command, env=server_env(), stderr=None)
    try:
        session = RawSession(process)
        with anyio.fail_after(120):
            await session.initialize()
            await session.call(1, "status", {})
            structured(await session.answer(1))
            assert process.stdin is not None
            await process.stdin.aclose()
        with anyio.fail_after(20):  # far below the finaliser's 600 s, far above a normal exit on a busy machine
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# The exit timer is a Python thread; C code holding the GIL (here a regular expression that backtracks for far longer
# than the test) stops it, and then the C watchdog behind it ends the process: status 1 and every thread's traceback.
GIL_HOLDER = """
import re

from mcp_server.cli import exit_soon

exit_soon(0, 0.5)
re.fullmatch(r"(a|aa)+b", "a" * 64)
"""


async def test_the_exit_watchdog_ends_a_process_whose_gil_is_held() -> None:
    from mcp_server.cli import EXIT_BACKSTOP_S

    started = time.monotonic()
    with anyio.fail_after(30):
        done = await anyio.run_process([sys.executable, "-c", GIL_HOLDER], env=server_env(), check=False)
    exit_s = time.monotonic() - started
    assert done.returncode == 1, done.stderr.decode()
    assert "in fullmatch" in done.stderr.decode()  # the traceback says what held the process
    assert exit_s < 0.5 + EXIT_BACKSTOP_S + 5.0  # interpreter start-up and import included, on a busy machine
