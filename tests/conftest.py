"""Shared fixtures: the tiny random-weight model (seeded, CPU, fp32) and synthetic images."""

import functools
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from support import make_image

from nextchat.pipeline import NextChatPipeline
from nextchat.tiny import tiny_model, tiny_tokenizer, write_tiny_checkpoint


SHARED = Path(__file__).resolve().parents[2] / "shared"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow") or os.environ.get("RUN_SLOW") == "1"
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow or RUN_SLOW=1"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="gpu: CUDA is not available"))


@functools.cache
def npm_registry_problem() -> str | None:
    """Why tests marked npm cannot run here, or None: asked once, and answered within 20 s either way."""
    npm, npx = shutil.which("npm"), shutil.which("npx")
    if npm is None or npx is None:
        return "npm: npx is not installed"
    try:  # one request, no retries: an unreachable registry is known in seconds, not after a long fetch
        ping = subprocess.run(
            [npm, "ping", "--fetch-retries=0", "--fetch-timeout=10000"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "npm: the registry did not answer `npm ping` within 20 s"
    if ping.returncode != 0:
        error = next((line for line in ping.stderr.splitlines() if line.startswith("npm error")), "no answer")
        return f"npm: the registry cannot be reached (`npm ping`: {error[:200]})"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("npm") is not None and (problem := npm_registry_problem()) is not None:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory: pytest.TempPathFactory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))
    return tiny_model(tokenizer), tokenizer


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_parts) -> NextChatPipeline:
    model, tokenizer = tiny_parts
    return NextChatPipeline(model, tokenizer)


@pytest.fixture
def landscape() -> np.ndarray:
    return make_image(96, 60, seed=1)


@pytest.fixture
def portrait() -> np.ndarray:
    return make_image(50, 90, seed=2)
