"""Helpers shared by test modules (fixtures live in the conftest files)."""

import base64
import io
import struct
import zlib

import jsonschema
import numpy as np
from mcp import Client
from PIL import Image


CAP = 20 * 1024 * 1024  # the server's default byte cap on an image
MINIMAL_SOS = b"\xff\xda\x00\x08\x01\x01\x00\x00\x00\x00"  # an empty progressive scan: 10 bytes


def make_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A noisy RGB uint8 [H, W, 3] image with a red rectangle."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[height // 4 : height // 2, width // 4 : width // 2] = (220, 30, 30)
    return image


def noise(width: int = 16, height: int = 10, seed: int = 0) -> np.ndarray:
    """A pure-noise RGB uint8 [H, W, 3] image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    """A Pillow image saved in ``fmt`` (keyword arguments go to ``Image.save``)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_data_uri(pixels: np.ndarray) -> str:
    """An RGB uint8 image as a data:image/png;base64 URI."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def call(client: Client, tool: str, arguments: dict) -> dict:
    """Call a tool that must succeed; its structured result, checked against the tool's published outputSchema."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, "".join(getattr(b, "text", "") for b in result.content)
    schema = next(t for t in (await client.list_tools()).tools if t.name == tool).output_schema
    jsonschema.validate(result.structured_content, schema)
    return result.structured_content


async def error_text(client: Client, tool: str, arguments: dict) -> str:
    """Call a tool that must fail with a tool error; the error's text."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error
    return "".join(getattr(b, "text", "") for b in result.content)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body and CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def blank_bilevel_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of any size whose rows are all zero: a few kB even at 20000×20000 (a decompression bomb)."""
    compressor, row, left, parts = zlib.compressobj(9), bytes(1 + (width + 7) // 8), height, []
    while left:
        n = min(left, 512)
        parts.append(compressor.compress(row * n))
        left -= n
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b"")
    )


def rle8_bmp(width: int, height: int) -> bytes:
    """A run-length BMP that Pillow decodes in Python, one pair of bytes at a time: seconds of CPU, no cap met."""
    return rle8_bmp_file(width, height, b"\x01\x07" * (width * height))


def slow_bmp(size: int = CAP) -> bytes:
    """A valid 40 MP run-length BMP of ``size`` bytes (at most) that passes every cap and takes Pillow's Python
    decoder about 15 s of CPU here: a first row filled by long runs, then pairs that add nothing to the full row
    (two bytes per step), then each other row a one-pixel run and an end of line (padded one byte per step)."""
    side = 6324  # 39,992,976 pixels, under the 40 MP cap
    first_row = b"\xff\x07" * (side // 255) + bytes([side % 255, 7])
    rows = b"\x01\x07\x00\x00" * (side - 1)
    room = size - 2000 - len(first_row) - len(rows)  # 2000: the file's headers and palette, with a margin
    return rle8_bmp_file(side, side, first_row + b"\x01\x07" * (room // 2) + b"\x00\x00" + rows)


def rle8_bmp_file(width: int, height: int, payload: bytes) -> bytes:
    """An 8-bit run-length BMP (grey palette) around ``payload``."""
    palette = bytes(range(256)) * 4
    offset = 14 + 40 + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(payload), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(payload), 2835, 2835, 256, 0)
    return header + info + palette + payload


def scan_bomb(size: int = CAP) -> bytes:
    """A progressive grey 6000×6000 JPEG with empty scans inserted before EOI up to ``size`` bytes (issue 15's
    reproduction: each scan costs the decoder a pass over the whole coefficient buffer)."""
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000), 128).save(buffer, "JPEG", progressive=True)
    base = buffer.getvalue()
    end = base.rindex(b"\xff\xd9")
    return base[:end] + MINIMAL_SOS * ((size - len(base)) // len(MINIMAL_SOS)) + b"\xff\xd9"
