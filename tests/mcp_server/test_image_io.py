"""Tests for mcp_server.image_io: image decoding, formats and caps, orientation and modes, base64 and path confinement
(URLs are in test_url_fetch.py).

No test sends a packet beyond loopback: the network fixture (conftest.py) fails any non-loopback connect and any real
DNS lookup.
"""

import base64
import hashlib
import io
import os
import socket
import struct
import warnings
import zipfile
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image, ImageFile, features
from support import blank_bilevel_png, encode, noise

from mcp_server import image_io
from mcp_server.image_io import ImageInputError, ImagePolicy, load_image


pytestmark = pytest.mark.usefixtures("network")
FORMATS_HINT = "PNG, JPEG, WebP, GIF or BMP"


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def load_bytes(data: bytes, **policy) -> image_io.DecodedImage:
    return load_image(data_uri(data), ImagePolicy(**policy))


PNG = encode(Image.fromarray(noise()))


# ---------------------------------------------------------------------------------------------------------------------
# Formats, caps and corruption


@pytest.mark.parametrize(("fmt", "kwargs"), [("PNG", {}), ("JPEG", {}), ("GIF", {}), ("BMP", {}), ("WEBP", {})])
def test_allowed_formats_decode(fmt: str, kwargs: dict) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    image = load_bytes(encode(Image.fromarray(noise()), fmt, **kwargs))
    assert (image.format, image.pixels.shape, image.pixels.dtype) == (fmt, (10, 16, 3), np.uint8)


@pytest.mark.parametrize(
    "data",
    [
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
        b"<!DOCTYPE html><html><body><img src=x></body></html>",
        b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n",
        encode(Image.fromarray(noise()), "TIFF"),
        encode(Image.fromarray(noise()), "ICO"),
        b"8BPS\x00\x01" + bytes(40),
        np.random.default_rng(3).integers(0, 256, 512, dtype=np.uint8).tobytes(),
        b"",
    ],
    ids=["svg", "html", "pdf", "tiff", "ico", "psd", "random", "empty"],
)
def test_disallowed_formats_name_the_allowed_ones(data: bytes) -> None:
    with pytest.raises(ImageInputError) as caught:
        load_bytes(data)
    assert FORMATS_HINT in str(caught.value)


def test_png_zip_polyglot_is_read_as_png() -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("payload.txt", "hello")
    assert load_bytes(PNG + archive.getvalue()).format == "PNG"


def test_huge_dimensions_rejected_from_header_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(ImageInputError, match="pixels"):
        load_bytes(blank_bilevel_png(20_000, 20_000))
    with pytest.raises(ImageInputError, match="7000×7000 pixels, more than the 40000000"):
        load_bytes(blank_bilevel_png(7000, 7000))
    with pytest.raises(ImageInputError, match="longer than 16384"):
        load_bytes(blank_bilevel_png(17_000, 8))
    with pytest.raises(ImageInputError, match="shorter than 8"):
        load_bytes(blank_bilevel_png(4, 4))


def test_decompression_bomb_warning_is_an_error_and_filters_are_restored() -> None:
    filters = list(warnings.filters)
    with pytest.raises(ImageInputError, match=f"more than {Image.MAX_IMAGE_PIXELS} pixels"):
        load_bytes(blank_bilevel_png(10_000, 10_000), max_pixels=200_000_000)  # 100M: Pillow warns, does not raise
    assert warnings.filters == filters


def test_bmp_header_with_huge_dimensions() -> None:
    header = (
        b"BM"
        + struct.pack("<IHHI", 1000, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, 100_000, 100_000, 1, 24, 0, 0, 0, 0, 0, 0)
    )
    with pytest.raises(ImageInputError):
        load_bytes(header.ljust(54, b"\0") + bytes(64))


