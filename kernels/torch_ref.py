"""Torch implementations of the paged KV-cache operations.

The paged cache of one layer is viewed as ``(num_blocks, block_size, num_kv_heads, head_dim)``;
it may be a strided view into a larger block-major tensor (see runtime.kv_cache), so these
functions index it and never reshape it in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(
    k_cache: torch.Tensor,  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor,
    k: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
    v: torch.Tensor,
    slot_block: torch.Tensor,  # (num_tokens,) int64
    slot_offset: torch.Tensor,  # (num_tokens,) int64
) -> None:
    k_cache[slot_block, slot_offset] = k
    v_cache[slot_block, slot_offset] = v


def gather_kv(
    cache: torch.Tensor,  # (num_blocks, block_size, num_kv_heads, head_dim)
    block_table: torch.Tensor,  # (..., max_blocks) int64
) -> torch.Tensor:
    """The cache rows of each table, contiguous: (..., max_blocks * block_size, kv_heads, head_dim)."""
    g = cache[block_table]  # (..., max_blocks, block_size, kv_heads, head_dim)
    return g.flatten(-4, -3)


def decode_attention(
    q: torch.Tensor,  # (batch, num_heads, head_dim): one query per sequence, at its last position
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # (batch, max_blocks) int64
    mask: torch.Tensor | None,  # (batch, 1, 1, max_blocks * block_size) bool, True = attend; None = all
) -> torch.Tensor:  # (batch, num_heads, head_dim)
    batch, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    k = gather_kv(k_cache, block_table).transpose(1, 2)  # (batch, kv_heads, ctx, head_dim)
    v = gather_kv(v_cache, block_table).transpose(1, 2)
    # The query heads sharing a KV head attend as that head's "rows": no K/V expansion needed.
    qg = q.view(batch, kv_heads, num_heads // kv_heads, head_dim)  # (batch, kv_heads, group, head_dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    return out.reshape(batch, num_heads, head_dim)


def prefill_attention(
    q: torch.Tensor,  # (query_len, num_heads, head_dim): the last query_len positions of the context
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,  # (num_blocks_of_seq,) int64
    context_len: int,  # cached prefix + query_len
) -> torch.Tensor:  # (query_len, num_heads, head_dim)
    query_len, num_heads, _ = q.shape
    group = num_heads // k_cache.shape[2]
    # 4-D inputs with equal head counts take SDPA's fused kernels; 3-D or GQA inputs fall back to
    # the math path, which materialises the whole score matrix (several times slower).
    k = gather_kv(k_cache, block_ids)[:context_len].transpose(0, 1).repeat_interleave(group, 0)[None]
    v = gather_kv(v_cache, block_ids)[:context_len].transpose(0, 1).repeat_interleave(group, 0)[None]
    qt = q.transpose(0, 1)[None]  # (1, heads, query_len, head_dim)
    if context_len == query_len:
        out = F.scaled_dot_product_attention(qt, k, v, is_causal=True)
    else:
        # Query i sits at absolute position context_len - query_len + i and sees keys up to it.
        qpos = torch.arange(context_len - query_len, context_len, device=q.device)
        mask = torch.arange(context_len, device=q.device)[None, :] <= qpos[:, None]
        out = F.scaled_dot_product_attention(qt, k, v, attn_mask=mask)
    return out[0].transpose(0, 1)
