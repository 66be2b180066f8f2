"""The CPU's int8 decode kernel: same products as torch's, exact integer sums, and torch's kernel wherever it cannot
run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from nextchat import cpu_kernels
from nextchat.quantization import Int8Linear


@pytest.fixture(scope="module")
def kernel() -> None:
    if reason := cpu_kernels.unavailable_reason():
        pytest.skip(f"the int8 kernel cannot run here: {reason}")
    assert cpu_kernels.library() is not None, "an x86-64 AVX2 machine with a C compiler must build the kernel"


def quantized(out_features: int, in_features: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    layer = Int8Linear.from_weight(weight, dtype)
    return layer.qweight, layer.scale, generator


def reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.double() @ (qweight.double() * scale.double()[:, None]).T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("in_features", [48, 4096 + 48])  # a tail of 16s; and past one 4096-wide chunk
def test_the_kernel_computes_the_int8_product(kernel, dtype: torch.dtype, rows: int, in_features: int) -> None:
    qweight, scale, generator = quantized(37, in_features, dtype)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    x[:, 5] *= 40  # an outlier channel, as LLaMA's activations have
    out = cpu_kernels.int8_matvec(x, qweight, scale)
    assert out is not None and out.dtype == dtype and out.shape == (rows, 37)
    expected = reference(x, qweight, scale)

    def error(product: torch.Tensor) -> float:
        return float(((product.double() - expected).norm(dim=1) / expected.norm(dim=1)).max())

    # The int16 activations cost no more than bfloat16 ones would; a bfloat16 output, no more than its own rounding.
    if dtype == torch.float32:
        assert error(out) <= error(reference(x.bfloat16(), qweight, scale))
    else:
        assert error(out) <= 2 * error(expected.to(dtype))
    assert error(out) < 1e-2
    assert error(torch.ops.aten._weight_int8pack_mm(x, qweight, scale)) < 1e-2  # the same product as torch's


def test_long_rows_sum_without_integer_overflow(kernel) -> None:
    """65 536 products of 16383 × 127 are 2^37: in int32 they would wrap; chunks and float sums do not."""
    width = 65536
    qweight = torch.full((2, width), 127, dtype=torch.int8)
    qweight[1] = -127
    scale = torch.ones(2)
    out = cpu_kernels.int8_matvec(torch.ones(1, width), qweight, scale)
    assert out is not None
    expected = torch.tensor([[127.0 * width, -127.0 * width]])
    assert torch.allclose(out, expected, rtol=1e-6, atol=0)


def test_inputs_the_kernel_does_not_take_go_to_torch(kernel) -> None:
    qweight, scale, _ = quantized(8, 32, torch.float32)
    assert cpu_kernels.int8_matvec(torch.ones(3, 32), qweight, scale) is None  # more rows than a decode step
    assert cpu_kernels.int8_matvec(torch.ones(1, 32).half(), qweight, scale.half()) is None
    odd, odd_scale, _ = quantized(8, 40, torch.float32)
    assert cpu_kernels.int8_matvec(torch.ones(1, 40), odd, odd_scale) is None  # width not a multiple of 16
    assert cpu_kernels.int8_matvec(torch.ones(1, 64)[:, ::2], qweight, scale) is not None  # strided input is copied
    for bad in (float("nan"), float("inf")):
        x = torch.ones(1, 32)
        x[0, 3] = bad
        assert cpu_kernels.int8_matvec(x, qweight, scale) is None


def test_a_layer_carries_nan_like_torch(kernel) -> None:
    """A NaN in the activations comes out as NaN (torch's kernel runs), never as a finite number."""
    layer = Int8Linear(*quantized(8, 32, torch.float32)[:2])
    x = torch.ones(1, 32)
    x[0, 0] = float("nan")
    assert torch.isnan(layer(x)).all()


def test_the_kernel_is_built_into_the_cache_directory(kernel, tmp_path: Path) -> None:
    target = tmp_path / "kernels" / "int8_matvec-test.so"
    cpu_kernels._build(target)
    assert target.is_file()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no partial file left behind


def test_the_environment_can_choose_torchs_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXTCHAT_CPU_KERNELS", "torch")
    assert cpu_kernels.unavailable_reason() == "NEXTCHAT_CPU_KERNELS=torch"
    monkeypatch.setenv("NEXTCHAT_CPU_KERNELS", "")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert cpu_kernels.unavailable_reason() == "no C compiler (set CC)"


@pytest.mark.parametrize("rows", [1, 2])
def test_the_bfloat16_matvec_is_the_float_product(kernel, rows: int) -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(53, 4096 + 24, generator=generator).bfloat16()  # a tail of 8s
    x = torch.randn(rows, 4096 + 24, generator=generator).bfloat16()
    out = cpu_kernels.bf16_matvec(x, weight)
    assert out is not None and out.dtype == torch.float32 and out.shape == (rows, 53)
    expected = x.double() @ weight.double().T
    assert ((out.double() - expected).norm() / expected.norm()) < 1e-6  # float32 sums of exact products


def test_the_bfloat16_matvec_leaves_other_inputs_to_torch(kernel) -> None:
    weight = torch.randn(8, 32).bfloat16()
    assert cpu_kernels.bf16_matvec(torch.ones(3, 32), weight) is None  # more rows than a decode step
    assert cpu_kernels.bf16_matvec(torch.ones(1, 32), weight.float()) is None  # a float32 head: torch's GEMV
    assert cpu_kernels.bf16_matvec(torch.ones(1, 12), torch.randn(8, 12).bfloat16()) is None  # width % 8
    assert cpu_kernels.bf16_matvec(torch.ones(1, 64), torch.randn(8, 64).bfloat16()[:, :32]) is None  # strided weight


def test_a_bfloat16_decode_step_gives_the_heads_logits(kernel, tiny_parts) -> None:
    """The decode step's logits come from the kernel and equal the head's own product."""
    from nextchat.kv_cache import BatchKVCache

    model = copy.deepcopy(tiny_parts[0]).to(torch.bfloat16)
    cache = BatchKVCache.for_config(model.model.config, model.dtype, model.device)
    shape = (1, cache.kv_heads, 3, cache.head_dim)
    generator = torch.Generator().manual_seed(2)
    keys = [(torch.randn(shape, generator=generator).bfloat16(), torch.randn(shape, generator=generator).bfloat16())]
    cache.append(keys * cache.num_layers, torch.ones(1, 3, dtype=torch.long))
    embeds = torch.randn(1, 1, model.config.hidden_size, generator=generator).bfloat16()
    with torch.no_grad():
        hidden, logits = model.decode_step(embeds, torch.tensor([[3]]), cache.begin_step(), cache)
        expected = hidden.double() @ model.lm_head.weight.double().T
    assert logits.dtype == torch.float32
    assert ((logits.double() - expected).norm() / expected.norm()) < 1e-6  # torch's bfloat16 GEMV rounds to 2^-9


def test_tensors_that_need_a_graph_go_to_torch(kernel) -> None:
    """The kernels make no autograd graph: where one is wanted, torch's kernels run and gradients flow."""
    weight = torch.randn(8, 32).bfloat16().requires_grad_()
    x = torch.ones(1, 32)
    assert cpu_kernels.bf16_matvec(x, weight) is None
    with torch.no_grad():
        assert cpu_kernels.bf16_matvec(x, weight) is not None
    query, keys = torch.randn(1, 4, 1, 8, requires_grad=True), torch.randn(1, 4, 6, 8)
    assert cpu_kernels.single_query_attention(query, keys, keys, None, 0.3) is None