def test_truncated_and_corrupt_files() -> None:
    jpeg = encode(Image.fromarray(noise(64, 64)), "JPEG")
    bad_crc = bytearray(PNG)
    bad_crc[29] ^= 0xFF  # the IHDR checksum
    for data in (PNG[: len(PNG) // 2], jpeg[: len(jpeg) // 2], bytes(bad_crc)):
        with pytest.raises(ImageInputError, match="could not decode"):
            load_bytes(data)


def test_mutated_files_only_ever_raise_image_input_error() -> None:
    rng = np.random.default_rng(7)
    sources = [encode(Image.fromarray(noise(24, 24)), fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP")]
    for source in sources:
        for _ in range(25):
            data = bytearray(source)
            for position in rng.integers(len(source[:4]), len(data), 4):
                data[position] = int(rng.integers(0, 256))
            cut = int(rng.integers(8, len(data) + 1))
            try:
                image = load_bytes(bytes(data[:cut]))
            except ImageInputError:
                continue
            assert image.pixels.dtype == np.uint8 and image.pixels.shape[2] == 3


def test_byte_cap() -> None:
    with pytest.raises(ImageInputError, match="larger than 100 bytes"):
        load_bytes(PNG, max_bytes=100)


# ---------------------------------------------------------------------------------------------------------------------
# Modes and orientation

ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation(orientation: int) -> None:
    pixels = noise(16, 10, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = load_bytes(encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes()))
    np.testing.assert_array_equal(image.pixels, ORIENTATIONS[orientation](pixels))
    assert (image.width, image.height) == ((10, 16) if orientation >= 5 else (16, 10))


def test_exif_orientation_jpeg() -> None:
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = (255, 0, 0)  # red left half
    exif = Image.Exif()
    exif[0x0112] = 6
    image = load_bytes(encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes()))
    assert (image.width, image.height) == (16, 32)
    assert image.pixels[4, 8, 0] > 200 and image.pixels[28, 8, 0] < 50  # left half became the top half


def test_palette_with_and_without_transparency() -> None:
    palette_image = Image.new("P", (8, 8), 0)
    palette_image.paste(1, (4, 0, 8, 8))
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    opaque = load_bytes(encode(palette_image, "PNG")).pixels
    assert tuple(opaque[0, 0]) == (255, 0, 0) and tuple(opaque[0, 7]) == (0, 0, 255)
    see_through = load_bytes(encode(palette_image, "PNG", transparency=0)).pixels
    assert tuple(see_through[0, 0]) == (255, 255, 255) and tuple(see_through[0, 7]) == (0, 0, 255)
    gif = load_bytes(encode(palette_image, "GIF", transparency=0))
    assert gif.format == "GIF" and tuple(gif.pixels[0, 0]) == (255, 255, 255)


def test_alpha_is_composited_on_white() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere
    rgba[:, 4:, 3] = 255
    rgba[0, 4, 3] = 128
    pixels = load_bytes(encode(Image.fromarray(rgba))).pixels
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[0, 7]) == (255, 0, 0)
    assert pixels[0, 4, 0] == 255 and 120 <= pixels[0, 4, 1] <= 135
    la = np.zeros((8, 8, 2), np.uint8)
    la[:, 4:, 1] = 255
    la_pixels = load_bytes(encode(Image.fromarray(la))).pixels
    assert tuple(la_pixels[0, 0]) == (255, 255, 255) and tuple(la_pixels[0, 7]) == (0, 0, 0)
    key = np.zeros((8, 8, 3), np.uint8)
    key[:, :4] = (255, 0, 0)
    keyed = load_bytes(encode(Image.fromarray(key), "PNG", transparency=(255, 0, 0))).pixels
    assert tuple(keyed[0, 0]) == (255, 255, 255) and tuple(keyed[0, 7]) == (0, 0, 0)


def test_sixteen_bit_gray_is_scaled_not_saturated() -> None:
    values = np.array([0, 255, 256, 1000, 40000, 65535, 65535, 65535] * 8, np.uint16).reshape(8, 8)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    pixels = load_bytes(encode(image)).pixels
    np.testing.assert_array_equal(pixels[0, :, 0], [0, 0, 1, 3, 156, 255, 255, 255])
    assert (pixels[..., 0] == pixels[..., 2]).all()
    wide = image_io._to_rgb(Image.fromarray(np.array([[-5, 1000, 65535, 70000]] * 2, np.int32)))
    np.testing.assert_array_equal(wide[0, :, 1], [0, 3, 255, 255])


def test_cmyk_jpeg_and_bilevel() -> None:
    cmyk = load_bytes(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)).pixels
    assert cmyk[4, 4, 0] > 230 and cmyk[4, 4, 1] < 30 and cmyk[4, 4, 2] < 30
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.paste(1, (0, 0, 4, 8))
    pixels = load_bytes(encode(bilevel, "PNG")).pixels
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[0, 7]) == (0, 0, 0)


