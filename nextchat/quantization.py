"""8-bit and 4-bit language-model weights, made one linear layer at a time as the checkpoint's weights arrive.

Only the LLM's decoder-layer linears are quantized (attention q/k/v/o and the MLP's gate/up/down, 6.48 B of the
7B's 6.74 B LLM parameters). The vision tower, projector, location heads and SAM stay 16-bit or float32:
quantizing vision encoders is known to cost accuracy. ``lm_head`` stays 16-bit too, as transformers' bitsandbytes
integration leaves it: it is the one layer whose rounding lands directly on the logits, and it is 2 % of the LLM.

- ``int8`` on a CPU: symmetric per-output-channel int8 weights, read as they are (a decode step moves half the bytes
  of bfloat16). One or two rows (a decode step) go through :mod:`nextchat.cpu_kernels`, a kernel that streams the
  weight at memory speed, where it can be built; up to 16 rows, or where it cannot, through torch's own
  ``aten._weight_int8pack_mm``. Prompts of many positions widen the weight to the activation dtype once per call and
  use the dense GEMM: there the multiply, not the weight traffic, is the cost, and the int8 kernels are slower per
  row.
- ``int8`` and ``nf4`` on CUDA: bitsandbytes (``Linear8bitLt``, ``Linear4bit``), the library LLaVA's
  ``--load-8bit`` / ``--load-4bit`` use; ``pip install 'nextchat-mcp[quantize]'``. Its kernels are CUDA ones
  (nf4 has no CPU path here), so ``nf4`` elsewhere is refused in one sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from nextchat import cpu_kernels


QUANTIZE_MODES = ("none", "int8", "nf4")

# Keys of the linears that get quantized: model.layers.<i>.{self_attn,mlp}.<proj>.weight
QUANTIZED_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")

# At or below this many rows a call uses the int8 kernel; above, it widens the weight once for a dense GEMM.
INT8_KERNEL_MAX_ROWS = 16


class QuantizationError(ValueError):
    """A quantization mode cannot run here; the message says what to change."""


def check_mode(mode: str, device: torch.device) -> None:
    """Refuse a mode this device cannot run (before anything is loaded)."""
    if mode not in QUANTIZE_MODES:
        raise QuantizationError(f"unknown quantization {mode!r}; use none, int8 or nf4")
    if mode == "nf4" and device.type != "cuda":
        raise QuantizationError(f"nf4 needs a CUDA GPU (bitsandbytes' 4-bit kernels); on {device.type} use int8")
    if mode == "int8" and device.type not in {"cpu", "cuda"}:
        raise QuantizationError(f"int8 runs on a CPU or a CUDA GPU, not on {device.type}; use --quantize none there")
    if mode != "none" and device.type == "cuda":
        try:
            import bitsandbytes  # noqa: F401  # pyright: ignore[reportMissingImports, reportUnusedImport]
        except ImportError:
            raise QuantizationError(
                f"{mode} on CUDA needs bitsandbytes: pip install 'nextchat-mcp[quantize]'"
            ) from None


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights ``[out, in]`` and one scale per output channel ``[out]``.

    ``weight ≈ qweight * scale[:, None]``; the scale is kept in the activation dtype the kernel wants.
    """

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, dtype: torch.dtype) -> Int8Linear:
        """Quantize a float weight ``[out, in]`` (symmetric, per output channel) for activations of ``dtype``."""
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        qweight = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(qweight.contiguous(), scale.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in]`` → ``[..., out]`` in ``x``'s dtype."""
        rows = x.reshape(-1, self.in_features)
        scale = self.scale.to(x.dtype)
        if rows.shape[0] <= INT8_KERNEL_MAX_ROWS:
            out = cpu_kernels.int8_matvec(rows, self.qweight, scale)
            if out is None:
                out = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.qweight, scale)
        else:
            out = nn.functional.linear(rows, self.qweight.to(x.dtype) * scale[:, None])
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantized_linear(weight: torch.Tensor, mode: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The quantized replacement of a bias-free ``nn.Linear`` holding ``weight`` ``[out, in]`` (on the CPU).

    On CUDA the module is on the GPU when it is returned (bitsandbytes quantizes as it moves the weight).
    """
    if device.type == "cpu":
        return Int8Linear.from_weight(weight, dtype)
    import bitsandbytes as bnb  # pyright: ignore[reportMissingImports]

    out_features, in_features = weight.shape
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4", device="meta"
        )
        layer.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, quant_type="nf4")
    return layer.to(device)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of weights per part for one mode, computed from parameter counts (activations and caches apart)."""

    mode: str
    quantized_parameters: int
    llm_other_parameters: int
    rest_parameters: int
    llm_bytes_per_parameter: float
    rest_bytes_per_parameter: float

    @property
    def llm_bytes(self) -> int:
        return int(self.quantized_parameters * self.llm_bytes_per_parameter + self.llm_other_parameters * 2)

    @property
    def total_bytes(self) -> int:
        return self.llm_bytes + int(self.rest_parameters * self.rest_bytes_per_parameter)


def estimate_memory(model: nn.Module, mode: str, rest_dtype: torch.dtype = torch.bfloat16) -> MemoryEstimate:
    """Weight memory of ``model`` (built on ``meta``, unquantized) in ``mode`` with the other parts in ``rest_dtype``.

    int8 counts one byte a weight (the per-row scale adds 2 bytes per 4096: 0.05 %); nf4 counts half a byte plus
    bitsandbytes' absmax of one float32 per 64 weights (0.0625 byte); none counts 16-bit.
    """
    quantized = llm_other = rest = 0
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if mode != "none" and QUANTIZED_LINEAR.match(owner):
            quantized += param.numel()
        elif name.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")):
            llm_other += param.numel()
        else:
            rest += param.numel()
    per_weight = {"none": 2.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}[mode]
    return MemoryEstimate(
        mode=mode,
        quantized_parameters=quantized,
        llm_other_parameters=llm_other,
        rest_parameters=rest,
        llm_bytes_per_parameter=per_weight,
        rest_bytes_per_parameter=torch.finfo(rest_dtype).bits / 8,
    )
