"""SSRF-hardened fetching of image URLs for the MCP server.

The image argument of a tool comes from a language model, which may be steered by a prompt injection, so a URL is
treated as hostile: only http(s) on web ports, no userinfo, every resolved address must be public, the connection
goes to the exact address that was checked (no second DNS lookup an attacker could rebind), proxies from the
environment are never consulted, redirects are followed by hand and re-validated hop by hop, and time and body size
are capped.

The standard library's ``http.client`` is used on top of a socket this module opens itself: it has no proxy or
redirect logic of its own, which is exactly what is wanted here.
"""

import contextlib
import http.client
import io
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressInfo = tuple[Any, ...]
"""One ``getaddrinfo`` answer: ``(family, type, proto, canonname, sockaddr)``; ``sockaddr[0]`` is the address."""
Resolver = Callable[..., Sequence[AddressInfo]]
"""Same calling convention as ``socket.getaddrinfo(host, port, family, type)``."""
AddressCheck = Callable[[IPAddress], bool]
Connector = Callable[[str, int, str, bool, float], socket.socket]
"""``connect(ip, port, hostname, tls, timeout_s)`` returns a connected (and, for TLS, verified) socket."""

MAX_URL_LENGTH = 2048
WEB_PORTS = frozenset({80, 443, 8080, 8443})
"""Ports a URL may name by default: image hosts serve on these, while other ports (ssh, smtp, redis...) would let a
caller probe services through the server."""
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 5.0
_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Special-purpose blocks (RFC 6890 registries) that no fetch may reach, listed explicitly: Python 3.11 before 3.11.10
# (CVE-2024-4032) calls some of them global, e.g. 192.0.0.192 (a cloud metadata address) and 192.88.99.0/24.
_DENIED_NETWORKS = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT; also Alibaba's metadata address
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/3",  # multicast, reserved and broadcast
        "::/127",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_](?:[a-z0-9_-]{0,62}))*\.?$")
# Forms that inet_aton accepts (127.1, 2130706433, 0x7f000001, 0177.0.0.1): the OS would connect to them, so they
# are decoded here the same way instead of being handed to a resolver.
_INET_ATON = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}$")
_PUBLIC_HINT = "pass a public https URL or a local file under an allowed directory"


class UrlRejected(ValueError):
    """A URL that may not be fetched; ``str(e)`` is one sentence for the calling agent (no IPs, no traces)."""


@dataclass(frozen=True)
class _Target:
    url: str
    tls: bool
    host: str  # hostname for the Host header, SNI and certificate checks (IPv6 without brackets)
    port: int
    request_target: str  # path + query, ASCII-safe


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address forwards to, if any.

    Python 3.11's ``is_global`` judges these by their IPv6 prefix only (e.g. ``64:ff9b::a9fe:a9fe`` counts as
    global), while the network delivers them to the embedded IPv4 address, so that address is what must be checked.
    """
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if int(ip) >> 32 == 0:  # IPv4-compatible ::a.b.c.d (deprecated, still routed by some stacks); also :: and ::1
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client endpoint, which is where the traffic ends up
    return None


def is_public_address(ip: IPAddress) -> bool:
    """Whether ``ip`` is a globally routable unicast address that a fetch may connect to.

    An address must pass both the explicit deny-list and every ``ipaddress`` flag, so neither a gap in the list nor
    a misjudgement by the running Python's ``ipaddress`` lets an internal address through.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_public_address(embedded)
    if any(ip in network for network in _DENIED_NETWORKS):
        return False
    # is_global alone misses multicast (224.0.0.1 counts as global in 3.11), so every flag is checked explicitly.
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


