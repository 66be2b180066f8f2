"""Image bytes for the decoder tests: a handmade hostile corpus and a seeded generator of random, mutated images.

Everything is built in memory from Pillow, zlib and struct; the largest file is a few hundred kB (the bombs are tiny
files that claim or decode to huge images).
"""

import io
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, features
from support import blank_bilevel_png, png_chunk


OK, ERROR, EITHER = "ok", "error", "either"


@dataclass(frozen=True)
class Specimen:
    """One input and what the loader must do with it: decode it (``ok``), refuse it (``error``, with ``message`` in
    the text when given) or either, as long as it does nothing else."""

    name: str
    data: bytes
    expect: str
    message: str = ""
    policy: dict = field(default_factory=dict)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes, extra: bytes = b"") -> bytes:
    """A PNG from already filtered scanlines (each row starts with its filter byte)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header claiming any size, followed by a tiny image body (the header alone must stop the decode)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(bytes(64)))
        + png_chunk(b"IEND", b"")
    )


def png16_rgb(width: int, height: int, seed: int = 0) -> bytes:
    values = np.random.default_rng(seed).integers(0, 65536, (height, width * 3), dtype=np.uint16).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in values)
    return raw_png(width, height, 16, 2, rows)


def gif_claiming(width: int, height: int) -> bytes:
    """A one-pixel GIF frame on a logical screen of any size."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def bmp_header(width: int, height: int, bits: int = 24, compression: int = 0) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + info + bytes(64)


