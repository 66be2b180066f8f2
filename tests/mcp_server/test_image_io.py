"""Tests for mcp_server.image_io / url_fetch: image decoding, path confinement, base64 and SSRF-hardened URLs.

No test sends a packet beyond loopback: an autouse fixture fails any non-loopback connect and any real DNS lookup.
"""

import base64
import hashlib
import io
import ipaddress
import os
import socket
import struct
import threading
import warnings
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image, ImageFile, features
from support import blank_bilevel_png

from mcp_server import image_io, url_fetch
from mcp_server.image_io import ImageInputError, ImagePolicy, load_image


FORMATS_HINT = "PNG, JPEG, WebP, GIF or BMP"
LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def load_bytes(data: bytes, **policy) -> image_io.DecodedImage:
    return load_image(data_uri(data), ImagePolicy(**policy))


def noise(width: int = 16, height: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


PNG = encode(Image.fromarray(noise()))


# ---------------------------------------------------------------------------------------------------------------------
# Network guard


@pytest.fixture(autouse=True)
def network(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record every connect; fail the test on any non-loopback connect or any real name resolution."""
    connects: list[tuple[str, int]] = []
    real_connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address) -> None:
        if not isinstance(address, tuple) or address[0] not in ("127.0.0.1", "::1"):
            pytest.fail(f"test tried to connect beyond loopback: {address!r}")
        connects.append((address[0], address[1]))
        real_connect(self, address)

    def no_lookup(*args, **kwargs):
        pytest.fail(f"test tried a real name lookup: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", no_lookup)
    monkeypatch.setattr(socket, "create_connection", no_lookup)
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        monkeypatch.setattr(socket, name, no_lookup)
    return connects


class StubResolver:
    """A getaddrinfo stand-in: name → addresses; counts calls."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table, self.calls = table, []

    def __call__(self, host: str, port: int, *args, **kwargs):
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in self.table[host]
        ]


def allow_loopback(ip) -> bool:
    return ip == LOOPBACK or url_fetch.is_public_address(ip)


# ---------------------------------------------------------------------------------------------------------------------
# Loopback HTTP server


ROUTES: dict[str, tuple[int, dict[str, str], bytes]] = {
    "/img.png": (200, {"Content-Type": "image/png"}, PNG),
    "/wrongtype.png": (200, {"Content-Type": "image/jpeg"}, PNG),
    "/html": (200, {"Content-Type": "text/html"}, PNG),
    "/gzip": (200, {"Content-Type": "image/png", "Content-Encoding": "gzip"}, PNG),
    "/missing": (404, {"Content-Type": "text/plain"}, b"no"),
    "/big": (200, {"Content-Type": "image/png"}, PNG + bytes(5000)),  # no Content-Length: read until close
    "/loop": (302, {"Location": "/loop"}, b""),
    "/rel": (302, {"Location": "img.png"}, b""),
    "/chain1": (302, {"Location": "/img.png"}, b""),
    "/chain2": (302, {"Location": "/chain1"}, b""),
    "/chain3": (302, {"Location": "/chain2"}, b""),
    "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
    "/to-internal": (302, {"Location": "https://metadata.internal/"}, b""),
    "/to-ftp": (302, {"Location": "ftp://images.example/a.png"}, b""),
    "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
    "/to-gopher": (302, {"Location": "gopher://127.0.0.1:6379/_INFO"}, b""),
    "/to-ssh-port": (302, {"Location": "http://images.example:22/"}, b""),
}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.hits.append((self.path, self.headers.get("Host")))  # type: ignore[attr-defined]
        if self.path == "/to-http":
            status, headers, body = 302, {"Location": f"http://images.example:{self.server.server_port}/img.png"}, b""
        else:
            status, headers, body = ROUTES.get(self.path, (404, {}, b""))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class LoopbackServer(HTTPServer):
    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn (a reverse lookup); bind without it.
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = "localhost", self.server_address[1]


@pytest.fixture(scope="module")
def server():
    httpd = LoopbackServer(("127.0.0.1", 0), Handler)
    httpd.hits = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def base(server) -> str:
    server.hits.clear()
    return f"http://127.0.0.1:{server.server_port}"


def fetch(url: str, **kwargs) -> image_io.DecodedImage:
    policy = ImagePolicy(**{"allow_http": True, "url_timeout_s": kwargs.pop("timeout", 10.0), "url_ports": None}
                         | kwargs.pop("policy", {}))  # fmt: skip
    return load_image(url, policy, is_allowed_address=allow_loopback, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# URLs


def test_url_fetch_loopback_png(base: str, server, network) -> None:
    image = fetch(f"{base}/img.png")
    assert (image.source, image.format, image.width, image.height) == ("url", "PNG", 16, 10)
    assert image.sha256 == hashlib.sha256(PNG).hexdigest()
    assert network == [("127.0.0.1", server.server_port)]


def test_url_connects_to_pinned_address_with_original_host(server, network) -> None:
    resolver = StubResolver({"images.example": ["127.0.0.1"]})
    port = server.server_port
    server.hits.clear()
    fetch(f"http://images.example:{port}/img.png", resolver=resolver)
    assert resolver.calls == ["images.example"]  # resolved exactly once: no second lookup to rebind
    assert network == [("127.0.0.1", port)]
    assert server.hits == [("/img.png", f"images.example:{port}")]


def test_proxy_environment_is_ignored(base: str, monkeypatch: pytest.MonkeyPatch, network) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://10.9.9.9:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert fetch(f"{base}/img.png").format == "PNG"
    assert all(host == "127.0.0.1" for host, _ in network)


def test_content_type_is_checked_but_magic_bytes_decide(base: str) -> None:
    assert fetch(f"{base}/wrongtype.png").format == "PNG"
    with pytest.raises(ImageInputError, match="image content type"):
        fetch(f"{base}/html")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/gzip", "content-encoded"),
        ("/missing", "HTTP 404"),
        ("/to-ftp", "scheme 'ftp'"),
        ("/to-file", "scheme 'file'"),
        ("/to-gopher", "scheme 'gopher'"),
    ],
)
def test_url_response_refusals(base: str, path: str, message: str, network) -> None:
    with pytest.raises(ImageInputError, match=message):
        fetch(base + path)
    assert len(network) == 1  # the redirect target is refused before any connection


