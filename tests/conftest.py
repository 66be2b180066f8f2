"""Shared fixtures: the tiny random-weight model (seeded, CPU, fp32) and synthetic images."""

import os
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
