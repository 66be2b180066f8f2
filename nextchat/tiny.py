"""A tiny random-weight NExT-Chat checkpoint in the official layout, for tests and smoke runs.

Its weights are random: what it outputs means nothing. It exists so that every code path (tokenizer files,
``config.json``, safetensors or ``.bin`` weights, loading, generation, masks) runs in seconds without downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nextchat.configuration import build_tiny
from nextchat.loading import build_model, save_pretrained
from nextchat.modeling_nextchat import NextChatModel
from nextchat.prompting import SYSTEM_PROMPT
from nextchat.tasks import GROUNDED_CAPTION, GROUNDING_SUFFIX, locate_question, region_question
from nextchat.tokenization import NextChatTokenizer, train_tokenizer


TINY_VOCAB_PIECES = 320  # sentencepiece needs ~260 for its byte fallback; the rest are merges of the corpus below

_CORPUS = [
    SYSTEM_PROMPT,
    "USER: ASSISTANT:",
    locate_question("the red circle"),
    locate_question("the blue square"),
    region_question(),
    f"What colour is the triangle? {GROUNDING_SUFFIX}",
    GROUNDED_CAPTION,
    "Answer: The answer is yes . The answer is no . There is a green triangle and a yellow circle .",
]


def tiny_tokenizer(directory: str | Path) -> NextChatTokenizer:
    """Train the tiny vocabulary into ``directory`` (deterministic; a few milliseconds)."""
    return train_tokenizer(_CORPUS * 4, directory, TINY_VOCAB_PIECES)


def tiny_model(tokenizer: NextChatTokenizer, seed: int = 0) -> NextChatModel:
    """A seeded random tiny model on the CPU in float32, sized to the tokenizer's vocabulary.

    Weights are drawn so every block changes its input by O(1) (default inits shrink a 2-layer model's outputs to
    near-constants), and the box decoder's bias centres boxes in the picture, so outputs vary with the input.
    """
    generator = torch.Generator().manual_seed(seed)
    model = build_model(build_tiny(vocab_size=tokenizer.vocab_size))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
            elif name.endswith("weight"):  # norms
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
            else:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
        box_out = model.loc_decoder[-1]
        assert isinstance(box_out, torch.nn.Linear)
        box_out.weight.mul_(0.1)
        box_out.bias.copy_(torch.tensor([0.3, 0.3, 0.7, 0.7]))
    return model


def write_tiny_checkpoint(directory: str | Path, seed: int = 0, safe_serialization: bool = True) -> Path:
    """Write a tiny random checkpoint (tokenizer files, config.json, weights) and return its directory."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer(directory)
    return save_pretrained(tiny_model(tokenizer, seed), tokenizer, directory, safe_serialization=safe_serialization)


def main() -> None:
    """``python -m nextchat.tiny [DIR]``: write the tiny random checkpoint, load it and run one locate."""
    import sys

    import numpy as np

    from nextchat.loading import load_model
    from nextchat.pipeline import NextChatPipeline

    directory = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/tiny-random-checkpoint")
    write_tiny_checkpoint(directory)
    model, tokenizer, report = load_model(directory, device="cpu")
    print(
        f"wrote and loaded {directory} ({sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{len(report.missing)} missing, {len(report.unexpected)} unexpected keys)"
    )
    image = np.full((120, 200, 3), 255, dtype=np.uint8)
    image[30:90, 40:100] = (220, 30, 30)
    obj = NextChatPipeline(model, tokenizer).locate(image, "the red square")
    box = ", ".join(f"{v:.1f}" for v in obj.box)
    print("locate('the red square') on a 200x120 image ->", f"[{box}]")
    print(
        "THE WEIGHTS ARE RANDOM: this only proves the code path (checkpoint layout, loading, prompt, <at> box);"
        " the box means nothing."
    )


if __name__ == "__main__":
    main()