def test_gif_first_frame_only() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert tuple(load_bytes(data).pixels[0, 0]) == (255, 0, 0)


# ---------------------------------------------------------------------------------------------------------------------
# base64


def test_data_uri_and_raw_base64() -> None:
    image = load_bytes(PNG)
    assert (image.source, image.sha256) == ("data", hashlib.sha256(PNG).hexdigest())
    assert load_image(base64.b64encode(PNG).decode(), ImagePolicy()).format == "PNG"
    assert load_image(base64.encodebytes(PNG).decode(), ImagePolicy()).source == "data"  # with line breaks


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png;base64,iVBO-_xx", "not valid base64"),
        ("data:image/png;base64,abc", "not valid base64"),
        ("data:text/html;base64,PGh0bWw+", "data:image/png;base64"),
        ("data:image/png,%89PNG", "not base64-encoded"),
        ("data:image/png;base64,", "empty"),
        ("images/cat.png", "absolute path"),
        ("~/cat.png", "absolute path"),
        ("   ", "empty"),
        ("/srv/images/a\ud800.png", "not valid Unicode"),
        ("https://exa\udcffmple.com/a.png", "not valid Unicode"),
    ],
)
def test_bad_inline_arguments(spec: str, message: str) -> None:
    with pytest.raises(ImageInputError, match=message):
        load_image(spec, ImagePolicy())


def test_overlong_base64_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_io.base64, "b64decode", lambda *a, **k: pytest.fail("decoded"))
    for spec in ("data:image/png;base64," + "A" * 1400, "A" * 1400, "A\n" * 5000):
        with pytest.raises(ImageInputError, match="larger than 1000 bytes"):
            load_image(spec, ImagePolicy(max_bytes=1000))


# ---------------------------------------------------------------------------------------------------------------------
# Local paths


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, ImagePolicy]:
    root = tmp_path / "project"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "project2").mkdir()
    (root / "a.png").write_bytes(PNG)
    (tmp_path / "project2" / "a.png").write_bytes(PNG)
    return root, ImagePolicy(allowed_dirs=(root,))


def test_local_file_and_file_uri(tree) -> None:
    root, policy = tree
    (root / "my image.jpg").write_bytes(PNG)  # the extension is ignored
    assert load_image(str(root / "a.png"), policy).source == "path"
    assert load_image("file://" + quote(str(root / "my image.jpg")), policy).format == "PNG"
    assert load_image("file://localhost" + str(root / "a.png"), policy).format == "PNG"


def test_symlinked_root_is_resolved(tree, tmp_path: Path) -> None:
    root, _ = tree
    (tmp_path / "alias").symlink_to(root)
    policy = ImagePolicy(allowed_dirs=[str(tmp_path / "alias")])
    assert policy.allowed_dirs == (root.resolve(),)
    assert load_image(str(tmp_path / "alias" / "a.png"), policy).format == "PNG"
    (root / "inner.png").symlink_to(root / "a.png")  # a link that stays inside is fine
    assert load_image(str(root / "inner.png"), policy).format == "PNG"


