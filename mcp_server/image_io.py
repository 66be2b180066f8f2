"""Turn the untrusted ``image`` argument of an MCP tool into a checked RGB image.

Accepted forms: an absolute local path or ``file://`` URI under an allowed directory, an https (optionally http) URL,
a ``data:image/...;base64,`` URI, or raw base64 text. Whatever the form, the bytes are capped before they are read in
full, the format is chosen by magic bytes from a small allowlist (never by extension or Content-Type), the pixel count
is checked from the header before decoding, and every decoding failure becomes an :class:`ImageInputError` whose text
is one actionable sentence for the calling agent.

This module must not import torch: the MCP layer stays light and torch-free.
"""

import base64
import hashlib
import io
import math
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image, ImageOps

from mcp_server.image_structure import StructureError, check_structure
from mcp_server.messages import DecodedImage
from mcp_server.url_fetch import WEB_PORTS, AddressCheck, Resolver, UrlRejected, fetch_url


ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_FORMAT_LIST = "PNG, JPEG, WebP, GIF or BMP"
MAX_PATH_LENGTH = 4096
_ECHO_CHARS = 100
_ENABLE_LOCAL = "local files are disabled; start the server with --allow-dir DIR (or NEXTCHAT_ALLOW_DIRS)"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_BASE64_TEXT = re.compile(r"^[A-Za-z0-9+/=\s]+$")
_MIN_RAW_BASE64 = 64
# Exceptions Pillow raises on malformed input (headers, chunks, truncated streams); anything else is a real bug.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    TypeError,
    KeyError,
    ZeroDivisionError,
    OverflowError,
)


class ImageInputError(ValueError):
    """A bad image argument; ``str(e)`` is ONE actionable sentence for the calling agent.

    Never a stack trace, never a resolved IP, never a path outside the allowed dirs; at most the caller's own input,
    truncated to 100 characters.
    """


@dataclass(frozen=True)
class ImagePolicy:
    """What :func:`load_image` accepts; ``allowed_dirs`` are resolved with ``realpath`` at construction."""

    allowed_dirs: tuple[Path, ...] = ()
    allow_urls: bool = True
    allow_http: bool = False
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 16_384
    min_side: int = 8  # degenerate sizes rejected
    url_timeout_s: float = 15.0  # total; connect 3 s, read 5 s
    max_redirects: int = 3
    url_ports: frozenset[int] | None = WEB_PORTS  # None: any port

    def __post_init__(self) -> None:
        # Resolve once so containment compares real paths on both sides (a symlinked root such as macOS's /tmp works).
        roots = tuple(Path(os.path.realpath(os.fspath(d))) for d in self.allowed_dirs)
        object.__setattr__(self, "allowed_dirs", roots)


def _echo(text: str) -> str:
    """The caller's own input, made safe to quote in a message (one line, at most 100 characters)."""
    clipped = text[:_ECHO_CHARS] + ("…" if len(text) > _ECHO_CHARS else "")
    return repr(clipped)


def sniff_format(data: bytes) -> str | None:
    """The allowlisted format named by the magic bytes of ``data``, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM") and len(data) >= 26:
        return "BMP"
    return None


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a loaded, oriented image of any Pillow mode to uint8 [H, W, 3] RGB.

    Transparency is composited on white (models see a plain background, not the arbitrary colour hidden under
    alpha 0); 16/32-bit grayscale is scaled by 1/256 rather than clipped, which would saturate almost every pixel.
    """
    mode = image.mode
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        values = np.asarray(image).astype(np.int64)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "F":
        gray = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La", "P") or "transparency" in image.info:
        rgb = _composite_on_white(image)
    else:
        rgb = image.convert("RGB")  # 1, L, RGB, CMYK (Adobe inversion handled by Pillow), YCbCr, LAB, HSV
    return np.array(rgb, dtype=np.uint8)