def test_redirect_to_a_non_web_port_is_refused(base: str, network) -> None:
    policy = {"url_ports": frozenset({80, 443, int(base.rsplit(":", 1)[1])})}
    with pytest.raises(ImageInputError, match="port 22 is not allowed"):
        fetch(f"{base}/to-ssh-port", policy=policy)
    assert len(network) == 1


def test_rebinding_cannot_move_a_fetch_between_lookups(server, network) -> None:
    """A name that answers loopback (allowed here) then a private address: each hop resolves once, connects to
    exactly the address it checked, and the private answer on the next hop stops the fetch before connecting."""
    answers = iter(["127.0.0.1", "10.0.0.5", "127.0.0.1"])
    calls: list[str] = []

    def rebinding(host: str, port: int, *args, **kwargs):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    port = server.server_port
    with pytest.raises(ImageInputError, match="non-public address"):
        fetch(f"http://images.example:{port}/to-http", resolver=rebinding)
    assert calls == ["images.example", "images.example"]
    assert network == [("127.0.0.1", port)]


def test_url_body_is_capped_while_streaming_ignoring_content_length(base: str) -> None:
    with pytest.raises(ImageInputError, match="larger than 1000 bytes"):
        fetch(f"{base}/big", policy={"max_bytes": 1000})


def test_redirects_relative_and_chained(base: str, server) -> None:
    assert fetch(f"{base}/rel").format == "PNG"
    assert fetch(f"{base}/chain3").format == "PNG"
    with pytest.raises(ImageInputError, match="redirected more than 2 times"):
        fetch(f"{base}/chain3", policy={"max_redirects": 2})


def test_redirect_loop_stops_at_max_redirects(base: str, server) -> None:
    with pytest.raises(ImageInputError, match="redirected more than 3 times"):
        fetch(f"{base}/loop")
    assert [path for path, _ in server.hits] == ["/loop"] * 4


