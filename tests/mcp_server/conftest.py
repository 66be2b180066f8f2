"""Server fixtures: one server on the embedded demo model for the whole session, shapes scenes on disk."""

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


@pytest.fixture(scope="session")
def tiny_server(image_dir: Path, tiny_checkpoint: Path):
    """The server on a tiny random checkpoint: for the protocol's mechanics, whatever the model says."""
    server = create_server(Settings(model=str(tiny_checkpoint), device="cpu", allow_dirs=(image_dir,)))
    yield server
    server.app.executor.stop()