def _check_size(size: tuple[int, int], policy: ImagePolicy) -> None:
    """Refuse, from the header, sizes over the policy's caps or Pillow's own pixel limit, and degenerate ones."""
    width, height = size
    limit = min(policy.max_pixels, Image.MAX_IMAGE_PIXELS or policy.max_pixels)
    if width * height > limit:
        raise ImageInputError(
            f"image has {width}×{height} pixels, more than the {limit} allowed; pass a downscaled image"
        )
    if max(width, height) > policy.max_side:
        raise ImageInputError(
            f"image is {width}×{height}, a side is longer than {policy.max_side}; pass a downscaled image"
        )
    if min(width, height) < policy.min_side:
        raise ImageInputError(
            f"image is {width}×{height}, a side is shorter than {policy.min_side}; pass a larger image"
        )


def decode_image(data: bytes, policy: ImagePolicy, source: str) -> DecodedImage:
    """Check and decode image bytes that already passed the byte cap.

    Runs wherever it is called, with no time limit and no lock: the server calls it only in its decode worker
    processes (:mod:`mcp_server.decode_pool`), each decoding one image at a time. ``warnings.catch_warnings`` swaps
    process-wide filters, so this function must not run in two threads of one process at once.

    Args:
        data: The original bytes.
        policy: Limits to apply.
        source: ``"path"``, ``"url"`` or ``"data"``.

    Returns:
        The decoded image.

    Raises:
        ImageInputError: For any unsupported, oversized, degenerate or undecodable image.
    """
    if not data:
        raise ImageInputError(f"image data is empty; pass a {_FORMAT_LIST} image")
    if len(data) > policy.max_bytes:
        raise ImageInputError(f"image is larger than {policy.max_bytes} bytes; pass a smaller image")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageInputError(f"image format is not supported; pass a {_FORMAT_LIST} image")
    try:
        check_structure(data, fmt)
    except StructureError as error:
        raise ImageInputError(str(error)) from None
    try:
        with warnings.catch_warnings():
            # Pillow's other warnings are not actionable for the caller; a bomb warning must stop the decode.
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as image:
                _check_size(image.size, policy)
                image.seek(0)  # GIF/WebP/APNG: the first frame only
                image.load()
                oriented = ImageOps.exif_transpose(image)
                pixels = _to_rgb(oriented)
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own limit fired while opening, before the policy check could run; report the tighter of the two.
        limit = min(policy.max_pixels, Image.MAX_IMAGE_PIXELS or policy.max_pixels)
        raise ImageInputError(f"image has more than {limit} pixels; pass a downscaled image") from None
    except _DECODE_ERRORS:
        raise ImageInputError(
            f"could not decode the {fmt} image (truncated or corrupt); pass a complete, valid image file"
        ) from None
    return DecodedImage(pixels=pixels, sha256=hashlib.sha256(data).hexdigest(), source=source, format=fmt)


def _read_local(path_text: str, policy: ImagePolicy) -> bytes:
    """Read a local file under ``policy.allowed_dirs`` with symlink, special-file and size checks."""
    real = _real_path(path_text, policy)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise ImageInputError(f"image file {_echo(path_text)} does not exist; check the path") from None
    except OSError:  # ELOOP (a symlink swapped in after realpath), EACCES, ...
        raise ImageInputError(f"image file {_echo(path_text)} could not be opened; pass a readable file") from None
    try:
        # Re-check where the descriptor really points: a parent directory swapped for a symlink between realpath()
        # and open() would otherwise let the read escape the allowed directories.
        try:
            opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            opened = real
        if not _inside_roots(opened, policy):
            raise _outside_roots(policy)
        _check_regular_file(fd, path_text, policy)
        return _read_capped(fd, policy.max_bytes)
    except OSError:
        raise ImageInputError(f"image file {_echo(path_text)} could not be read; pass a readable file") from None
    finally:
        os.close(fd)


