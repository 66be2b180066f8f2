"""NExT-Chat: a LLaVA-style model that locates (boxes) and segments (masks) what it talks about.

The public names are imported on first use, so ``import nextchat.demo.world`` (numpy and Pillow only) does not
pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from nextchat.configuration import PRESETS, NextChatConfig, SamConfig, preset
    from nextchat.engine import GenerationRequest, GenerationResult, NextChatEngine
    from nextchat.loading import CheckpointError, LoadReport, build_model, load_model, save_pretrained
    from nextchat.modeling_nextchat import NextChatModel
    from nextchat.pipeline import NextChatPipeline
    from nextchat.tokenization import NextChatTokenizer

_EXPORTS = {
    "PRESETS": "configuration",
    "NextChatConfig": "configuration",
    "SamConfig": "configuration",
    "preset": "configuration",
    "GenerationRequest": "engine",
    "GenerationResult": "engine",
    "NextChatEngine": "engine",
    "CheckpointError": "loading",
    "LoadReport": "loading",
    "build_model": "loading",
    "load_model": "loading",
    "save_pretrained": "loading",
    "NextChatModel": "modeling_nextchat",
    "NextChatPipeline": "pipeline",
    "NextChatTokenizer": "tokenization",
}

__all__ = [
    "PRESETS",
    "CheckpointError",
    "GenerationRequest",
    "GenerationResult",
    "LoadReport",
    "NextChatConfig",
    "NextChatEngine",
    "NextChatModel",
    "NextChatPipeline",
    "NextChatTokenizer",
    "SamConfig",
    "build_model",
    "load_model",
    "preset",
    "save_pretrained",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nextchat' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nextchat.{_EXPORTS[name]}"), name)