def _literal_address(host: str) -> IPAddress | None:
    """Parse ``host`` as an IP literal in any form the OS would accept, or return None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _INET_ATON.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise UrlRejected(f"URL host is not a valid address; {_PUBLIC_HINT}") from None
    return None


def validate_url(url: str, *, allow_http: bool, allowed_ports: frozenset[int] | None = WEB_PORTS) -> _Target:
    """Check the shape of a URL (scheme, host, port, userinfo, characters) without any network access.

    ``allowed_ports`` None accepts any port.
    """
    if len(url) > MAX_URL_LENGTH:
        raise UrlRejected(f"URL is longer than {MAX_URL_LENGTH} characters; pass a shorter URL")
    # urlsplit silently drops tabs and newlines, so an unparsed check is needed to avoid parser disagreements.
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise UrlRejected("URL contains whitespace or control characters; percent-encode them")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlRejected("URL could not be parsed; pass a well-formed https URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or (scheme == "http" and not allow_http):
        allowed = "http or https" if allow_http else "https"
        raise UrlRejected(f"URL scheme {scheme!r} is not allowed; pass an {allowed} URL")
    if "@" in parts.netloc:
        raise UrlRejected("URLs with credentials (user@host) are not allowed; remove the user info")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UrlRejected("URL has no host; pass a full URL such as https://example.com/image.png")
    if "%" in host:
        raise UrlRejected(f"URL hosts with an IPv6 zone are not allowed; {_PUBLIC_HINT}")
    if _literal_address(host) is None and not _HOSTNAME.match(host):
        raise UrlRejected("URL host is not a valid ASCII hostname; pass the host in punycode (xn--) form")
    if port == 0:
        raise UrlRejected("URL port 0 is not valid; pass a URL with a real port")
    if port is not None and allowed_ports is not None and port not in allowed_ports:
        ports = ", ".join(str(p) for p in sorted(allowed_ports))
        raise UrlRejected(f"URL port {port} is not allowed; pass a URL on port {ports} (or no port)")
    path = parts.path or "/"
    target = path + (f"?{parts.query}" if parts.query else "")
    # Keep every reserved character and existing %-escape; only encode what http.client would refuse (non-ASCII).
    target = quote(target, safe="!#$%&'()*+,/:;=?@[]~")
    return _Target(url, scheme == "https", host, port or (443 if scheme == "https" else 80), target)


def resolve_pinned(host: str, port: int, resolver: Resolver | None, is_allowed: AddressCheck) -> str:
    """Resolve ``host`` once and return one address to connect to, refusing if ANY address is not allowed.

    Checking every address (not just the first) stops a name that mixes a public and a private record from being
    used to reach the private one on a retry or via happy-eyeballs ordering.
    """
    literal = _literal_address(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always loopback, no need to ask DNS
            raise UrlRejected(f"URL host resolves to a non-public address; {_PUBLIC_HINT}")
        try:
            infos: Sequence[AddressInfo] = (resolver or socket.getaddrinfo)(host, port, 0, socket.SOCK_STREAM)
            addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        except (OSError, UnicodeError, ValueError, IndexError, TypeError):
            raise UrlRejected("URL host could not be resolved; check the host name") from None
        if not addresses:
            raise UrlRejected("URL host could not be resolved; check the host name")
    if not all(is_allowed(address) for address in addresses):
        raise UrlRejected(f"URL host resolves to a non-public address; {_PUBLIC_HINT}")
    return str(addresses[0])


def default_connect(ip: str, port: int, hostname: str, tls: bool, timeout_s: float) -> socket.socket:
    """Connect to exactly ``ip`` (no resolution), then do TLS with SNI and certificate checks for ``hostname``."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect((ip, port))
        if tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=hostname)
    except BaseException:
        sock.close()
        raise
    return sock


