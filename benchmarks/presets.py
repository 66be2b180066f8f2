"""The models the benchmark runs: a tiny random checkpoint, the embedded demo model, or the published 7B shape."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.workload import FILLER
from nextchat.configuration import build_nextchat_7b_336
from nextchat.demo.world import COLOURS, SHAPES
from nextchat.loading import build_model, demo_checkpoint_dir, load_model
from nextchat.modeling_nextchat import NextChatModel
from nextchat.prompting import SYSTEM_PROMPT
from nextchat.tasks import locate_question
from nextchat.tiny import write_tiny_checkpoint
from nextchat.tokenization import NextChatTokenizer, train_tokenizer


PRESETS = ("auto", "tiny", "demo", "nextchat-7b-336")


def resolve_preset(preset: str) -> str:
    """``auto`` is ``demo`` when its checkpoint is installed, else ``tiny`` (said on stdout); others are themselves."""
    if preset != "auto":
        return preset
    if (demo_checkpoint_dir() / "config.json").is_file():
        return "demo"
    print(f"the demo checkpoint is not installed ({demo_checkpoint_dir()}): benchmarking the tiny preset")
    return "tiny"


def load_preset(preset: str, device: str, workdir: Path) -> tuple[NextChatModel, NextChatTokenizer, str]:
    """The preset's model (eval mode, on ``device``), its tokenizer and a label saying what the weights are.

    Args:
        preset: ``tiny``, ``demo`` or ``nextchat-7b-336`` (resolve ``auto`` first).
        device: a torch device string.
        workdir: a scratch directory for what the preset writes (the tiny checkpoint, the 7B shape's tokenizer).
    """
    if preset == "tiny":
        net, tokenizer, _ = load_model(write_tiny_checkpoint(workdir / "tiny"), device=device)
        return net, tokenizer, "tiny (random weights)"
    if preset == "demo":
        if not (demo_checkpoint_dir() / "config.json").is_file():
            raise SystemExit(
                f"the demo checkpoint is not installed at {demo_checkpoint_dir()}: train it "
                "(python -m nextchat.demo.train) or run --preset tiny"
            )
        net, tokenizer, _ = load_model("demo", device=device)
        return net, tokenizer, "demo (embedded shapes-world weights)"
    if not device.startswith("cuda"):
        raise SystemExit(
            "the nextchat-7b-336 preset is the full 7B shape (about 16 GB of bf16 weights) and needs a CUDA GPU; "
            "on the CPU run --preset tiny or --preset demo"
        )
    # Speed needs no trained weights: the full shape with random ones. A small vocabulary stands in for LLaMA's;
    # the output matrix keeps all 32005 rows (each step reads the same bytes), and the rows past that vocabulary
    # are zero so the model only ever picks tokens the tokenizer can decode.
    tokenizer = full_shape_tokenizer(workdir / "tokenizer")
    torch.manual_seed(0)
    net = build_model(build_nextchat_7b_336(), device, torch.bfloat16)
    with torch.no_grad():
        net.lm_head.weight[tokenizer.vocab_size :] = 0
    return net, tokenizer, "nextchat-7b-336 shape (random bf16 weights)"


def full_shape_tokenizer(directory: Path) -> NextChatTokenizer:
    """A small vocabulary trained on the benchmark's prompts, so they take about as many tokens as with LLaMA's."""
    names = [f"the {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    corpus = [SYSTEM_PROMPT, "USER: ASSISTANT:", " ".join(FILLER), *(locate_question(n) for n in names)]
    return train_tokenizer(corpus * 8, directory, 1000, whole_pieces=("ASSISTANT:",))
