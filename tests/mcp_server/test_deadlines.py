"""One deadline per call, counted from its arrival: the read, the decode, the queue and the model share ``--timeout``;
no step starts a fresh one."""

import time
from pathlib import Path

import anyio
import pytest
from mcp import Client
from support import error_text

from mcp_server.server import create_server
from mcp_server.settings import Settings


pytestmark = pytest.mark.anyio
TIMEOUT_S = 2.0
SLOW_DECODE_S = 1.3  # most of the call's time: a fresh deadline after it would end the call 1.3 s late


async def test_a_slow_decode_leaves_the_model_only_what_is_left_of_the_calls_deadline(
    tiny_checkpoint: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = create_server(
        Settings(model=str(tiny_checkpoint), device="cpu", allow_dirs=(image_dir,), request_timeout_s=TIMEOUT_S)
    )
    app = server.app
    deadlines: dict[str, float] = {}
    real_decode = app.decoder.decode

    async def slow_decode(data, policy, source, deadline, sides=None):
        deadlines["decode"] = deadline
        await anyio.sleep(SLOW_DECODE_S)  # stands for a long fetch or decode that still finishes in time
        return await real_decode(data, policy, source, deadline, sides)

    async def stuck_model(job):
        deadlines["model"] = job.deadline
        await anyio.sleep_forever()  # a queue that never moves: only the deadline ends the call

    monkeypatch.setattr(app.decoder, "decode", slow_decode)
    monkeypatch.setattr(app.executor, "generate", stuck_model)
    try:
        async with Client(server) as client:
            assert await app.executor.wait_ready(30)  # loaded before the measured call arrives
            arrived = time.monotonic()
            text = await error_text(
                client, "locate_objects", {"image": str(image_dir / "scene0.png"), "query": "the red circle"}
            )
            answered = time.monotonic()
    finally:
        app.executor.stop()
        app.decoder.close()
    assert "took over 2 s and was dropped" in text
    assert deadlines["model"] - deadlines["decode"] < 0.1  # the job carries the call's deadline, not a new one
    assert arrived + TIMEOUT_S <= deadlines["decode"] <= arrived + TIMEOUT_S + 0.1  # set as the call arrived
    assert TIMEOUT_S - 0.1 <= answered - arrived < TIMEOUT_S + 0.6  # a fresh deadline: SLOW_DECODE_S + TIMEOUT_S
