"""Bounded decoding: structural caps refuse scan bombs and marker floods at once; the decode pool kills a worker at
the call's deadline, replaces it, and keeps decoding for the next caller."""

import base64
import signal
import struct
import sys
import time
from pathlib import Path

import anyio
import numpy as np
import pytest
from mcp import Client
from PIL import Image
from server_process import decode_workers, running, server_env, wait_until_decoding
from support import CAP, call, encode, noise, rle8_bmp, scan_bomb, slow_bmp

from mcp_server.decode_pool import TOO_LONG, DecodePool
from mcp_server.image_io import ImageInputError, ImagePolicy
from mcp_server.image_structure import StructureError, check_structure
from mcp_server.server import create_server
from mcp_server.settings import Settings
from nextchat import processing
from nextchat.resizing import InputSides, resize_for_model


@pytest.mark.parametrize(
    ("data", "fmt", "message"),
    [
        (scan_bomb(), "JPEG", "progressive scans"),
        (b"\xff\xd8" + b"\xff" * (CAP - 4) + b"\xd9", "JPEG", "padding bytes"),
        (b"\xff\xd8" + b"\xff\xe1\x00\x02" * (CAP // 4) + b"\xff\xd9", "JPEG", "markers"),
        (
            encode(Image.fromarray(noise(16, 16)), "PNG")[:33] + (struct.pack(">I4sI", 0, b"tEXt", 0)) * (CAP // 12),
            "PNG",
            "chunks",
        ),
    ],
    ids=["scan-bomb", "fill-flood", "marker-flood", "png-chunk-flood"],
)
def test_structural_floods_are_refused_in_milliseconds(data: bytes, fmt: str, message: str) -> None:
    started = time.perf_counter()
    with pytest.raises(StructureError, match=message):
        check_structure(data, fmt)
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("options", [{}, {"progressive": True, "optimize": True}, {"quality": 95, "subsampling": 0}])
def test_ordinary_jpegs_pass_the_structure_check(options: dict) -> None:
    check_structure(encode(Image.fromarray(noise(640, 480)), "JPEG", **options), "JPEG")
    for fmt in ("PNG", "GIF", "WEBP"):
        check_structure(encode(Image.fromarray(noise(64, 48)), fmt), fmt)


async def replaced(pool: DecodePool) -> None:
    """Wait (5 s at most) until the killed worker's thread has handed it back as dead."""
    with anyio.fail_after(5.0):
        while pool.replaced < 1:
            await anyio.sleep(0.01)


@pytest.fixture
def pool():
    pool = DecodePool(workers=1, memory_bytes=1 << 30)
    yield pool
    pool.close()


@pytest.mark.anyio
async def test_a_decode_past_its_deadline_is_killed_and_the_next_decode_gets_a_fresh_worker(pool) -> None:
    small = encode(Image.fromarray(noise(64, 48)), "PNG")
    assert (await pool.decode(small, ImagePolicy(), "data", time.monotonic() + 30)).width == 64
    started = time.monotonic()
    with pytest.raises(ImageInputError, match=TOO_LONG):
        await pool.decode(rle8_bmp(4000, 2500), ImagePolicy(), "data", started + 1.0)
    assert time.monotonic() - started < 2.0
    await replaced(pool)
    image = await pool.decode(small, ImagePolicy(), "data", time.monotonic() + 30)
    assert np.array_equal(image.pixels, noise(64, 48))


@pytest.mark.anyio
async def test_a_refused_image_leaves_its_worker_decoding_the_next_callers_image(pool) -> None:
    small = encode(Image.fromarray(noise(64, 48)), "PNG")
    for refused, message in [(scan_bomb(1 << 20), "progressive scans"), (b"\xff\xd8\xff" + bytes(64), "corrupt")]:
        with pytest.raises(ImageInputError, match=message):
            await pool.decode(refused, ImagePolicy(), "data", time.monotonic() + 30)
        image = await pool.decode(small, ImagePolicy(), "data", time.monotonic() + 30)  # the same, only worker
        assert np.array_equal(image.pixels, noise(64, 48))
    assert pool.replaced == 0


@pytest.mark.anyio
@pytest.mark.parametrize(("size", "made"), [((640, 90), 2), ((48, 300), 2), ((100, 60), 1), ((40, 30), 0)])
async def test_the_worker_makes_the_first_resizes_that_shrink_the_image(pool, size: tuple[int, int], made: int) -> None:
    """For the sides it is given, the worker makes each branch's first resize where it shrinks the image (an
    enlargement costs no more than the model's input and is left to the model's side)."""
    sides = InputSides(vision=56, sam=128)
    data = encode(Image.fromarray(noise(*size)), "PNG")
    plain = await pool.decode(data, ImagePolicy(), "data", time.monotonic() + 30)
    assert plain.resized is None
    image = await pool.decode(data, ImagePolicy(), "data", time.monotonic() + 30, sides)
    expected = resize_for_model(noise(*size), sides)
    assert image.resized is not None and image.resized.sides == sides
    for got, want in ((image.resized.square, expected.square), (image.resized.sam, expected.sam)):
        assert (got is None and want is None) or np.array_equal(got, want)
    assert sum(array is not None for array in (image.resized.square, image.resized.sam)) == made
    assert np.array_equal(image.pixels, plain.pixels)
    assert image.nbytes == plain.pixels.nbytes + expected.nbytes


@pytest.mark.anyio
async def test_once_the_model_has_loaded_the_model_thread_resizes_no_image(
    tiny_checkpoint: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server names the loaded model's input sides to its decode workers, so the resizes that grow with the
    image (nextchat.resizing) are made there, under the workers' limits, and never stall the model's batch."""
    server = create_server(Settings(model=str(tiny_checkpoint), device="cpu", allow_dirs=(image_dir,)))
    app = server.app

    def resized_on_the_model_thread(*_: object) -> None:
        raise AssertionError("the model thread resized an image that its decode worker should have")

    try:
        async with Client(server) as client:
            assert await app.executor.wait_ready(30)
            monkeypatch.setattr(processing, "square_resized", resized_on_the_model_thread)
            monkeypatch.setattr(processing, "sam_resized_image", resized_on_the_model_thread)
            located = await call(client, "locate_objects", {"image": str(image_dir / "scene1.png"), "query": "circle"})
            await call(client, "segment_object", {"image": located["image"]["id"], "box": [4, 4, 60, 60]})
            wide = encode(Image.fromarray(noise(900, 40)), "PNG")
            await call(client, "segment_object", {"image": "data:image/png;base64," + b64(wide), "box": [0, 0, 90, 40]})
    finally:
        app.executor.stop()
        app.decoder.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.anyio
async def test_cancelling_the_caller_kills_its_decode(pool) -> None:
    with anyio.move_on_after(0.5):
        await pool.decode(rle8_bmp(4000, 2500), ImagePolicy(), "data", time.monotonic() + 60)
    await replaced(pool)


@pytest.mark.anyio
async def test_a_closed_pool_refuses_at_once(pool) -> None:
    pool.close()
    with pytest.raises(ImageInputError, match="shutting down"):
        await pool.decode(b"\x89PNG", ImagePolicy(), "data", time.monotonic() + 5)


@pytest.mark.anyio
async def test_a_refused_image_leaves_its_worker_alive_for_the_next_caller(pool) -> None:
    # The refusal is the worker's answer: killing that worker after handing it back made the next caller's good
    # image fail with "the image decoder stopped".
    small = encode(Image.fromarray(noise(64, 48)), "PNG")
    for _ in range(2):
        with pytest.raises(ImageInputError, match="markers"):
            await pool.decode(b"\xff\xd8" + b"\xff\xe1\x00\x02" * 5000 + b"\xff\xd9", ImagePolicy(), "data",
                              time.monotonic() + 30)  # fmt: skip
        image = await pool.decode(small, ImagePolicy(), "data", time.monotonic() + 30)
        assert np.array_equal(image.pixels, noise(64, 48))
    assert pool.replaced == 0


# A server that ends without killing its workers first (a second SIGTERM, its exit timer, a crash, SIGKILL): the
# workers must not go on decoding without it.
DECODING_PARENT = """
import sys
import time

import anyio

from mcp_server.decode_pool import DecodePool
from mcp_server.image_io import ImagePolicy

data = open(sys.argv[1], "rb").read()
anyio.run(DecodePool(workers=1).decode, data, ImagePolicy(), "data", time.monotonic() + 120)
"""


@pytest.mark.anyio
async def test_a_worker_ends_with_its_parent_even_in_the_middle_of_a_decode(tmp_path: Path) -> None:
    (tmp_path / "slow.bmp").write_bytes(slow_bmp())
    command = [sys.executable, "-c", DECODING_PARENT, str(tmp_path / "slow.bmp")]
    parent = await anyio.open_process(command, env=server_env(), stderr=None)
    try:
        await wait_until_decoding(parent, cpu_s=0.3)
        # The decoding worker, and maybe a spare the pool started beside it (it discards a surplus one): all end.
        workers = decode_workers(parent.pid)
        assert workers
        parent.send_signal(signal.SIGKILL)
        await parent.wait()
        with anyio.fail_after(1.0):
            while any(running(worker) for worker in workers):
                await anyio.sleep(0.02)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
