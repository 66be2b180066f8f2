"""Server fixtures: one server on the embedded demo model for the whole session, shapes scenes on disk; a network
guard for the image-input tests."""

import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcp_server.server import create_server
from mcp_server.settings import Settings
from nextchat.demo.world import Scene, render_scene
from nextchat.loading import demo_checkpoint_dir


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def scenes() -> list[Scene]:
    rng = np.random.default_rng([20_251_125, 4])
    return [render_scene(rng, min_objects=2, max_objects=3) for _ in range(6)]


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory, scenes: list[Scene]) -> Path:
    directory = tmp_path_factory.mktemp("images")
    for i, scene in enumerate(scenes):
        Image.fromarray(scene.image).save(directory / f"scene{i}.png")
    return directory


@pytest.fixture(scope="session")
def demo_server(image_dir: Path):
    """The server on the embedded demo model: for tests of real behaviour (boxes that match the rendered objects)."""
    if not (demo_checkpoint_dir() / "config.json").is_file():  # it ships with the package: missing is a failure
        pytest.fail(f"the demo checkpoint is missing from {demo_checkpoint_dir()}")
    server = create_server(Settings(model="demo", device="cpu", allow_dirs=(image_dir,)))
    yield server
    server.app.executor.stop()
    server.app.decoder.close()


@pytest.fixture(scope="session")
def tiny_server(image_dir: Path, tiny_checkpoint: Path):
    """The server on a tiny random checkpoint: for the protocol's mechanics, whatever the model says."""
    server = create_server(Settings(model=str(tiny_checkpoint), device="cpu", allow_dirs=(image_dir,)))
    yield server
    server.app.executor.stop()
    server.app.decoder.close()


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record every connect; fail the test on any non-loopback connect or any real name resolution.

    test_image_io.py and test_url_fetch.py apply it to every test (``pytest.mark.usefixtures("network")``).
    """
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
