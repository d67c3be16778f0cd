"""Triton kernels that move KV data: the per-step cache write and whole-block gather/scatter.

`write_kv` puts each new token's K and V at its slot (``block * block_size + row``; a negative
slot marks a padding token, skipped, so a CUDA graph captured for a larger batch can run a
smaller one), optionally applying the rotary embedding to q and k on the way (one launch a layer
for both). `gather_blocks` / `scatter_blocks` copy whole blocks of the block-major cache
(runtime.kv_cache: a block is one contiguous buffer across every layer) to and from a contiguous
staging buffer, so a tier move is one kernel plus one large host copy instead of a copy a block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import pdl


@triton.jit
def _rotate(x1, x2, c, s, dt):
    """x * cos + rotate_half(x) * sin of a head's halves (float32 in, float32 out), each product
    rounded to the model dtype as the torch path rounds it."""
    o1 = (x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)
    o2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
    return o1, o2


@triton.jit
def _write_kv_kernel(
    K, V, KCache, VCache, Slots, Q, Pos, Cos, Sin,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch,
    stride_db, stride_dt, stride_dh,
    stride_qt, stride_qh, stride_cos,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_ELEMS: tl.constexpr, BLOCK: tl.constexpr,
    ROPE: tl.constexpr, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.wait(USE_PDL)
    pdl.launch_dependents(USE_PDL)
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
    v = tl.load(V + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(VCache + blk * stride_db + row * stride_dt + h * stride_dh + d, v, mask=mask)
    if ROPE:
        # q rotated in place; k rotated on its way into the cache (the caller's k is left as is)
        pos = tl.load(Pos + t).to(tl.int64)
        hh = tl.arange(0, BLOCK_H)
        j = tl.arange(0, BLOCK_HALF)
        jm = j < HALF
        dt = Q.dtype.element_ty
        # The tables are cat(freqs, freqs): both halves share one cos/sin, cast to the model dtype first.
        c = tl.load(Cos + pos * stride_cos + j, mask=jm, other=0.0).to(dt).to(tl.float32)[None, :]
        s = tl.load(Sin + pos * stride_cos + j, mask=jm, other=0.0).to(dt).to(tl.float32)[None, :]
        qm = (hh < NUM_HEADS)[:, None] & jm[None, :]
        qp = Q + t * stride_qt + hh[:, None] * stride_qh + j[None, :]
        o1, o2 = _rotate(tl.load(qp, mask=qm, other=0.0).to(tl.float32),
                         tl.load(qp + HALF, mask=qm, other=0.0).to(tl.float32), c, s, dt)
        tl.store(qp, o1.to(dt), mask=qm)
        tl.store(qp + HALF, o2.to(dt), mask=qm)
        km = (hh < NUM_KV_HEADS)[:, None] & jm[None, :]
        kp = K + t * stride_kt + hh[:, None] * stride_kh + j[None, :]
        o1, o2 = _rotate(tl.load(kp, mask=km, other=0.0).to(tl.float32),
                         tl.load(kp + HALF, mask=km, other=0.0).to(tl.float32), c, s, dt)
        cp = KCache + blk * stride_cb + row * stride_ct + hh[:, None] * stride_ch + j[None, :]
        tl.store(cp, o1.to(dt), mask=km)
        tl.store(cp + HALF, o2.to(dt), mask=km)
    else:
        k = tl.load(K + t * stride_kt + h * stride_kh + d, mask=mask)
        tl.store(KCache + blk * stride_cb + row * stride_ct + h * stride_ch + d, k, mask=mask)


@dataclass(frozen=True, slots=True)
class Rope:
    """Rotary embedding for `write_kv` to apply on the way: q (rotated in place) and the tables."""
    q: torch.Tensor  # (num_tokens, num_heads, head_dim)
    positions: torch.Tensor  # (num_tokens,) int64
    cos: torch.Tensor  # (max_positions, head_dim) float32, cat(freqs, freqs) layout
    sin: torch.Tensor


def _check_rope(rope: Rope, k: torch.Tensor) -> None:
    q = rope.q
    if q.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.dtype != k.dtype or q.stride(2) != 1:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} must be (tokens, heads, head_dim) like k {tuple(k.shape)} {k.dtype}")
    if rope.positions.shape != (q.shape[0],) or rope.positions.dtype != torch.int64:
        raise ValueError("positions must be int64 (num_tokens,)")
    head_dim = q.shape[2]
    if head_dim % 2 or rope.cos.shape[1] != head_dim or rope.cos.dtype != torch.float32 or rope.cos.stride() != rope.sin.stride():
        raise ValueError("cos/sin must be float32 (max_positions, head_dim) tables of one layout")


def write_kv(
    k_cache: torch.Tensor,  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor,
    k: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
    v: torch.Tensor,
    slots: torch.Tensor,  # (num_tokens,) int64: block * block_size + row, or -1 to skip
    rope: Rope | None = None,
) -> None:
    """Mutates the caches at the given slots and nothing else; with `rope`, K enters the cache
    rotated to its position and rope.q is rotated in place (tokens with a slot only)."""
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
    if rope is not None:
        _check_rope(rope, k)
    if k.shape[0] == 0:
        return
    heads, head_dim = k.shape[1], k.shape[2]
    q = rope.q if rope is not None else k
    _write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slots, q,
        *((rope.positions, rope.cos, rope.sin) if rope is not None else (slots, slots, slots)),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        q.stride(0), q.stride(1), rope.cos.stride(0) if rope is not None else 0,
        PAGE=k_cache.shape[1], HEAD_DIM=head_dim, NUM_ELEMS=heads * head_dim,
        BLOCK=triton.next_power_of_2(heads * head_dim),
        ROPE=rope is not None, NUM_HEADS=q.shape[1], NUM_KV_HEADS=heads, HALF=head_dim // 2,
        BLOCK_H=triton.next_power_of_2(max(q.shape[1], heads)), BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        **pdl.launch(k.device),
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
