"""Helpers shared by test modules (fixtures live in the conftest files)."""

import base64
import io
import struct
import zlib

import jsonschema
import numpy as np
from mcp import Client
from PIL import Image


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
    payload = b"\x01\x07" * (width * height)
    palette = bytes(range(256)) * 4
    offset = 14 + 40 + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(payload), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(payload), 2835, 2835, 256, 0)
    return header + info + palette + payload