class _DeadlineReader(io.RawIOBase):
    """Socket reads bounded per read (read timeout) and in total (the fetch deadline), so slow drips cannot stall."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # pyright: ignore[reportIncompatibleMethodOverride]  # any buffer
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("fetch deadline passed")
        self._sock.settimeout(min(READ_TIMEOUT_S, remaining))
        return self._sock.recv_into(buffer)


class _PinnedSocket:
    """The subset of the socket API that ``http.client`` uses, reading through a ``_DeadlineReader``."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(max(0.001, min(READ_TIMEOUT_S, self._deadline - time.monotonic())))
        self._sock.sendall(data)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        # http.client closes the connection as soon as a Connection: close response is parsed, while the response
        # still reads from it (real sockets defer that via makefile refcounts); the fetch loop closes the socket.
        pass


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection whose socket is supplied from outside (already pinned to a checked address)."""

    def __init__(self, target: _Target, sock: socket.socket, deadline: float) -> None:
        super().__init__(target.host, target.port, timeout=READ_TIMEOUT_S)
        self.default_port = 443 if target.tls else 80  # so the Host header omits the default port
        self._pinned = _PinnedSocket(sock, deadline)

    def connect(self) -> None:
        self.sock = self._pinned


def _fetch_once(target: _Target, sock: socket.socket, deadline: float) -> http.client.HTTPResponse:
    """Send one GET over the already pinned socket and return the response with its headers read."""
    conn = _PinnedConnection(target, sock, deadline)
    conn.putrequest("GET", target.request_target, skip_accept_encoding=True)
    conn.putheader("User-Agent", "nextchat-mcp")
    conn.putheader("Accept", "image/*")
    conn.putheader("Accept-Encoding", "identity")  # so the byte cap counts exactly what gets decoded
    conn.putheader("Connection", "close")
    conn.endheaders()
    return conn.getresponse()


def _read_body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """Stream the body, stopping one byte past ``max_bytes`` (Content-Length is not trusted)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = response.read1(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise UrlRejected(f"URL body is larger than {max_bytes} bytes; pass a smaller image")
        chunks.append(chunk)


def fetch_url(
    url: str,
    *,
    allow_http: bool = False,
    max_bytes: int,
    timeout_s: float,
    max_redirects: int,
    allowed_ports: frozenset[int] | None = WEB_PORTS,
    resolver: Resolver | None = None,
    is_allowed_address: AddressCheck | None = None,
    connect: Connector | None = None,
) -> bytes:
    """Fetch the body of an image URL under the SSRF rules described in the module docstring.

    Args:
        url: The caller's URL.
        allow_http: Whether plain http is accepted (also for redirect targets).
        max_bytes: Largest body accepted, counted as received (identity encoding only).
        timeout_s: Cap on the whole fetch, redirects included; connect and per-read caps are 3 s and 5 s.
        max_redirects: Largest number of redirects followed.
        allowed_ports: Ports a URL (and every redirect target) may name; None accepts any.
        resolver: ``getaddrinfo``-compatible resolver; called once per hop.
        is_allowed_address: Address policy; defaults to :func:`is_public_address`.
        connect: Socket factory for the pinned address; defaults to :func:`default_connect`.

    Returns:
        The response body.

    Raises:
        UrlRejected: With a one-sentence, IP-free message.
    """
    is_allowed = is_allowed_address or is_public_address
    deadline = time.monotonic() + timeout_s
    for _ in range(max_redirects + 1):
        target = validate_url(url, allow_http=allow_http, allowed_ports=allowed_ports)
        ip = resolve_pinned(target.host, target.port, resolver, is_allowed)
        sock: socket.socket | None = None
        response: http.client.HTTPResponse | None = None
        try:
            with _as_rejections(timeout_s):
                timeout = min(CONNECT_TIMEOUT_S, max(0.001, deadline - time.monotonic()))
                sock = (connect or default_connect)(ip, target.port, target.host, target.tls, timeout)
                response = _fetch_once(target, sock, deadline)
                redirect = _redirect_target(response, target)
                if redirect is None:
                    return _read_body(response, max_bytes)
                url = redirect
        finally:
            if response is not None:
                response.close()
            if sock is not None:
                sock.close()
    raise UrlRejected(f"URL redirected more than {max_redirects} times; pass the final image URL")


def _redirect_target(response: http.client.HTTPResponse, target: _Target) -> str | None:
    """Where a redirect points, or ``None`` for a response that serves image bytes; any other response is refused."""
    status = response.status
    if status in _REDIRECTS:
        location = response.getheader("Location")
        if not location:
            raise UrlRejected(f"URL returned HTTP {status} without a Location; pass the final image URL")
        return urljoin(target.url, location.strip())
    if not 200 <= status < 300:
        raise UrlRejected(f"URL returned HTTP {status}; pass a URL that serves the image directly")
    encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise UrlRejected("URL response is content-encoded; pass a URL that serves the raw image bytes")
    content_type = (response.getheader("Content-Type") or "").strip().lower()
    if not content_type.startswith("image/"):
        raise UrlRejected("URL does not serve an image content type; pass a direct link to the image file")
    return None


@contextlib.contextmanager
def _as_rejections(timeout_s: float) -> Generator[None]:
    """Network and protocol failures of one hop as one-sentence, address-free :class:`UrlRejected` errors."""
    try:
        yield
    except UrlRejected:
        raise
    except TimeoutError:
        raise UrlRejected(f"URL fetch took over {timeout_s:g} s; pass a faster URL or a local file") from None
    except ssl.SSLCertVerificationError:
        raise UrlRejected("URL host's TLS certificate could not be verified; pass a URL with a valid one") from None
    except (http.client.HTTPException, ssl.SSLError, ValueError):
        raise UrlRejected("URL server sent a malformed response; pass a different URL") from None
    except OSError:
        raise UrlRejected("could not connect to the URL host; check the URL or pass the image as a file") from None


__all__ = [
    "MAX_URL_LENGTH",
    "WEB_PORTS",
    "UrlRejected",
    "default_connect",
    "fetch_url",
    "is_public_address",
    "resolve_pinned",
    "validate_url",
]
