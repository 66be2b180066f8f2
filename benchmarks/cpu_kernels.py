"""The decode step's CPU kernels beside torch's, at the 7B's shapes, in one run: speed against a plain read of the same
bytes, and error against the exact product.

``python -m benchmarks.cpu_kernels`` (``make bench-cpu-kernels``):

- int8 weights ``[out, in]`` of one LLaMA-7B layer (q, k, v, o 4096 × 4096; gate, up 11008 × 4096; down 4096 × 11008),
  ``--layers`` distinct copies so that they do not fit the caches, times one activation row: a vectorised max over
  the same bytes (the read floor), :func:`nextchat.cpu_kernels.int8_matvec`, torch's ``_weight_int8pack_mm``, and
  fbgemm's dynamically quantized linear (int8 activations too), in turns, the best of ``--repeats`` each;
- their relative error on activations with LLaMA-like outlier channels (four channels 60× the rest), against the
  float64 product of the same int8 weights: fbgemm's 8-bit activations are the accuracy question, not its speed;
- one layer's single-query attention over 600 cached positions in a 1200-column cache (the step window is a view):
  the kernel, the two batched products (:func:`nextchat.attention.single_query_attention`) and SDPA;
- the 32000 × 4096 bfloat16 head: :func:`nextchat.cpu_kernels.bf16_matvec` against torch's GEMV.

Figures are GB/s of weight bytes (or ms); results go to ``benchmarks/results/cpu_kernels-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nextchat import attention, cpu_kernels
from nextchat.quantization import Int8Linear


RESULTS = Path(__file__).parent / "results"
LAYER_SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def best_of(repeats: int, functions: dict[str, Callable[[], object]]) -> dict[str, float]:
    """The best seconds of each function over ``repeats`` rounds, run in turns within each round."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def int8_layers(layers: int, repeats: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    weights = [
        Int8Linear.from_weight(torch.randn(shape, generator=generator) * 0.02, torch.bfloat16)
        for _ in range(layers)
        for shape in LAYER_SHAPES
    ]
    inputs = {width: torch.randn(1, width, generator=generator).bfloat16() for width in (4096, 11008)}
    with warnings.catch_warnings():  # torch deprecates quantized tensors, the only way into fbgemm's kernel
        warnings.simplefilter("ignore")
        packed = [fbgemm_weight(w) for w in weights]
    float_inputs = {width: x.float() for width, x in inputs.items()}

    def read() -> None:
        for w in weights:
            w.qweight.view(torch.int32).max()

    def ours() -> None:
        for w in weights:
            cpu_kernels.int8_matvec(inputs[w.in_features], w.qweight, w.scale)

    def torch_int8() -> None:
        for w in weights:
            torch.ops.aten._weight_int8pack_mm(inputs[w.in_features], w.qweight, w.scale)

    def fbgemm() -> None:
        for w, p in zip(weights, packed, strict=True):
            torch.ops.quantized.linear_dynamic(float_inputs[w.in_features], p, True)

    seconds = best_of(repeats, {"read": read, "nextchat": ours, "torch_int8pack": torch_int8, "fbgemm": fbgemm})
    total = sum(w.qweight.numel() for w in weights)
    return {"weight_bytes": total, "gb_s": {name: total / s / 1e9 for name, s in seconds.items()}}


def fbgemm_weight(layer: Int8Linear) -> object:
    scale = layer.scale.double()
    zero = torch.zeros(layer.out_features, dtype=torch.long)
    weight = torch._make_per_channel_quantized_tensor(layer.qweight, scale, zero, 0)  # pyright: ignore[reportPrivateImportUsage]
    return torch.ops.quantized.linear_prepack(weight, None)


def int8_errors() -> dict[str, float]:
    """Relative error of one 11008 × 4096 product on an activation row with four outlier channels."""
    generator = torch.Generator().manual_seed(1)
    layer = Int8Linear.from_weight(torch.randn(11008, 4096, generator=generator) * 0.02, torch.float32)
    x = torch.randn(1, 4096, generator=generator)
    x[:, [7, 100, 2000, 3000]] *= 60
    exact = x.double() @ (layer.qweight.double() * layer.scale.double()[:, None]).T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = fbgemm_weight(layer)
    products = {
        "nextchat_bf16_activations": cpu_kernels.int8_matvec(x.bfloat16(), layer.qweight, layer.scale.bfloat16()),
        "nextchat_f32_activations": cpu_kernels.int8_matvec(x, layer.qweight, layer.scale),
        "torch_int8pack_bf16": torch.ops.aten._weight_int8pack_mm(x.bfloat16(), layer.qweight, layer.scale.bfloat16()),
        "fbgemm_7bit_activations": torch.ops.quantized.linear_dynamic(x, packed, True),
        "fbgemm_8bit_activations": torch.ops.quantized.linear_dynamic(x, packed, False),
    }
    return {name: float((p.double() - exact).norm() / exact.norm()) for name, p in products.items() if p is not None}


def attention_ms(repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(2)
    heads, head_dim, positions, capacity = 32, 128, 600, 1200
    query = torch.randn(1, heads, 1, head_dim, generator=generator).bfloat16()
    keys = torch.randn(1, heads, capacity, head_dim, generator=generator).bfloat16()[:, :, :positions]
    values = torch.randn(1, heads, capacity, head_dim, generator=generator).bfloat16()[:, :, :positions]
    mask = torch.ones(1, 1, 1, positions, dtype=torch.bool)
    scale = head_dim**-0.5
    seconds = best_of(
        repeats,
        {
            "nextchat": lambda: cpu_kernels.single_query_attention(query, keys, values, mask, scale),
            "batched_products": lambda: attention.single_query_attention(query, keys, values, mask, scale),
            "sdpa": lambda: F.scaled_dot_product_attention(query, keys, values, attn_mask=mask),
        },
    )
    return {name: 1000 * s for name, s in seconds.items()}


def head_ms(repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(32000, 4096, generator=generator).bfloat16()
    x = torch.randn(1, 4096, generator=generator).bfloat16()
    seconds = best_of(
        repeats,
        {
            "read": lambda: weight.view(torch.int32).max(),
            "nextchat": lambda: cpu_kernels.bf16_matvec(x, weight),
            "torch": lambda: F.linear(x, weight),
        },
    )
    return {name: 1000 * s for name, s in seconds.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--layers", type=int, default=6, help="distinct copies of one layer's int8 weights")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if reason := cpu_kernels.unavailable_reason():
        parser.error(f"the CPU kernels cannot run here: {reason}")
    with torch.no_grad():
        summary = {
            "cpu_threads": torch.get_num_threads(),
            "int8_layers": int8_layers(args.layers, args.repeats),
            "int8_relative_error": int8_errors(),
            "attention_ms": attention_ms(args.repeats * 3),
            "head_ms": head_ms(args.repeats),
        }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"cpu_kernels-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