def test_redirect_to_private_address_is_refused_before_connecting(base: str, server, network) -> None:
    resolver = StubResolver({"metadata.internal": ["10.0.0.5"]})
    for path in ("/to-metadata", "/to-internal"):
        network.clear()
        with pytest.raises(ImageInputError, match="non-public address") as caught:
            fetch(base + path, resolver=resolver)
        assert len(network) == 1  # only the first hop, to loopback
        assert "169.254" not in str(caught.value) and "10.0.0.5" not in str(caught.value)


def test_https_flow_pins_and_refuses_downgrade(server) -> None:
    """The TLS layer is swapped for a plain loopback socket to exercise https URLs without certificates."""
    opened: list[tuple[str, str, bool]] = []

    def plain_connect(ip: str, port: int, hostname: str, tls: bool, timeout_s: float) -> socket.socket:
        opened.append((ip, hostname, tls))
        sock = socket.socket()
        sock.settimeout(timeout_s)
        sock.connect((ip, port))
        return sock

    resolver = StubResolver({"images.example": ["127.0.0.1"]})
    common = {"max_bytes": 1 << 20, "timeout_s": 5.0, "max_redirects": 3, "resolver": resolver, "allowed_ports": None}
    common |= {"is_allowed_address": allow_loopback, "connect": plain_connect}
    url = f"https://images.example:{server.server_port}"
    assert url_fetch.fetch_url(f"{url}/img.png", **common) == PNG
    assert opened == [("127.0.0.1", "images.example", True)]
    with pytest.raises(url_fetch.UrlRejected, match="scheme 'http' is not allowed"):
        url_fetch.fetch_url(f"{url}/to-http", **common)
    assert url_fetch.fetch_url(f"{url}/to-http", allow_http=True, **common) == PNG


def test_url_total_timeout(network) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepted by the kernel, never answered
    try:
        with pytest.raises(ImageInputError, match=r"took over 0\.3 s"):
            fetch(f"http://127.0.0.1:{listener.getsockname()[1]}/", timeout=0.3)
    finally:
        listener.close()


def test_connection_refused_is_one_sentence() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(ImageInputError, match="could not connect to the URL host"):
        fetch(f"http://127.0.0.1:{port}/")


SSRF_LITERALS = [
    "https://127.1/",
    "https://2130706433/",
    "https://0x7f000001/",
    "https://0177.0.0.1/",
    "https://0/",
    "https://[::1]/",
    "https://[::ffff:127.0.0.1]/",
    "https://[::127.0.0.1]/",
    "https://[64:ff9b::7f00:1]/",
    "https://[64:ff9b::a9fe:a9fe]/",
    "https://[2002:a9fe:a9fe::]/",
    "https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",  # Teredo
    "https://169.254.169.254/latest/meta-data/",
    "https://[fd00:ec2::254]/",
    "https://100.100.100.200/",
    "https://10.0.0.1/",
    "https://172.16.0.1/",
    "https://192.168.1.1/",
    "https://224.0.0.1/",
    "https://255.255.255.255/",
    "https://[fec0::1]/",
    "https://[ff02::1]/",
    "https://localhost/",
    "https://api.localhost/",
    "https://0.0.0.0/",
    "https://[::]/",
    "https://100.64.0.1/",
    "https://192.0.0.192/",
    "https://192.88.99.1/",
    "https://198.18.0.1/",
    "HTTPS://127.0.0.1/",
    "https://0x7f.1/",
]


@pytest.mark.parametrize("url", SSRF_LITERALS)
def test_ssrf_literals_refused_before_any_connect_or_lookup(url: str, network) -> None:
    resolver = StubResolver({})
    with pytest.raises(ImageInputError, match="non-public address") as caught:
        load_image(url, ImagePolicy(), resolver=resolver)
    assert network == [] and resolver.calls == []
    assert "127.0.0" not in str(caught.value) and "Traceback" not in str(caught.value)


@pytest.mark.parametrize(
    ("addresses", "refused"),
    [(["169.254.169.254"], True), (["127.0.0.1"], True), (["93.184.216.34", "10.1.2.3"], True), (["fe80::1"], True)],
)
def test_hostname_resolving_to_any_private_address_is_refused(addresses: list[str], refused: bool, network) -> None:
    resolver = StubResolver({"evil.example": addresses})
    with pytest.raises(ImageInputError, match="non-public address") as caught:
        load_image("https://evil.example/a.png", ImagePolicy(), resolver=resolver)
    assert network == [] and resolver.calls == ["evil.example"]
    assert not any(a in str(caught.value) for a in addresses)


