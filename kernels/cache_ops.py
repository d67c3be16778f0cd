"""Triton kernels that move KV data: the per-step cache write and whole-block gather/scatter.

`write_kv` puts each new token's K and V at its slot (``block * block_size + row``; a negative
slot marks a padding token, skipped, so a CUDA graph captured for a larger batch can run a
smaller one). `gather_blocks` / `scatter_blocks` copy whole blocks of the block-major cache
(runtime.kv_cache: a block is one contiguous buffer across every layer) to and from a contiguous
staging buffer, so a tier move is one kernel plus one large host copy instead of a copy a block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    K, V, KCache, VCache, Slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch,
    stride_db, stride_dt, stride_dh,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_ELEMS: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // PAGE
    row = slot % PAGE
    i = tl.arange(0, BLOCK)
    mask = i < NUM_ELEMS
    h = i // HEAD_DIM
    d = i % HEAD_DIM
    k = tl.load(K + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(V + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(KCache + blk * stride_cb + row * stride_ct + h * stride_ch + d, k, mask=mask)
    tl.store(VCache + blk * stride_db + row * stride_dt + h * stride_dh + d, v, mask=mask)


def write_kv(
    k_cache: torch.Tensor,  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor,
    k: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
    v: torch.Tensor,
    slots: torch.Tensor,  # (num_tokens,) int64: block * block_size + row, or -1 to skip
) -> None:
    """Mutates the caches at the given slots and nothing else."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must be equal (tokens, kv_heads, head_dim), got {tuple(k.shape)}, {tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not hold K/V of shape {tuple(k.shape)}")
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise ValueError(f"K/V dtype {k.dtype} differs from the cache's {k_cache.dtype}")
    if slots.dtype != torch.int64 or slots.shape != (k.shape[0],):
        raise ValueError(f"slots must be int64 of shape ({k.shape[0]},), got {slots.dtype} {tuple(slots.shape)}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    if k.shape[0] == 0:
        return
    heads, head_dim = k.shape[1], k.shape[2]
    _write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        PAGE=k_cache.shape[1], HEAD_DIM=head_dim, NUM_ELEMS=heads * head_dim,
        BLOCK=triton.next_power_of_2(heads * head_dim),
    )


@triton.jit
def _copy_blocks_kernel(Src, Dst, SrcIdx, DstIdx, block_elems, CHUNK: tl.constexpr, GATHER: tl.constexpr):
    i = tl.program_id(0)
    c = tl.program_id(1)
    if GATHER:
        src_row = tl.load(SrcIdx + i).to(tl.int64)
        dst_row = i.to(tl.int64)
    else:
        src_row = i.to(tl.int64)
        dst_row = tl.load(DstIdx + i).to(tl.int64)
    off = c.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = off < block_elems
    x = tl.load(Src + src_row * block_elems + off, mask=mask)
    tl.store(Dst + dst_row * block_elems + off, x, mask=mask)


_CHUNK = 4096


def _check_blocks(cache: torch.Tensor, ids: torch.Tensor, buf: torch.Tensor) -> int:
    if not cache.is_contiguous() or not buf.is_contiguous():
        raise ValueError("the cache and the staging buffer must be contiguous")
    if cache.dtype != buf.dtype or cache.device != buf.device or ids.device != cache.device:
        raise ValueError(f"cache ({cache.dtype}, {cache.device}), buffer ({buf.dtype}, {buf.device}) and "
                         f"ids ({ids.device}) must share dtype and device")
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
    if buf.shape[1:] != cache.shape[1:] or buf.shape[0] < ids.shape[0]:
        raise ValueError(f"buffer {tuple(buf.shape)} cannot hold {ids.shape[0]} blocks of {tuple(cache.shape[1:])}")
    return cache[0].numel()


def gather_blocks(cache: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] = cache[ids[i]] for each i: blocks of the paged cache into a contiguous buffer.

    cache: (num_blocks, *block_shape); out: (>= len(ids), *block_shape). Mutates out only."""
    elems = _check_blocks(cache, ids, out)
    if ids.numel():
        _copy_blocks_kernel[(ids.numel(), triton.cdiv(elems, _CHUNK))](
            cache, out, ids, ids, elems, CHUNK=_CHUNK, GATHER=True)
    return out


def scatter_blocks(cache: torch.Tensor, ids: torch.Tensor, src: torch.Tensor) -> None:
    """cache[ids[i]] = src[i] for each i (ids distinct): a contiguous buffer into the paged cache.
    Mutates the listed blocks of cache only."""
    elems = _check_blocks(cache, ids, src)
    if ids.numel():
        _copy_blocks_kernel[(ids.numel(), triton.cdiv(elems, _CHUNK))](
            src, cache, ids, ids, elems, CHUNK=_CHUNK, GATHER=False)
