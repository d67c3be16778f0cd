"""Triton paged attention: decode (split along the context) and prefill/extend over a paged prefix.

The paged cache of one layer is ``(num_blocks, block_size, num_kv_heads, head_dim)``, possibly a
strided view into the block-major cache (runtime.kv_cache): the kernels take its strides and need
only the last dimension contiguous. A sequence's tokens live at position ``p`` in block
``block_table[p // block_size]``, row ``p % block_size``. Both kernels read the step's own K/V
from the cache, so the KV write (kernels.cache_ops) must run first.

Softmax runs online in float32 in the exp2 domain (scores pre-multiplied by log2(e)). For float32
inputs the dot products use IEEE float32 (no TF32), so a float32 model matches its reference.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from kernels import pdl, sync

LOG2E = 1.4426950408889634


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches must be (blocks, block_size, kv_heads, head_dim) and equal, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the head dimension of q and of the caches must be contiguous")
    heads, head_dim = q.shape[-2], q.shape[-1]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim {head_dim} of q differs from the cache's {k_cache.shape[3]}")
    if heads % k_cache.shape[2]:
        raise ValueError(f"{heads} query heads are not a multiple of {k_cache.shape[2]} KV heads")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError("q and the caches must be on one device")


def _check_q_out(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor | None, rows: str
) -> torch.Tensor:
    """Checks q (rows, heads, head_dim) against the caches; returns `out`, or a new one like q."""
    _check_cache(q, k_cache, v_cache)
    if q.dim() != 3:
        raise ValueError(f"q must be ({rows}, heads, head_dim), got {tuple(q.shape)}")
    out = torch.empty_like(q) if out is None else out
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must match q's shape and dtype with a contiguous head dimension")
    return out


def _check_index(name: str, t: torch.Tensor, dims: int, rows: int) -> None:
    if t.dtype != torch.int32 or t.dim() != dims or t.shape[0] != rows:
        raise ValueError(f"{name} must be int32 with {dims} dims and {rows} rows, got {t.dtype} {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


# ---- the shared inner step ---------------------------------------------------------------------

@triton.jit
def _tile_blocks(table, n0, end, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The block id of each key in [n0, n0 + BLOCK_N), (BLOCK_N,) int64; 0 for keys >= end
    (the table's row may end there)."""
    n = n0 + tl.arange(0, BLOCK_N)
    return tl.load(table + n // PAGE, mask=n < end, other=0).to(tl.int64)


@triton.jit
def _load_keys(ptr, nmask, dmask, FULL: tl.constexpr, EVEN_D: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) tile of K or V, zero where masked; FULL: every row valid, EVEN_D:
    every column (each such mask is left out of the load)."""
    if FULL and EVEN_D:
        return tl.load(ptr)
    elif FULL:
        return tl.load(ptr, mask=dmask[None, :], other=0.0)
    elif EVEN_D:
        return tl.load(ptr, mask=nmask[:, None], other=0.0)
    else:
        return tl.load(ptr, mask=nmask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _attend_tile(
    q, m, l, acc, K, V, blk, n0, end, qpos, kvh, d, dmask,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale_log2,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    EMPTY_ROWS: tl.constexpr, FULL: tl.constexpr = False, EVEN_D: tl.constexpr = False,
):
    """Fold keys [n0, n0 + BLOCK_N) (those < end) of one KV head, in blocks `blk`
    (`_tile_blocks`), into the online softmax state (m, l, acc) of the query rows q (ROWS,
    BLOCK_D); with CAUSAL, row i sees keys <= qpos[i]. EMPTY_ROWS: a row may have seen no key
    yet and see none here (a slice of the keys that starts past its position), which leaves its
    state at (-inf, 0, 0) instead of NaN. FULL: every key of the tile is < end, and EVEN_D: the
    head fills BLOCK_D; each drops a mask from the loads. Unmasked, with the block ids loaded a
    tile ahead, Triton pipelines the K/V copies behind the math (on an H200 the extend kernel
    took 9-15% less time in every shape measured)."""
    n = n0 + tl.arange(0, BLOCK_N)
    nmask = n < end
    row = n % PAGE
    k_ptr = K + (blk * stride_kb + row * stride_kt + kvh * stride_kh)[:, None] + d[None, :]
    v_ptr = V + (blk * stride_vb + row * stride_vt + kvh * stride_vh)[:, None] + d[None, :]
    k = _load_keys(k_ptr, nmask, dmask, FULL, EVEN_D)  # (BLOCK_N, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (ROWS, BLOCK_N)
    if CAUSAL:
        s = tl.where(nmask[None, :] & (n[None, :] <= qpos[:, None]), s, float("-inf"))
    elif not FULL:
        s = tl.where(nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    if EMPTY_ROWS:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    alpha = tl.exp2(m - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l = l * alpha + tl.sum(p, 1)
    v = _load_keys(v_ptr, nmask, dmask, FULL, EVEN_D)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _merge_slices(
    acc, m, l, part_o, part_lse, stride_ps, stride_ls, split, counter, out_ptr, omask, rmask,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    """Store this slice's normalised output and log-sum-exp of its rows (an empty slice: lse
    -inf, weight 0 below); then in the last slice of the group to finish (counted at `counter`,
    kernels.sync) merge every slice's partials in slice order into `out_ptr`, so the result does
    not depend on which finished last, and set the counter back to zero. Slice 0 must see a key
    in every row, so the running maximum is finite from it on."""
    has = l > 0
    tl.store(part_o + split * stride_ps, tl.where(has[:, None], acc / tl.where(has, l, 1.0)[:, None], 0.0), mask=omask)
    tl.store(part_lse + split * stride_ls, tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf")),
             mask=rmask)
    tl.debug_barrier()
    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
        m_all = tl.full([ROWS], float("-inf"), tl.float32)
        w_all = tl.zeros([ROWS], tl.float32)
        o_all = tl.zeros([ROWS, BLOCK_D], tl.float32)
        for s in tl.static_range(NUM_SPLITS):  # unrolled: every slice's loads are issued at once
            lse_s = tl.load(part_lse + s * stride_ls, mask=rmask, other=0.0, cache_modifier=".cg")
            o_s = tl.load(part_o + s * stride_ps, mask=omask, other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_all, lse_s)
            scale_old = tl.exp2(m_all - m_new)
            w_s = tl.exp2(lse_s - m_new)
            w_all = w_all * scale_old + w_s
            o_all = o_all * scale_old[:, None] + w_s[:, None] * o_s
            m_all = m_new
        tl.store(out_ptr, (o_all / w_all[:, None]).to(out_ptr.dtype.element_ty), mask=omask)
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


# ---- decode -----------------------------------------------------------------------------------

@triton.jit
def _decode_kernel(
    Q, K, V, BlockTables, ContextLens, Out, PartO, PartLse, Count,
    scale_log2,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ob, stride_oh,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait(USE_PDL)
    pdl.launch_dependents(USE_PDL)
    # One program: one sequence, one KV head (all GROUP query heads sharing it, so K/V are read
    # once), one slice of the context. Slices are sized per sequence, so short and long
    # sequences in one batch each spread over all NUM_SPLITS programs.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ContextLens + b)
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    rows = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + rows
    hmask = rows < GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)  # (BLOCK_H, BLOCK_D)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    table = BlockTables + b * stride_bt
    for n0 in range(start, end, BLOCK_N):
        m, l, acc = _attend_tile(
            q, m, l, acc, K, V, _tile_blocks(table, n0, end, PAGE, BLOCK_N), n0, end, rows, kvh, d, dmask,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale_log2,
            PAGE, BLOCK_N, False, PRECISION, False,
        )

    omask = hmask[:, None] & dmask[None, :]
    out_ptr = Out + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr, (acc / l[:, None]).to(Out.dtype.element_ty), mask=omask)
    else:
        # An empty slice (context shorter than the splits) merges with weight 0.
        _merge_slices(acc, m, l, PartO + b * stride_pb + heads[:, None] * stride_ph + d[None, :],
                      PartLse + b * stride_lb + heads * stride_lh, stride_ps, 1, split,
                      Count + b * tl.num_programs(1) + kvh, out_ptr, omask, hmask, BLOCK_H, BLOCK_D, NUM_SPLITS)


def decode_splits(batch: int, kv_heads: int, num_sms: int, max_splits: int = 16) -> int:
    """Context splits so that a decode step fills the GPU: about two programs per multiprocessor."""
    want = -(-2 * num_sms // max(1, batch * kv_heads))
    return max(1, min(max_splits, 1 << max(0, (want - 1).bit_length())))


def paged_decode(
    q: torch.Tensor,  # (batch, num_heads, head_dim)
    k_cache: torch.Tensor,  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (batch, max_blocks) int32
    context_lens: torch.Tensor,  # (batch,) int32, each >= 1
    num_splits: int = 1,
    out: torch.Tensor | None = None,  # (batch, num_heads, head_dim)
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged context. Launches no host sync, so it
    can be captured in a CUDA graph (with `num_splits` fixed per graph)."""
    out = _check_q_out(q, k_cache, v_cache, out, "batch")
    batch, heads, head_dim = q.shape
    _check_index("block_tables", block_tables, 2, batch)
    _check_index("context_lens", context_lens, 1, batch)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if batch == 0:
        return out
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    block_d = triton.next_power_of_2(head_dim)
    scale = LOG2E / math.sqrt(head_dim)
    if num_splits > 1:
        part_o = torch.empty(batch, heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q.device)
        count = sync.counters(q.device, batch * kv_heads)
    else:
        part_o, part_lse, count = out, out, out  # unused
    po_strides = part_o.stride()[:3] if num_splits > 1 else (0, 0, 0)
    pl_strides = part_lse.stride()[:2] if num_splits > 1 else (0, 0)
    _decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_o, part_lse, count,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        *po_strides, *pl_strides,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE=k_cache.shape[1], BLOCK_N=block_n, NUM_SPLITS=num_splits, PRECISION=_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages, **pdl.launch(q.device),
    )
    return out


