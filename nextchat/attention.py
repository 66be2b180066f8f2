"""The language model's attention function: torch's SDPA, except for single-query steps on a CPU.

A decode step attends one new query per row to every cached key. On a CPU, SDPA takes 2–4 ms a layer for that in
bfloat16 at 600 cached positions of the 7B (its fused kernels are built for many queries), and two batched products
about 2 ms: 32 layers make that 60–120 ms of a step whose weights take ~130 ms to read. There
:func:`nextchat.cpu_kernels.single_query_attention` reads the keys and values once, in place; where it cannot run,
the two products written out here do. Every other case (prompts, CUDA, MPS) is SDPA's, unchanged.

The function is registered with transformers' attention interface under :data:`NAME`, and the model's LLaMA config
names it; its mask format is SDPA's.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from nextchat import cpu_kernels


NAME = "nextchat_sdpa"


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature; the output ``[B, T, heads, head_dim]``.

    Args:
        query: ``[B, heads, T, head_dim]``.
        key, value: ``[B, kv_heads, L, head_dim]`` (any strides: the cache's step window is a view).
        attention_mask: ``[B, 1, T, L]`` bool (True attends) or additive float, or ``None``.
    """
    if query.shape[2] != 1 or query.device.type != "cpu" or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = cpu_kernels.single_query_attention(query, key, value, attention_mask, scale)
    return (single_query_attention(query, key, value, attention_mask, scale) if out is None else out), None


def single_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One query per row: ``[B, heads, 1, D]`` → ``[B, 1, heads, D]``; scores and softmax in float32.

    The query heads that share a key head (grouped-query attention) are that head's rows of one product, so keys are
    never repeated.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float()  # [B, kv_heads, group, L]
    scores *= scale
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:  # additive
        scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, kv_heads, group, D]
    return out.reshape(batch, heads, 1, head_dim).transpose(1, 2)


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