def _real_path(path_text: str, policy: ImagePolicy) -> Path:
    """The real path of a caller's absolute path, refused unless it lies under an allowed directory."""
    if "\x00" in path_text:
        raise ImageInputError("image path contains a NUL byte; pass a plain absolute path")
    if len(path_text) > MAX_PATH_LENGTH:
        raise ImageInputError(f"image path is longer than {MAX_PATH_LENGTH} characters; pass a shorter path")
    if not os.path.isabs(path_text):
        raise ImageInputError(f"image path {_echo(path_text)} is relative; pass an absolute path (~ is not expanded)")
    if not policy.allowed_dirs:
        raise ImageInputError(_ENABLE_LOCAL)
    try:
        real = Path(os.path.realpath(path_text))
    except OSError:  # a link replaced by a file while it was being resolved (EINVAL), a link loop, ...
        raise ImageInputError(f"image path {_echo(path_text)} changed while it was read; try again") from None
    if not _inside_roots(real, policy):
        raise _outside_roots(policy)
    return real


def _inside_roots(path: Path, policy: ImagePolicy) -> bool:
    return any(path.is_relative_to(root) for root in policy.allowed_dirs)


def _outside_roots(policy: ImagePolicy) -> ImageInputError:
    # Same message whether or not the file exists, so the caller learns nothing about the rest of the filesystem.
    return ImageInputError(
        "image path is not inside an allowed directory; pass a file under one of: "
        + ", ".join(str(root) for root in policy.allowed_dirs)
    )