# ---- prefill / extend --------------------------------------------------------------------------

@triton.jit
def _prefill_kernel(
    Q, K, V, BlockTables, QueryStart, QueryLen, ContextLens, Tiles, Out, PartO, PartLse, Count,
    scale_log2, min_slice,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_tiles,
    stride_ot, stride_oh,
    stride_ps, stride_pt, stride_ph,
    stride_ls, stride_lt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    pdl.wait(USE_PDL)
    pdl.launch_dependents(USE_PDL)
    # One program: one query head, one tile of the tile table = BLOCK_M new tokens of one
    # sequence, one of NUM_SPLITS slices of the keys it sees (each at least min_slice keys, a
    # multiple of BLOCK_N: slices past the tile's keys are empty). New token i sits at absolute
    # position prefix + i and attends to every key at or before it (cached or new). A tile of
    # sequence -1 is padding (a graph's fixed grid).
    h = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(Tiles + tile)
    if seq < 0:
        return
    mb = tl.load(Tiles + stride_tiles + tile)
    qlen = tl.load(QueryLen + seq)
    qstart = tl.load(QueryStart + seq).to(tl.int64)
    ctx = tl.load(ContextLens + seq)
    prefix = ctx - qlen
    kvh = h // GROUP

    mi = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = mi < qlen
    qpos = prefix + mi
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(Q + (qstart + mi)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = BlockTables + seq * stride_bt
    # Keys past the last row's position are never seen by this tile.
    end = tl.minimum(ctx, prefix + (mb + 1) * BLOCK_M)
    per_split = tl.maximum(tl.cdiv(tl.cdiv(end, NUM_SPLITS), BLOCK_N) * BLOCK_N, min_slice)
    start = split * per_split
    end = tl.minimum(start + per_split, end)
    # Every row sees every key before the tile's first position: those key blocks skip the
    # causal mask (most of the keys, for a short extend over a long prefix). Slice bounds are
    # multiples of BLOCK_N, so the first loop's blocks are whole.
    mid = tl.maximum(start, tl.minimum(end, (prefix + mb * BLOCK_M) // BLOCK_N * BLOCK_N))
    # Those blocks take no key mask (FULL), and each tile's block ids are loaded a tile ahead,
    # so the next tile's K/V addresses are known while this tile's math runs and Triton keeps
    # their copies in flight (the ids' own load would otherwise sit at the head of each
    # iteration's chain).
    blk = _tile_blocks(table, start, mid, PAGE, BLOCK_N)
    for n0 in range(start, mid, BLOCK_N):
        cur = blk
        blk = _tile_blocks(table, n0 + BLOCK_N, mid, PAGE, BLOCK_N)
        m, l, acc = _attend_tile(
            q, m, l, acc, K, V, cur, n0, end, qpos, kvh, d, dmask,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale_log2,
            PAGE, BLOCK_N, False, PRECISION, False, True, HEAD_DIM == BLOCK_D,
        )
    for n0 in range(mid, end, BLOCK_N):
        m, l, acc = _attend_tile(
            q, m, l, acc, K, V, _tile_blocks(table, n0, end, PAGE, BLOCK_N), n0, end, qpos, kvh, d, dmask,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale_log2,
            PAGE, BLOCK_N, True, PRECISION, NUM_SPLITS > 1, False, HEAD_DIM == BLOCK_D,
        )
    omask = mmask[:, None] & dmask[None, :]
    out_ptr = Out + (qstart + mi)[:, None] * stride_ot + h * stride_oh + d[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr, (acc / l[:, None]).to(Out.dtype.element_ty), mask=omask)
    else:
        # Slice 0 holds key 0, which every row sees.
        _merge_slices(acc, m, l, PartO + (qstart + mi)[:, None] * stride_pt + h * stride_ph + d[None, :],
                      PartLse + (qstart + mi) * stride_lt + h, stride_ps, stride_ls, split,
                      Count + tile * tl.num_programs(0) + h, out_ptr, omask, mmask, BLOCK_M, BLOCK_D, NUM_SPLITS)


EXTEND_SPLITS = (1, 4)  # the slice counts `prefill_splits` picks from (a warm-up compiles each)
MIN_SLICE_KEYS = 1024  # below this many keys a slice's merge costs more than its parallelism saves


def prefill_splits(num_tiles: int, heads: int, num_sms: int) -> int:
    """Slices of the keys per extend tile: four when the tiles' programs do not fill the
    multiprocessors once (a hundred-odd tokens extending a long cached prefix would leave most
    of the card idle), else one. Measured on an H200 (bench/gpu_kernels.py): 128 tokens over 8k
    keys run 2.7x faster in four slices; at 300 tokens (160 programs on 132 SMs) one and four
    tie and two lose to both; at 640 four gain 7%, not worth a second graph variant per bucket."""
    return EXTEND_SPLITS[-1] if 0 < num_tiles * heads <= num_sms else 1


def prefill_block_m(dtype: torch.dtype, head_dim: int) -> int:
    """Query rows per extend-kernel tile (the unit of `prefill_tiles`)."""
    return 32 if head_dim > 128 and dtype == torch.float32 else 64  # float32 x 256 dims: shared memory


def prefill_stages(dtype: torch.dtype, head_dim: int) -> int:
    """Software-pipeline stages of the extend kernel's key loop: three keep two tiles' K/V copies
    in flight behind the math where they fit in shared memory (16-bit, up to 128 dims: on an
    H200 a 300-token tool return over 4k keys took 12% less time than at two, its block ids
    loaded a tile ahead), else two."""
    return 3 if dtype != torch.float32 and head_dim <= 128 else 2


def prefill_tiles(query_lens: Sequence[int] | np.ndarray, context_lens: Sequence[int] | np.ndarray, block_m: int,
                  out: np.ndarray | None = None) -> np.ndarray:
    """The extend kernel's work list, (2, num_tiles) int32: row 0 the sequence, row 1 the query
    tile within it. Tiles that see the most keys come first: the causal tail of a long prompt
    does the most work, and starting it first evens out when the programs finish. Into `out`
    (2, >= num_tiles) when given, its other columns set to padding (sequence -1)."""
    seqs: list[int] = []
    tiles: list[int] = []
    keys: list[int] = []
    for s, (ql, ctx) in enumerate(zip(map(int, query_lens), map(int, context_lens))):
        prefix = ctx - ql
        for mb in range(-(-ql // block_m)):
            seqs.append(s)
            tiles.append(mb)
            keys.append(min(ctx, prefix + (mb + 1) * block_m))
    order = np.argsort(-np.asarray(keys, dtype=np.int64), kind="stable")
    n = len(seqs)
    if out is None:
        out = np.empty((2, n), dtype=np.int32)
    elif out.shape[1] < n:
        raise ValueError(f"{n} tiles do not fit a table of {out.shape[1]}")
    out[0, :n] = np.asarray(seqs, dtype=np.int32)[order]
    out[1, :n] = np.asarray(tiles, dtype=np.int32)[order]
    out[:, n:] = -1
    return out


def paged_prefill(
    q: torch.Tensor,  # (num_tokens, num_heads, head_dim): each sequence's new tokens, contiguous
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (num_seqs, max_blocks) int32
    query_start: torch.Tensor,  # (num_seqs,) int32: the sequence's first row in q
    query_lens: torch.Tensor,  # (num_seqs,) int32, each >= 1
    context_lens: torch.Tensor,  # (num_seqs,) int32: cached prefix + query_len
    tiles: torch.Tensor,  # (2, num_tiles) int32: `prefill_tiles` of the same lengths and block_m
    out: torch.Tensor | None = None,
    block_m: int | None = None,  # default `prefill_block_m`
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int | None = None,  # default `prefill_stages`
    num_splits: int = 1,
    min_slice: int = MIN_SLICE_KEYS,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix and themselves.
    The grid is the tile table's width (times `num_splits` slices of each tile's keys, each of at
    least `min_slice` keys, merged by the last slice to finish), so a CUDA graph can hold a
    launch whose sequences and lengths change between replays (padding tiles do nothing).
    Launches no host sync."""
    out = _check_q_out(q, k_cache, v_cache, out, "num_tokens")
    num_seqs = block_tables.shape[0]
    _check_index("block_tables", block_tables, 2, num_seqs)
    for name, t in (("query_start", query_start), ("query_lens", query_lens), ("context_lens", context_lens)):
        _check_index(name, t, 1, num_seqs)
    _check_index("tiles", tiles, 2, 2)
    tokens, heads, head_dim = q.shape
    if num_splits < 1 or min_slice < 1:
        raise ValueError(f"num_splits and min_slice must be >= 1, got {num_splits} and {min_slice}")
    if num_seqs == 0 or tiles.shape[1] == 0:
        return out
    block_m = block_m or prefill_block_m(q.dtype, head_dim)
    num_stages = num_stages or prefill_stages(q.dtype, head_dim)
    if head_dim > 128 and q.dtype == torch.float32:
        block_n = min(block_n, 32)  # (as prefill_block_m: float32 tiles of 256 dims exceed shared memory at 64)
    if num_splits > 1:
        part_o = torch.empty(num_splits, tokens, heads, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_splits, tokens, heads, dtype=torch.float32, device=q.device)
        count = sync.counters(q.device, tiles.shape[1] * heads)
        p_strides, l_strides = part_o.stride()[:3], part_lse.stride()[:2]
    else:
        part_o, part_lse, count = out, out, out  # unused
        p_strides, l_strides = (0, 0, 0), (0, 0)
    _prefill_kernel[(heads, tiles.shape[1], num_splits)](
        q, k_cache, v_cache, block_tables, query_start, query_lens, context_lens, tiles, out,
        part_o, part_lse, count,
        LOG2E / math.sqrt(head_dim), -(-min_slice // block_n) * block_n,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        tiles.stride(0),
        out.stride(0), out.stride(1),
        *p_strides, *l_strides,
        GROUP=heads // k_cache.shape[2], HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(q.dtype),
        NUM_SPLITS=num_splits, num_warps=num_warps, num_stages=num_stages, **pdl.launch(q.device),
    )
    return out