def bmp_rows(width: int, height: int, seed: int = 0) -> bytes:
    """A 24-bit BMP with a negative height (rows stored top-down, which is legitimate)."""
    stride = (width * 3 + 3) // 4 * 4
    body = bytearray(stride * abs(height))
    body[:] = np.random.default_rng(seed).integers(0, 256, len(body), dtype=np.uint8).tobytes()
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(body), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + len(body), 0, 0, 54) + info + bytes(body)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF marker is rewritten to claim another size."""
    data = bytearray(encode(Image.fromarray(noise(16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """A VP8X (extended) WebP header claiming a canvas of any size, with a tiny real VP8L image after it."""
    small = encode(Image.fromarray(noise(8, 8)), "WEBP", lossless=True)
    vp8l = small[12:]
    flags = struct.pack("<I", 0)
    canvas = struct.pack("<I", width - 1)[:3] + struct.pack("<I", height - 1)[:3]
    vp8x = b"VP8X" + struct.pack("<I", 10) + flags + canvas
    body = b"WEBP" + vp8x + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def jpeg_with_segment(marker: bytes, payload: bytes) -> bytes:
    """A small JPEG with one extra APPn segment inserted after SOI."""
    data = encode(Image.fromarray(noise(24, 24)), "JPEG")
    segment = marker + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + segment + data[2:]


def animated(fmt: str, frames: int, size: int = 8) -> bytes:
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    images = [Image.new("RGB", (size, size), colours[i % 3]) for i in range(frames)]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], duration=10, loop=0)


def hostile_corpus(gif_frames: int = 1000) -> list[Specimen]:
    """The handmade corpus: bombs, lying headers, truncation, disguised formats, polyglots and awkward modes."""
    png = encode(Image.fromarray(noise(32, 24)), "PNG")
    jpeg = encode(Image.fromarray(noise(32, 24)), "JPEG")
    gif = encode(Image.fromarray(noise(32, 24)).convert("P"), "GIF")
    webp = encode(Image.fromarray(noise(32, 24)), "WEBP")
    bmp = encode(Image.fromarray(noise(32, 24)), "BMP")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("payload.js", "alert(1)")
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF
    alpha_text = np.zeros((32, 64, 4), np.uint8)
    alpha_text[..., :3] = 255
    alpha_text[8:24, 8:56, :3] = 0  # black "text" hidden under alpha 0
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (8, 0, 16, 16))
    svg = (
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        b'width="64" height="64"><image xlink:href="http://127.0.0.1:6379/x.png" width="64" height="64"/></svg>'
    )
    tiff_pages = encode(
        Image.fromarray(noise(16, 16)), "TIFF", save_all=True, append_images=[Image.fromarray(noise(16, 16, 1))]
    )
    unsupported = "format is not supported"
    corpus = [
        # Decompression bombs and lying headers: refused from the header, before any pixel is decoded.
        Specimen("png-bomb-20000x20000-1bit", blank_bilevel_png(20_000, 20_000), ERROR, "pixels"),
        Specimen("png-bomb-9400x9400-1bit", blank_bilevel_png(9400, 9400), ERROR, "pixels"),
        Specimen("png-claims-100000x100000", png_claiming(100_000, 100_000), ERROR),
        Specimen("png-claims-2^31-wide", png_claiming(2**31 - 1, 8), ERROR),
        Specimen("png-0x0", png_claiming(0, 0), ERROR),
        Specimen("png-1x100000", png_claiming(1, 100_000), ERROR),
        Specimen("png-100000x1", blank_bilevel_png(100_000, 1), ERROR),
        Specimen("gif-screen-65535x65535", gif_claiming(65535, 65535), ERROR),
        Specimen("jpeg-claims-65500x65500", jpeg_claiming(65500, 65500), ERROR),
        Specimen("webp-claims-16383x16383", webp_claiming(16383, 16383), ERROR),
        Specimen("bmp-claims-100000x100000", bmp_header(100_000, 100_000), ERROR),
        Specimen("bmp-negative-width", bmp_header(-64, 64), ERROR),
        Specimen("bmp-0x0", bmp_header(0, 0), ERROR),
        Specimen("bmp-rle8-claims-30000x30000", bmp_header(30_000, 30_000, bits=8, compression=1), ERROR),
        # Degenerate and boundary sizes.
        Specimen("png-1x1", encode(Image.new("RGB", (1, 1)), "PNG"), ERROR, "shorter than"),
        Specimen("png-7x7", encode(Image.new("RGB", (7, 7)), "PNG"), ERROR, "shorter than"),
        Specimen("png-8x8", encode(Image.new("RGB", (8, 8)), "PNG"), OK),
        Specimen("png-27x27", encode(Image.fromarray(noise(27, 27)), "PNG"), OK),
        Specimen("png-1x16384", blank_bilevel_png(1, 16384), ERROR, "shorter than"),
        Specimen("png-16384x8", blank_bilevel_png(16384, 8), OK),
        Specimen("png-16385x8", blank_bilevel_png(16385, 8), ERROR, "longer than"),
        Specimen("png-at-pixel-cap", blank_bilevel_png(1000, 1000), OK, policy={"max_pixels": 1_000_000}),
        Specimen("png-one-row-over-cap", blank_bilevel_png(1000, 1001), ERROR, "pixels", {"max_pixels": 1_000_000}),
        Specimen("bmp-top-down", bmp_rows(24, -16), OK),
        # Truncated and corrupt files.
        Specimen("empty", b"", ERROR, "empty"),
        Specimen("one-byte", b"\x89", ERROR, unsupported),
        Specimen("png-signature-only", png[:8], ERROR),
        Specimen("png-truncated-half", png[: len(png) // 2], ERROR, "could not decode"),
        Specimen("png-bad-ihdr-crc", bytes(bad_crc), ERROR, "could not decode"),
        Specimen("png-without-iend", png[:-12], EITHER),
        Specimen("jpeg-truncated-half", jpeg[: len(jpeg) // 2], ERROR, "could not decode"),
        Specimen("jpeg-soi-only", b"\xff\xd8\xff", ERROR),
        Specimen("gif-truncated", gif[: len(gif) // 2], ERROR),
        Specimen("webp-truncated", webp[: len(webp) // 2], ERROR),
        Specimen("bmp-truncated", bmp[: len(bmp) // 2], ERROR),
        Specimen("random-bytes", noise(1024, 1, 5, 1).tobytes(), ERROR, unsupported),
        # Formats outside the allowlist, plain and disguised.
        Specimen("svg-external-ref", svg, ERROR, unsupported),
        Specimen("html", b"<!DOCTYPE html><html><img src=http://169.254.169.254/></html>", ERROR, unsupported),
        Specimen("pdf", b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", ERROR, unsupported),
        Specimen("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", ERROR, unsupported),
        Specimen("psd", b"8BPS\x00\x01" + bytes(20) + struct.pack(">IIHH", 30000, 30000, 8, 3), ERROR, unsupported),
        Specimen("tiff-multipage", tiff_pages, ERROR, unsupported),
        Specimen("ico", encode(Image.fromarray(noise(16, 16)), "ICO"), ERROR, unsupported),
        Specimen("ppm", encode(Image.fromarray(noise(16, 16)), "PPM"), ERROR, unsupported),
        Specimen("svg-behind-png-signature", b"\x89PNG\r\n\x1a\n" + svg, ERROR, "could not decode"),
        Specimen("html-behind-gif-signature", b"GIF89a" + b"<script>alert(1)</script>", ERROR),
        Specimen("tiff-behind-bmp-signature", b"BM" + tiff_pages, ERROR),
        # Polyglots: read as the image their first bytes say, the rest ignored.
        Specimen("png-zip-polyglot", png + archive.getvalue(), OK),
        Specimen("jpeg-zip-polyglot", jpeg + archive.getvalue(), OK),
        Specimen("gif-js-polyglot", gif + b"/*" + b"*/alert(1)", EITHER),
        # Animation: the first frame only, without walking every frame.
        Specimen(f"gif-{gif_frames}-frames", animated("GIF", gif_frames), OK),
        Specimen("apng-3-frames", animated("PNG", 3, 16), OK),
        Specimen("webp-animated-3-frames", animated("WEBP", 3, 16), OK),
        # Modes.
        Specimen("png-16bit-gray", encode(Image.fromarray(np.full((16, 16), 40000, np.uint16)), "PNG"), OK),
        Specimen("png-16bit-rgb", png16_rgb(16, 12), OK),
        Specimen("png-palette-trns", encode(palette, "PNG", transparency=0), OK),
        Specimen("gif-palette-trns", encode(palette, "GIF", transparency=0), OK),
        Specimen("png-la", encode(Image.fromarray(noise(16, 16, 2, 2)), "PNG"), OK),
        Specimen("png-rgba-alpha0-text", encode(Image.fromarray(alpha_text), "PNG"), OK),
        Specimen("png-bilevel", encode(Image.fromarray(noise(16, 16, 3, 1) > 127), "PNG"), OK),
        Specimen("jpeg-cmyk", encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), OK),
        Specimen("jpeg-gray", encode(Image.fromarray(noise(16, 16, 1, 1)), "JPEG"), OK),
        Specimen("jpeg-progressive", encode(Image.fromarray(noise(64, 64)), "JPEG", progressive=True), OK),
        Specimen("bmp-palette", encode(Image.fromarray(noise(16, 16)).convert("P"), "BMP"), OK),
        Specimen("bmp-rgba", encode(Image.fromarray(noise(16, 16, 1, 4)), "BMP"), OK),
        # Metadata: every orientation, out-of-range orientations, corrupt EXIF, oversized ICC and text chunks.
        *[
            Specimen(
                f"jpeg-exif-orientation-{o}", encode(Image.fromarray(noise(16, 8)), "JPEG", exif=exif_bytes(o)), OK
            )
            for o in range(1, 9)
        ],
        Specimen("png-exif-orientation-0", encode(Image.fromarray(noise(16, 8)), "PNG", exif=exif_bytes(0)), OK),
        Specimen("png-exif-orientation-9", encode(Image.fromarray(noise(16, 8)), "PNG", exif=exif_bytes(9)), OK),
        Specimen("jpeg-corrupt-exif", jpeg_with_segment(b"\xff\xe1", b"Exif\x00\x00MM\x00*\xff\xff\xff\xff"), EITHER),
        Specimen("jpeg-60kb-icc", jpeg_with_segment(b"\xff\xe2", b"ICC_PROFILE\x00\x01\x01" + bytes(60_000)), EITHER),
        Specimen(
            "png-1mb-text-chunk",
            raw_png(8, 8, 8, 0, b"\x00" * 9 * 8, png_chunk(b"tEXt", b"k\x00" + b"A" * 1_000_000)),
            OK,
        ),
        Specimen(
            "png-ztxt-bomb",
            raw_png(8, 8, 8, 0, b"\x00" * 9 * 8, png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(bytes(50 << 20), 9))),
            EITHER,
        ),
        Specimen(
            "png-iccp-garbage",
            raw_png(8, 8, 8, 0, b"\x00" * 9 * 8, png_chunk(b"iCCP", b"p\x00\x00" + zlib.compress(bytes(200_000)))),
            EITHER,
        ),
    ]
    if not features.check("webp"):
        corpus = [s for s in corpus if "webp" not in s.name]
    return corpus


# ------------------------------------------------------------------------------------------------------------------
# Random generated images

ALLOWED = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
OTHERS = ("TIFF", "ICO", "PPM", "TGA", "PCX")
MODES = {
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"),
    "JPEG": ("L", "RGB", "CMYK"),
    "GIF": ("L", "P", "RGB"),
    "BMP": ("1", "L", "P", "RGB", "RGBA"),
    "WEBP": ("RGB", "RGBA"),
    "TIFF": ("L", "RGB"),
    "ICO": ("RGBA",),
    "PPM": ("RGB",),
    "TGA": ("RGB",),
    "PCX": ("RGB",),
}


def _size(rng: np.random.Generator) -> tuple[int, int]:
    roll = rng.random()
    if roll < 0.7:
        return int(rng.integers(1, 129)), int(rng.integers(1, 129))
    if roll < 0.9:
        return int(rng.integers(1, 601)), int(rng.integers(1, 601))
    edges = [1, 2, 7, 8, 9, 255, 256, 257]
    long_side = int(rng.choice([4096, 16384, 16385]))
    short_side = int(rng.choice(edges))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _pixels(rng: np.random.Generator, width: int, height: int, mode: str) -> Image.Image:
    kind = rng.integers(0, 3)
    if kind == 0:
        rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    elif kind == 1:
        ramp = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
        rgba = np.broadcast_to(ramp, (height, width, 4)).astype(np.uint8).copy()
    else:
        rgba = np.full((height, width, 4), rng.integers(0, 256, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    if mode in ("I;16", "I"):
        values = rng.integers(0, 65536, (height, width)).astype(np.uint16 if mode == "I;16" else np.int32)
        return Image.fromarray(values)
    if mode == "P":
        return image.convert("RGB").quantize(int(rng.integers(2, 257)))
    return image.convert(mode)


def _mutate(rng: np.random.Generator, data: bytes) -> tuple[bytes, str]:
    if not data:
        return data, "none"
    how = str(rng.choice(["none", "truncate", "flip", "header", "insert", "append", "splice"]))
    buffer = bytearray(data)
    if how == "truncate":
        buffer = buffer[: int(rng.integers(0, len(buffer)))]
    elif how == "flip":
        for position in rng.integers(0, len(buffer), int(rng.integers(1, 9))):
            buffer[position] = int(rng.integers(0, 256))
    elif how == "header":  # the first 40 bytes hold every allowed format's dimensions
        for position in rng.integers(min(6, len(buffer) - 1), min(40, len(buffer)), int(rng.integers(1, 5))):
            buffer[position] = int(rng.integers(0, 256))
    elif how == "insert":
        at = int(rng.integers(0, len(buffer) + 1))
        buffer[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif how == "append":
        buffer += rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
    elif how == "splice":
        start = int(rng.integers(0, len(buffer)))
        stop = int(rng.integers(start, len(buffer) + 1))
        buffer += buffer[start:stop]
    return bytes(buffer), how


def mutated_seeds(corpus: list[Specimen], count: int, seed: int = 20_261_126) -> Iterator[tuple[str, bytes]]:
    """``count`` random mutations of the corpus's small specimens (the seeds a coverage fuzzer would start from)."""
    seeds = [s for s in corpus if 0 < len(s.data) <= 64 * 1024]
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        specimen = seeds[int(rng.integers(0, len(seeds)))]
        data, mutation = _mutate(rng, specimen.data)
        yield f"seed {specimen.name} mutation={mutation}", data


