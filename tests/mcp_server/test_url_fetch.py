"""Tests for mcp_server.url_fetch, through load_image as the tools call it: address literals in any spelling, names
that resolve inside, the pinned address against rebinding, redirects, timeouts, proxies and URL shapes, against a
loopback HTTP server and stub resolvers.

No test sends a packet beyond loopback: the network fixture (conftest.py) fails any non-loopback connect and any real
DNS lookup.
"""

import hashlib
import ipaddress
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from PIL import Image
from support import encode, noise

from mcp_server import image_io, url_fetch
from mcp_server.image_io import ImageInputError, ImagePolicy, load_image


pytestmark = pytest.mark.usefixtures("network")
LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
PNG = encode(Image.fromarray(noise()))


# ---------------------------------------------------------------------------------------------------------------------
# Stub resolution


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