def test_paths_outside_roots_are_refused_without_revealing_existence(tree, tmp_path: Path) -> None:
    root, policy = tree
    (root / "out.png").symlink_to(tmp_path / "project2" / "a.png")
    (root / "linkdir").symlink_to(tmp_path / "project2")
    (root / "chain2.png").symlink_to(root / "out.png")
    (root / "chain1.png").symlink_to(root / "chain2.png")
    specs = [
        str(tmp_path / "project2" / "a.png"),  # sibling sharing the prefix "project"
        str(tmp_path / "project2" / "missing.png"),
        f"{root}/../project2/a.png",
        str(root / "out.png"),
        str(root / "linkdir" / "a.png"),
        str(root / "chain1.png"),  # inside → inside → outside
        str(root / "sub" / ".." / ".." / "project2" / "a.png"),
        "file://" + str(root) + "/%2E%2E/project2/a.png",  # percent-decoded before the check
        "/dev/zero",
        "/etc/passwd",
    ]
    messages = set()
    for spec in specs:
        with pytest.raises(ImageInputError, match="not inside an allowed directory") as caught:
            load_image(spec, policy)
        messages.add(str(caught.value))
    assert len(messages) == 1 and "project2" not in messages.pop()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("pipe.png", "not a regular file"),
        ("socket.png", "could not be opened"),
        ("sub", "directory"),
        ("nope.png", "does not exist"),
    ],
)
def test_special_and_missing_files(tree, name: str, message: str) -> None:
    root, policy = tree
    if name == "pipe.png":
        os.mkfifo(root / name)  # must be refused at once, not block waiting for a writer
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if name == "socket.png":
        listener.bind(str(root / name))  # open() of a socket fails (ENXIO); it is never read
    try:
        with pytest.raises(ImageInputError, match=message):
            load_image(str(root / name), policy)
    finally:
        listener.close()


def test_device_file_under_allowed_root_is_not_read() -> None:
    with pytest.raises(ImageInputError, match="not a regular file"):
        load_image("/dev/zero", ImagePolicy(allowed_dirs=("/dev",)))


def test_local_size_checked_before_reading(tree, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = tree
    (root / "big.png").write_bytes(PNG + bytes(2000))
    monkeypatch.setattr(image_io.os, "read", lambda *a: pytest.fail("read an oversized file"))
    with pytest.raises(ImageInputError, match="larger than 1000 bytes"):
        load_image(str(root / "big.png"), ImagePolicy(allowed_dirs=(root,), max_bytes=1000))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{root}/a\x00.png", "NUL"),
        ("/" + "a" * 5000, "longer than 4096"),
        ("file://evil.example{root}/a.png", "remote host"),
        ("file:a.png", "relative"),
        ("file://{root}/a.png?x=1", "percent-encode"),
        ("file://{root}/%FF.png", "UTF-8"),
    ],
)
def test_malformed_paths(tree, spec: str, message: str) -> None:
    root, policy = tree
    with pytest.raises(ImageInputError, match=message):
        load_image(spec.format(root=root), policy)


def test_no_allowed_dirs_says_how_to_allow_one(tree) -> None:
    root, _ = tree
    for spec in (str(root / "a.png"), "file://" + str(root / "a.png")):
        with pytest.raises(ImageInputError) as caught:
            load_image(spec, ImagePolicy())
        assert str(caught.value) == (
            "local files are disabled; start the server with --allow-dir DIR (or NEXTCHAT_ALLOW_DIRS)"
        )


def test_errors_are_one_line_and_echo_at_most_100_chars() -> None:
    with pytest.raises(ImageInputError) as caught:
        load_image("relative/" + "x" * 500 + "\n.png", ImagePolicy())
    text = str(caught.value)
    assert "\n" not in text and len(text) < 300 and "x" * 101 not in text
