"""Cheap structural bounds on image bytes, checked before any decoder sees them.

Decoders spend time per structural element, not per byte: libjpeg passes over the whole coefficient buffer once per
progressive scan (an empty scan is 11 bytes, so 20 MiB holds two million of them), Pillow walks JPEG markers, fill
and junk bytes before the first scan one byte at a time in Python, and PNG, GIF and WebP containers are walked chunk
by chunk (or sub-block by sub-block) in Python too. Each walk here counts those elements with byte searches and
``struct`` reads, stops at the first cap it passes, and so costs at most a few thousand steps whatever the input.

The caps sit far above what encoders write (libjpeg's progressive mode writes 10 scans, mozjpeg's up to about 30;
encoders split IDAT into chunks of 8 KiB or more), so ordinary images never meet them. What they do not catch, the
decode worker's deadline and resource limits do (:mod:`mcp_server.decode_pool`).

No torch, no Pillow: plain bytes in, :class:`~mcp_server.image_io.ImageInputError`-style refusals out.
"""

from __future__ import annotations

import re
import struct


MAX_JPEG_SCANS = 100
MAX_JPEG_MARKERS = 1000  # every marker segment in the file (tables, APPn, COM, SOS...), restart markers aside
MAX_JPEG_PADDING = 4096  # fill (0xFF) and junk bytes outside segments, before the first scan
MAX_PNG_CHUNKS = 20_000  # 20 MiB in 1 KiB IDAT chunks
MAX_GIF_BLOCKS = 4096  # extension blocks and their sub-blocks before the first image
MAX_WEBP_CHUNKS = 4096  # RIFF chunks (each animation frame is one)

# A marker in entropy-coded data: 0xFF (any fill run) then a byte that is not stuffing (00), a restart (D0-D7) or fill.
_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xd0-\xd7\xff])")
_JPEG_STANDALONE = frozenset({0x01, 0xD8, 0xD9})  # TEM, SOI, EOI: no length field
_SOS, _EOI = 0xDA, 0xD9
_FILL = re.compile(rb"\xff+")


class StructureError(ValueError):
    """The image's structure passes a cap; ``str(e)`` is one sentence for the caller."""


def check_structure(data: bytes, fmt: str) -> None:
    """Refuse ``data`` (already sniffed as ``fmt``) when it holds more structural elements than the caps allow.

    Malformed structure is left to the decoder (which reports it as corrupt); only counts are judged here.

    Raises:
        StructureError: naming what was too many and what to send instead.
    """
    if fmt == "JPEG":
        _check_jpeg(data)
    elif fmt == "PNG":
        _check_png(data)
    elif fmt == "GIF":
        _check_gif(data)
    elif fmt == "WEBP":
        _check_webp(data)


def _check_jpeg(data: bytes) -> None:
    markers = scans = 0
    position = _skip_jpeg_header(data)  # at the first SOS marker, or the end
    while position < len(data):
        found = _JPEG_MARKER.search(data, position)
        if found is None:
            return
        code = found.group(1)[0]
        if code == _EOI:
            return
        markers += 1
        scans += code == _SOS
        if scans > MAX_JPEG_SCANS:
            raise StructureError(
                f"the JPEG has more than {MAX_JPEG_SCANS} progressive scans; send a smaller or baseline image"
            )
        if markers > MAX_JPEG_MARKERS:
            raise StructureError(f"the JPEG has more than {MAX_JPEG_MARKERS} markers; re-encode it without extra data")
        position = found.end()
        if code not in _JPEG_STANDALONE and position + 2 <= len(data):
            position += struct.unpack_from(">H", data, position)[0]


def _skip_jpeg_header(data: bytes) -> int:
    """Walk the segments before the first scan (Pillow walks them in Python, byte by byte where there is fill or
    junk); the offset of the first SOS marker, or the end of the data."""
    position, markers, padding = 2, 0, 0
    while position < len(data):
        _check_header_counts(markers, padding)
        run = _FILL.match(data, position)
        if run is None:  # junk between segments
            following = data.find(b"\xff", position)
            following = len(data) if following < 0 else following
            padding += following - position
            position = following
            continue
        padding += run.end() - position - 1  # the last 0xFF belongs to the marker
        if run.end() >= len(data):
            break
        code = data[run.end()]
        if code == _SOS:
            return run.end() - 1
        markers += 1
        position = run.end() + 1
        if code not in _JPEG_STANDALONE and code != 0x00 and position + 2 <= len(data):
            position += struct.unpack_from(">H", data, position)[0]
    _check_header_counts(markers, padding)
    return len(data)


def _check_header_counts(markers: int, padding: int) -> None:
    if padding > MAX_JPEG_PADDING:
        raise StructureError(
            f"the JPEG has more than {MAX_JPEG_PADDING} padding bytes between its headers; re-encode it"
        )
    if markers > MAX_JPEG_MARKERS:
        raise StructureError(f"the JPEG has more than {MAX_JPEG_MARKERS} markers; re-encode it without extra data")


def _check_png(data: bytes) -> None:
    position, chunks = 8, 0
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise StructureError(f"the PNG has more than {MAX_PNG_CHUNKS} chunks; re-encode it with larger chunks")
        if kind == b"IEND":
            return
        position += 12 + length


def _check_gif(data: bytes) -> None:
    if len(data) < 13:
        return
    flags = data[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    blocks = 0
    while position < len(data) and data[position] == 0x21:  # extensions before the first image descriptor
        position += 2  # introducer and label
        while position < len(data):
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise StructureError(
                    f"the GIF has more than {MAX_GIF_BLOCKS} extension blocks before its first image; re-encode it"
                )
            size = data[position]
            position += 1 + size
            if size == 0:
                break


def _check_webp(data: bytes) -> None:
    position, chunks = 12, 0
    while position + 8 <= len(data):
        chunks += 1
        if chunks > MAX_WEBP_CHUNKS:
            raise StructureError(f"the WebP has more than {MAX_WEBP_CHUNKS} chunks (frames); send a still image")
        (size,) = struct.unpack_from("<I", data, position + 4)
        position += 8 + size + (size & 1)
