"""Which device the model runs on, and which dtype each of its parts gets there.

The parts differ in what bounds them. The language model is the weights: 6.7 B parameters, read once per decoded
token, so its format decides whether it fits in memory and how fast it decodes; it gets a 16-bit format (or int8,
see :mod:`nextchat.quantization`) wherever it is large. The vision tower, SAM and the location heads are about 1 B
parameters together and compute-bound: on a CPU without bfloat16 instructions, bfloat16 matrix products run 4–5×
slower than float32 ones, so there they stay float32. SAM's prompt encoder is float32 everywhere (see
:class:`~nextchat.modeling_nextchat.SamHead`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


# An LLM with more parameters than this gets 16-bit weights on a CPU under ``auto``: float32 would need twice the
# memory (about 27 GB for the 7B's language model alone), more than most machines have to spare. Smaller models (the
# demo, the tiny test model) keep float32, which costs them nothing and reproduces their training numbers exactly.
LARGE_LLM_PARAMETERS = 1_000_000_000

# The x86 flags that mean the CPU multiplies bfloat16 in hardware (AVX-512 BF16, AMX); ARM's is ``bf16``.
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})

DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then mps (Apple silicon), then cpu."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The language model's dtype for a small model: ``auto`` is bfloat16 on CUDA, float16 on MPS, else float32.

    :func:`plan_precision` refines ``auto`` by the model's size and the CPU's instructions.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[dtype]


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The instruction-set flags of the first CPU in ``/proc/cpuinfo`` (empty where there is no such file)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in {"flags", "Features"}:
            return frozenset(value.split())
    return frozenset()


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX on x86, BF16 on ARM)."""
    return bool((cpu_flags() if flags is None else flags) & _BF16_FLAGS)


@dataclass(frozen=True)
class Precision:
    """The dtype of each part: ``llm`` (embeddings, layers, norm, lm_head), ``vision`` (tower and projector),
    ``heads`` (loc_encoder, loc_decoder, seg_prompt_mlp) and ``sam`` (its prompt encoder is float32 regardless)."""

    llm: torch.dtype
    vision: torch.dtype
    heads: torch.dtype
    sam: torch.dtype
    reason: str = ""

    @classmethod
    def uniform(cls, dtype: torch.dtype, reason: str = "") -> Precision:
        return cls(llm=dtype, vision=dtype, heads=dtype, sam=dtype, reason=reason)


def slow_device_warning(device: torch.device, llm_parameters: int) -> str | None:
    """What to tell the user when a 7B-sized language model is about to run on a CPU (``None`` elsewhere).

    Every decoded token reads all the LLM's weights (13.5 GB in bfloat16, 6.7 GB in int8), so a CPU's memory
    bandwidth caps decoding at a few tokens per second at best; ``benchmarks/full_size.py`` measures it.
    """
    if device.type != "cpu" or llm_parameters <= LARGE_LLM_PARAMETERS:
        return None
    return (
        f"running a {llm_parameters / 1e9:.1f} B-parameter language model on the CPU: loading takes minutes and "
        "each answer seconds to minutes (every token reads all its weights); use a CUDA GPU or Apple silicon "
        "(--device cuda / mps) for interactive use, or --quantize int8 to halve the weight bytes"
    )


def plan_precision(
    dtype: str | torch.dtype, device: torch.device, llm_parameters: int, *, bf16_hardware: bool | None = None
) -> Precision:
    """Each part's dtype for ``dtype`` on ``device``; an explicit dtype applies to every part.

    ``auto`` on a CPU: a large LLM (more than :data:`LARGE_LLM_PARAMETERS`) gets bfloat16 and a small one float32;
    the other parts get bfloat16 beside a bfloat16 LLM only where the CPU has bfloat16 instructions, else float32.
    """
    if not (dtype == "auto" and device.type == "cpu"):
        return Precision.uniform(resolve_dtype(dtype, device), reason=f"{dtype} on {device.type}")
    if llm_parameters <= LARGE_LLM_PARAMETERS:
        return Precision.uniform(torch.float32, reason="a small model on a CPU: float32 throughout")
    hardware = cpu_has_bf16() if bf16_hardware is None else bf16_hardware
    if hardware:
        return Precision.uniform(torch.bfloat16, reason="the CPU has bfloat16 instructions: bfloat16 throughout")
    return Precision(
        llm=torch.bfloat16,
        vision=torch.float32,
        heads=torch.float32,
        sam=torch.float32,
        reason="no bfloat16 instructions on this CPU: the LLM's weights in bfloat16 to fit, the rest in float32",
    )
