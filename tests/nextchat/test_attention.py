"""The CPU's single-query attention gives SDPA's answer, and the model uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nextchat import attention, cpu_kernels


@pytest.mark.parametrize("implementation", ["torch", "kernel"])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_single_query_attention_equals_sdpa(
    implementation: str, dtype: torch.dtype, tolerance: float, kv_heads: int
) -> None:
    generator = torch.Generator().manual_seed(0)
    batch, heads, head_dim, columns, capacity = 3, 8, 16, 37, 64
    query = torch.randn(batch, heads, 1, head_dim, generator=generator).to(dtype)
    # The cache's step window: a view of the first `columns` of a larger buffer.
    keys = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator).to(dtype)[:, :, :columns]
    values = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator).to(dtype)[:, :, :columns]
    mask = torch.ones(batch, 1, 1, columns, dtype=torch.bool)
    mask[1, ..., :20] = False  # a left-padded row
    mask[2, ..., 30:36] = False

    if implementation == "kernel":
        if reason := cpu_kernels.unavailable_reason():
            pytest.skip(f"the CPU kernels cannot run here: {reason}")
        out = cpu_kernels.single_query_attention(query, keys, values, mask, head_dim**-0.5)
        assert out is not None
    else:
        out = attention.single_query_attention(query, keys, values, mask, head_dim**-0.5)

    repeat = heads // kv_heads
    expected = F.scaled_dot_product_attention(
        query, keys.repeat_interleave(repeat, 1), values.repeat_interleave(repeat, 1), attn_mask=mask
    ).transpose(1, 2)
    assert out.shape == (batch, 1, heads, head_dim) and out.dtype == dtype
    assert (out.float() - expected.float()).abs().max() < tolerance
    # An additive mask (eager attention's format) gives the same answer (through torch: the kernel takes bool masks).
    additive = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    with_additive_mask = attention.single_query_attention(query, keys, values, additive, head_dim**-0.5)
    assert (with_additive_mask.float() - out.float()).abs().max() < tolerance


def test_the_model_names_the_attention_and_prompts_stay_sdpa(tiny_parts, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = tiny_parts
    assert model.model.config._attn_implementation == attention.NAME
    calls: list[int] = []

    def counted(original):
        return lambda query, *args: calls.append(query.shape[2]) or original(query, *args)

    monkeypatch.setattr(attention, "single_query_attention", counted(attention.single_query_attention))
    monkeypatch.setattr(cpu_kernels, "single_query_attention", counted(cpu_kernels.single_query_attention))
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.forward_llm(torch.randn(1, 5, hidden), torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None])
        assert calls == []  # five queries: SDPA
        model.forward_llm(torch.randn(1, 1, hidden), torch.ones(1, 1, dtype=torch.long), torch.arange(1)[None])
    kernel_runs = cpu_kernels.unavailable_reason() is None
    assert calls == [1] * model.config.text["num_hidden_layers"] * (1 if kernel_runs else 2)


def test_the_kernel_leaves_other_inputs_to_torch() -> None:
    query, keys = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 6, 8)
    assert cpu_kernels.single_query_attention(query, keys, keys, torch.zeros(1, 1, 1, 6), 0.3) is None  # additive
    assert cpu_kernels.single_query_attention(torch.randn(1, 4, 2, 8), keys, keys, None, 0.3) is None  # two queries
    assert cpu_kernels.single_query_attention(query.half(), keys.half(), keys.half(), None, 0.3) is None
    odd = torch.randn(1, 4, 6, 12)
    assert cpu_kernels.single_query_attention(torch.randn(1, 4, 1, 12), odd, odd, None, 0.3) is None  # head_dim % 8