@pytest.mark.parametrize(
    ("url", "table"),
    [
        ("https://127.0.0.1.nip.io/a.png", {"127.0.0.1.nip.io": ["127.0.0.1"]}),
        ("https://metadata.google.internal/", {"metadata.google.internal": ["169.254.169.254"]}),
        ("https://v6.example/", {"v6.example": ["::ffff:169.254.169.254"]}),
        ("https://nat64.example/", {"nat64.example": ["64:ff9b::a9fe:a9fe"]}),
        ("https://imds6.example/", {"imds6.example": ["fd00:ec2::254"]}),
    ],
)
def test_names_that_resolve_to_internal_addresses_are_refused(url: str, table: dict, network) -> None:
    resolver = StubResolver(table)
    with pytest.raises(ImageInputError, match="non-public address") as caught:
        load_image(url, ImagePolicy(), resolver=resolver)
    assert network == [] and len(resolver.calls) == 1
    assert not any(a in str(caught.value) for addresses in table.values() for a in addresses)


def test_parser_confusion_urls_go_to_the_host_the_parser_saw(network) -> None:
    """``http://evil#@127.0.0.1`` names host ``evil`` (the rest is a fragment), and that is the host resolved."""
    resolver = StubResolver({"evil": ["10.0.0.1"]})
    with pytest.raises(ImageInputError, match="non-public address"):
        load_image("http://evil#@127.0.0.1/", ImagePolicy(allow_http=True), resolver=resolver)
    assert resolver.calls == ["evil"] and network == []


def test_default_resolver_is_getaddrinfo(monkeypatch: pytest.MonkeyPatch, network) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", StubResolver({"metadata.google.internal": ["169.254.169.254"]}))
    with pytest.raises(ImageInputError, match="non-public address"):
        load_image("https://metadata.google.internal/", ImagePolicy())
    with pytest.raises(ImageInputError, match="could not be resolved"):
        load_image("https://unknown.example/", ImagePolicy())
    assert network == []


@pytest.mark.parametrize(
    ("url", "policy", "message"),
    [
        ("http://127.0.0.1/", {"allow_http": True}, "non-public address"),
        ("http://example.com/a.png", {}, "scheme 'http' is not allowed; pass an https URL"),
        ("https://a@127.0.0.1/", {}, "credentials"),
        ("https://user:pw@example.com/", {}, "credentials"),
        ("file:///etc/passwd", {}, "--allow-dir"),
        ("ftp://example.com/a.png", {}, "scheme 'ftp'"),
        ("gopher://example.com/", {}, "scheme 'gopher'"),
        ("ws://example.com/", {}, "scheme 'ws'"),
        ("https://example.com/" + "a" * 2048, {}, "longer than 2048"),
        ("https://exa\tmple.com/", {}, "control characters"),
        ("https://example.com\r\n/", {}, "control characters"),
        ("https://[fe80::1%25eth0]/", {}, "zone"),
        ("https:///a.png", {}, "no host"),
        ("https://exämple.com/", {}, "punycode"),
        ("https://example.com:99999/", {}, "could not be parsed"),
        ("https://example.com/a.png", {"allow_urls": False}, "URLs are disabled"),
        ("dict://example.com:11211/", {}, "scheme 'dict'"),
        ("https://example.com:22/", {}, "port 22 is not allowed"),
        ("https://example.com:6379/", {}, "port 6379 is not allowed"),
        ("http://example.com:25/", {"allow_http": True}, "port 25 is not allowed"),
    ],
)
def test_url_shape_refusals(url: str, policy: dict, message: str, network) -> None:
    resolver = StubResolver({})
    with pytest.raises(ImageInputError, match=message):
        load_image(url, ImagePolicy(**policy), resolver=resolver)
    assert network == [] and resolver.calls == []


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert url_fetch.is_public_address(ipaddress.ip_address(address))


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
