"""Bounded decoding: structural caps refuse scan bombs and marker floods at once; the decode pool kills a worker at
the call's deadline, replaces it, and keeps decoding for the next caller."""

import io
import struct
import time

import anyio
import numpy as np
import pytest
from PIL import Image
from support import encode, noise, rle8_bmp

from mcp_server.decode_pool import TOO_LONG, DecodePool
from mcp_server.image_io import ImageInputError, ImagePolicy
from mcp_server.image_structure import StructureError, check_structure


CAP = 20 * 1024 * 1024
MINIMAL_SOS = b"\xff\xda\x00\x08\x01\x01\x00\x00\x00\x00"


def scan_bomb(size: int = CAP) -> bytes:
    """A progressive grey JPEG with empty scans inserted before EOI up to ``size`` bytes (the issue's reproduction)."""
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000), 128).save(buffer, "JPEG", progressive=True)
    base = buffer.getvalue()
    end = base.rindex(b"\xff\xd9")
    return base[:end] + MINIMAL_SOS * ((size - len(base)) // len(MINIMAL_SOS)) + b"\xff\xd9"


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
async def test_cancelling_the_caller_kills_its_decode(pool) -> None:
    with anyio.move_on_after(0.5):
        await pool.decode(rle8_bmp(4000, 2500), ImagePolicy(), "data", time.monotonic() + 60)
    await replaced(pool)


@pytest.mark.anyio
async def test_a_closed_pool_refuses_at_once(pool) -> None:
    pool.close()
    with pytest.raises(ImageInputError, match="shutting down"):
        await pool.decode(b"\x89PNG", ImagePolicy(), "data", time.monotonic() + 5)
