"""Reliability suite fixtures: a loopback-only network, the figures summary, the demo-model server (helpers live in
reliability_support.py, importable from the test modules)."""

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reliability_support import FIGURES, LOOPBACK, STUB_DNS, figures_path

from mcp_server.server import create_server
from mcp_server.settings import Settings


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    path = figures_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(previous | FIGURES, indent=1, sort_keys=True) + "\n")
    terminalreporter.section("reliability figures")
    for name, values in sorted(FIGURES.items()):
        terminalreporter.write_line(f"{name}: {json.dumps(values, sort_keys=True)}")
    terminalreporter.write_line(f"(written to {path})")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list:
    """No packet leaves loopback: names resolve from :data:`STUB_DNS`, and a connect to any other address is refused
    locally (as if the host were down) and recorded; the test then fails at teardown."""
    violations: list = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def allowed(sock: socket.socket, address) -> bool:
        return sock.family == socket.AF_UNIX or (isinstance(address, tuple) and address[0] in LOOPBACK)

    def guarded_connect(sock: socket.socket, address) -> None:
        if not allowed(sock, address):
            violations.append(address)
            raise ConnectionRefusedError(f"the test network only reaches loopback, not {address!r}")
        real_connect(sock, address)

    def guarded_connect_ex(sock: socket.socket, address) -> int:
        if not allowed(sock, address):
            violations.append(address)
            return 111  # ECONNREFUSED
        return real_connect_ex(sock, address)

    def stub_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if name in LOOPBACK or name is None:
            return real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        if name not in STUB_DNS:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        port_number = int(port or 0)
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port_number))
            for a in STUB_DNS[name]
        ]

    def no_lookup(*args, **kwargs):
        violations.append(("lookup", args))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", stub_getaddrinfo)
    for name in ("gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        monkeypatch.setattr(socket, name, no_lookup)
    yield violations
    assert not violations, f"the test tried to reach beyond loopback: {violations[:5]}"


@pytest.fixture(scope="session")
def allowed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("allowed")
    rng = np.random.default_rng(11)
    for i, (width, height) in enumerate([(64, 48), (40, 40), (96, 32)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(directory / f"img{i}.png")
    return directory


@pytest.fixture(scope="session")
def demo_settings(allowed_dir: Path) -> Settings:
    return Settings(model="demo", device="cpu", allow_dirs=(allowed_dir,), ready_wait_s=120)


@pytest.fixture(scope="session")
def reliability_server(demo_settings: Settings):
    """The server on the embedded demo model, the default a user gets (the fuzzed and nonce images are no shapes
    scenes, so what it answers about them means little; that every request gets its own answer is what counts)."""
    server = create_server(demo_settings)
    yield server
    server.app.executor.stop()
    server.app.decoder.close()