def _check_regular_file(fd: int, path_text: str, policy: ImagePolicy) -> None:
    """Refuse directories, FIFOs, devices and sockets, and files over the byte cap (from ``fstat``, before reading)."""
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise ImageInputError(f"image path {_echo(path_text)} is a directory; pass an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageInputError(f"image path {_echo(path_text)} is not a regular file; pass an image file")
    if info.st_size > policy.max_bytes:
        raise ImageInputError(f"image file is larger than {policy.max_bytes} bytes; pass a smaller image")


def _read_capped(fd: int, max_bytes: int) -> bytes:
    """At most ``max_bytes`` from ``fd``; one byte more is an error (the file may grow after ``fstat``)."""
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise ImageInputError(f"image file is larger than {max_bytes} bytes; pass a smaller image")
    return b"".join(chunks)


def _file_uri_path(uri: str) -> str:
    """The local path of a ``file:`` URI, percent-decoded (before any containment check)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        raise ImageInputError(f"file URI {_echo(uri)} could not be parsed; pass an absolute path instead") from None
    if parts.netloc not in ("", "localhost"):
        raise ImageInputError("file URIs must not name a remote host; use file:///absolute/path")
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        raise ImageInputError("file URI contains '?' or '#'; percent-encode them or pass a plain absolute path")
    try:
        return unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise ImageInputError("file URI is not valid percent-encoded UTF-8; pass a plain absolute path") from None


def _decode_base64(text: str, policy: ImagePolicy) -> bytes:
    """Decode base64 text after bounding its length (so a huge argument is refused before any decoding)."""
    limit = math.ceil(policy.max_bytes / 3) * 4 + 4
    if len(text) > 2 * limit:  # cheap guard before even stripping whitespace
        raise ImageInputError(f"base64 image is larger than {policy.max_bytes} bytes; pass a smaller image")
    compact = "".join(text.split())
    if len(compact) > limit:
        raise ImageInputError(f"base64 image is larger than {policy.max_bytes} bytes; pass a smaller image")
    try:
        return base64.b64decode(compact, validate=True)
    except (ValueError, TypeError):
        raise ImageInputError("image is not valid base64; check the alphabet and '=' padding") from None


def _data_uri_payload(uri: str) -> str:
    header, comma, payload = uri.partition(",")
    params = [p.strip().lower() for p in header[len("data:") :].split(";")]
    if not comma or not params[0].startswith("image/"):
        raise ImageInputError("data URI must look like data:image/png;base64,...; pass a base64 image data URI")
    if params[-1] != "base64":
        raise ImageInputError("data URI is not base64-encoded; pass data:image/<type>;base64,<data>")
    return payload


def looks_like_base64(text: str) -> bool:
    """Whether ``text`` is treated as raw base64: at least 64 characters of the base64 alphabet and whitespace."""
    return len(text) >= _MIN_RAW_BASE64 and _BASE64_TEXT.match(text) is not None


def load_image(
    spec: str,
    policy: ImagePolicy,
    *,
    resolver: Resolver | None = None,
    is_allowed_address: AddressCheck | None = None,
) -> DecodedImage:
    """Turn an untrusted ``image`` tool argument into a checked RGB image.

    Args:
        spec: An absolute path, ``file://`` URI, https (or, if allowed, http) URL, ``data:image/...;base64,`` URI or
            raw base64 text.
        policy: Which sources are allowed and the size limits.
        resolver: ``socket.getaddrinfo``-compatible resolver for URL hosts (called once per fetch hop).
        is_allowed_address: Address policy for URL fetches; defaults to public unicast addresses only.

    Returns:
        The decoded image.

    Raises:
        ImageInputError: With one actionable sentence for the calling agent.
    """
    data, source = image_bytes(spec, policy, resolver=resolver, is_allowed_address=is_allowed_address)
    return decode_image(data, policy, source)


def image_bytes(
    spec: str,
    policy: ImagePolicy,
    *,
    resolver: Resolver | None = None,
    is_allowed_address: AddressCheck | None = None,
) -> tuple[bytes, str]:
    """The bytes an ``image`` argument names, read under ``policy`` (capped), and their source: ``"path"``,
    ``"url"`` or ``"data"``. Nothing is decoded yet. See :func:`load_image` for the arguments."""
    text = _argument_text(spec)
    scheme_match = _SCHEME.match(text)
    scheme = scheme_match.group(1).lower() if scheme_match else ""
    if scheme == "data":
        return _decode_base64(_data_uri_payload(text), policy), "data"
    if scheme == "file":
        return _read_local(_file_uri_path(text), policy), "path"
    if scheme in ("http", "https"):
        return _fetch(text, policy, resolver, is_allowed_address), "url"
    if scheme:
        raise ImageInputError(
            f"image scheme {scheme[:20]!r} is not supported; pass an https URL, a data:image URI or an absolute path"
        )
    if text.startswith("/"):
        return _read_local(text, policy), "path"
    if looks_like_base64(text):
        return _decode_base64(text, policy), "data"
    raise ImageInputError(
        f"image {_echo(text)} is not an absolute path, URL, data URI or base64 image; "
        "pass an absolute path (relative paths and ~ are not accepted)"
    )


def _argument_text(spec: str) -> str:
    """The argument stripped of surrounding whitespace; refused when empty or not valid Unicode."""
    if not isinstance(spec, str):  # pyright: ignore[reportUnnecessaryIsInstance]  # in-process callers pass anything
        raise ImageInputError("image must be a string: a path, URL, data URI or base64 text")
    text = spec.strip()
    if not text:
        raise ImageInputError("image is empty; pass an absolute path, an https URL or base64 image data")
    if not text.isascii():
        try:
            text.encode("utf-8")  # lone surrogates reach here from in-process callers; the OS would refuse them
        except UnicodeEncodeError:
            raise ImageInputError("image is not valid Unicode text; pass a plain path, URL or base64 image") from None
    return text


def _fetch(url: str, policy: ImagePolicy, resolver: Resolver | None, is_allowed_address: AddressCheck | None) -> bytes:
    if not policy.allow_urls:
        raise ImageInputError("URLs are disabled on this server; pass an absolute path or base64 image data")
    try:
        return fetch_url(
            url,
            allow_http=policy.allow_http,
            max_bytes=policy.max_bytes,
            timeout_s=policy.url_timeout_s,
            max_redirects=policy.max_redirects,
            allowed_ports=policy.url_ports,
            resolver=resolver,
            is_allowed_address=is_allowed_address,
        )
    except UrlRejected as error:
        raise ImageInputError(str(error)) from None


__all__ = [
    "ALLOWED_FORMATS",
    "DecodedImage",
    "ImageInputError",
    "ImagePolicy",
    "decode_image",
    "image_bytes",
    "load_image",
    "looks_like_base64",
    "sniff_format",
]