def generated_images(count: int, seed: int = 20_261_125) -> Iterator[tuple[str, bytes]]:
    """``count`` (description, bytes) pairs: random sizes, modes, formats, metadata and animation, then a random
    mutation (or none). Seeded: the same count gives the same inputs on every run."""
    webp = features.check("webp")
    produced = 0
    index = 0
    while produced < count:
        rng = np.random.default_rng([seed, index])
        index += 1
        fmt = str(rng.choice(OTHERS)) if rng.random() < 0.1 else str(rng.choice(ALLOWED))
        if fmt == "WEBP" and not webp:
            continue
        mode = str(rng.choice(MODES[fmt]))
        width, height = _size(rng)
        if fmt in ("GIF", "ICO", "PCX", "TGA", "WEBP") and max(width, height) > 4096:
            width, height = min(width, 600), min(height, 600)  # these writers are slow or refuse long strips
        options: dict = {}
        if fmt in ("PNG", "JPEG", "WEBP") and rng.random() < 0.3:
            options["exif"] = exif_bytes(int(rng.integers(0, 10)))
        if fmt == "JPEG":
            options["quality"] = int(rng.integers(5, 100))
            options["progressive"] = bool(rng.random() < 0.3)
        if fmt in ("PNG", "GIF") and mode == "P" and rng.random() < 0.5:
            options["transparency"] = int(rng.integers(0, 2))
        image = _pixels(rng, width, height, mode)
        frames = int(rng.integers(2, 5)) if fmt in ("PNG", "GIF", "WEBP") and rng.random() < 0.15 else 1
        try:
            if frames > 1:
                others = [_pixels(rng, width, height, mode) for _ in range(frames - 1)]
                data = encode(image, fmt, save_all=True, append_images=others, **options)
            else:
                data = encode(image, fmt, **options)
        except (OSError, ValueError, KeyError):
            continue  # a combination Pillow cannot write; nothing to test
        data, mutation = _mutate(rng, data)
        produced += 1
        yield f"{fmt} {mode} {width}x{height} frames={frames} mutation={mutation}", data
