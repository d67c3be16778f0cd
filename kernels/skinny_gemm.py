"""Triton matrix multiply for few rows: y = x @ w.T with x (M, K), M small (a decode step's batch),
and w (N, K) a layer's weight.

At small M the product is bound by reading w once. The kernel swaps the operands (w tile as the
MMA's left side, x as its narrow right side) so a tile of BLOCK_N weight rows feeds the tensor
cores whatever M is, and splits K across SPLIT_K programs when N alone gives too few programs to
keep every multiprocessor streaming. Split partials are reduced by the last program of each
column tile in a fixed order (kernels.sync's counters), so results do not depend on which
program finishes first and no second launch is needed.

`GATED` computes an MLP's gated activation from the fused [gate | up] weight (2N, K): each
program multiplies the gate rows n and the up rows N + n of its tile and writes silu(gate) * up,
rounded where the unfused path rounds (the projection's output, the SiLU, the product), so
the (M, 2N) projection never reaches memory and the SiLU costs no launch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import pdl, sync


@dataclass(frozen=True, slots=True)
class SkinnyConfig:
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _skinny_kernel(
    X, W, Y, Part, Count, M, N, K,
    stride_xm, stride_wn, stride_ym, stride_ps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GATED: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    kk = tl.arange(0, BLOCK_K)
    dt = W.dtype.element_ty
    k_tiles = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per
    t1 = tl.minimum(t0 + per, k_tiles)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    w_rows = W + n.to(tl.int64)[:, None] * stride_wn
    if PREFETCH > 0:
        # Before the wait (kernels.pdl, rule 3): this program's first PREFETCH weight tiles into
        # L2, one address per LINE-element line, while the predecessor still runs.
        cols = tl.minimum(t0 * BLOCK_K + tl.arange(0, PREFETCH * BLOCK_K // LINE) * LINE, K - 1)
        pf_rows = W + tl.minimum(n, N - 1).to(tl.int64)[:, None] * stride_wn + cols[None, :]  # (BLOCK_N, lines)
        pdl.prefetch_l2(pf_rows)
        if GATED:
            pdl.prefetch_l2(pf_rows + N * stride_wn)
    pdl.wait(USE_PDL)
    pdl.launch_dependents(USE_PDL)
    x_rows = X + m[:, None] * stride_xm
    for t in range(t0, t1):
        k = t * BLOCK_K + kk
        kmask = k < K
        wmask = nmask[:, None] & kmask[None, :]
        x = tl.load(x_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_rows + k[None, :], mask=wmask, other=0.0)  # (BLOCK_N, BLOCK_K)
        acc = tl.dot(w, tl.trans(x), acc)  # (BLOCK_N, BLOCK_M)
        if GATED:
            wu = tl.load(w_rows + N * stride_wn + k[None, :], mask=wmask, other=0.0)
            up = tl.dot(wu, tl.trans(x), up)
    out_ptr = Y + m[None, :] * stride_ym + n[:, None]
    omask = nmask[:, None] & mmask[None, :]
    if GATED:
        g = acc.to(dt).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(out_ptr, (s * up.to(dt).to(tl.float32)).to(Y.dtype.element_ty), mask=omask)
    elif SPLIT_K == 1:
        tl.store(out_ptr, acc.to(Y.dtype.element_ty), mask=omask)
    else:
        # Partial (BLOCK_N, BLOCK_M) tiles go to Part[pid_k]; the program that takes the
        # counter to SPLIT_K sums them in split order and resets the counter for the next call.
        p_off = n[:, None] * BLOCK_M + m[None, :]
        tl.store(Part + pid_k * stride_ps + p_off, acc, mask=omask)
        tl.debug_barrier()
        done = tl.atomic_add(Count + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            total = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(Part + s * stride_ps + p_off, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr, total.to(Y.dtype.element_ty), mask=omask)
            tl.atomic_xchg(Count + pid_n, 0, sem="relaxed", scope="gpu")


_SHARED_BYTES = 200 * 1024  # of the 227 KiB an H100/H200 multiprocessor offers, leaving the epilogue room
MAX_ROWS = 32  # the largest M the kernel takes: past it cuBLAS is as fast or faster (H200)


def config_for(n: int, k: int, num_sms: int, gated: bool = False) -> SkinnyConfig:
    """The tiling for an (n, k) weight, from sweeps on an H200 at M = 1, 8 and 32 with the weights
    cold in L2 (as in a forward pass): split K in two only for a long K whose column tiles fill at
    most half the multiprocessors; pipeline deeper the fewer programs share the card."""
    block_n = 64
    tiles = -(-n // block_n)
    split = 2 if not gated and k >= 8192 and 2 * tiles <= num_sms else 1
    programs = tiles * split
    stages = 4 if gated or programs > 2 * num_sms else 8 if 2 * programs <= num_sms else 6
    return SkinnyConfig(block_n=block_n, block_k=128, split_k=split, num_warps=4, num_stages=stages)


def _prefetch_tiles(programs: int, tiles_per_program: int, tile_bytes: int) -> int:
    """Weight tiles each program prefetches before its wait: as many as the budget
    (pdl.settings.prefetch_bytes over all programs) allows, at most its own, a power of two."""
    fit = min(tiles_per_program, pdl.settings.prefetch_bytes // max(1, programs * tile_bytes))
    return 0 if fit < 1 else 1 << (fit.bit_length() - 1)


def skinny_matmul(
    x: torch.Tensor,  # (M, K)
    w: torch.Tensor,  # (N, K), or (2N, K) [gate | up] with gated=True
    cfg: SkinnyConfig = SkinnyConfig(),
    gated: bool = False,
    out: torch.Tensor | None = None,  # (M, N)
) -> torch.Tensor:
    """x @ w.T accumulated in float32 and rounded to x's dtype; with `gated`, silu(x @ gate.T) *
    (x @ up.T). M must be at most MAX_ROWS. Launches no host sync (capturable in a CUDA graph)."""
    if x.dim() != 2 or w.dim() != 2 or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} and w {tuple(w.shape)} must be 2-D with contiguous rows")
    rows, k = x.shape
    if w.shape[1] != k or x.dtype != w.dtype or x.device != w.device:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not match w {tuple(w.shape)} {w.dtype}")
    if gated and w.shape[0] % 2:
        raise ValueError(f"a gated weight stacks [gate | up]: {w.shape[0]} rows are odd")
    if rows > MAX_ROWS:
        raise ValueError(f"{rows} rows exceed the skinny kernel's {MAX_ROWS}")
    n = w.shape[0] // 2 if gated else w.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device) if out is None else out
    if out.shape != (rows, n) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be ({rows}, {n}) {x.dtype} with contiguous rows")
    if rows == 0:
        return out
    block_m = max(16, triton.next_power_of_2(rows))
    # each pipeline stage holds a weight tile (two when gated) and an x tile in shared memory
    stage_bytes = (cfg.block_n * (2 if gated else 1) + block_m) * cfg.block_k * x.element_size()
    stages = max(1, min(cfg.num_stages, _SHARED_BYTES // stage_bytes))
    tiles = triton.cdiv(n, cfg.block_n)
    split = 1 if gated else max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    if split > 1:
        part = torch.empty(split, tiles * cfg.block_n * block_m, dtype=torch.float32, device=x.device)
        count = sync.counters(x.device, tiles)
    else:
        part = count = out  # unused
    launch = pdl.launch(x.device)
    prefetch = _prefetch_tiles(tiles * split, triton.cdiv(triton.cdiv(k, cfg.block_k), split),
                               cfg.block_n * (2 if gated else 1) * cfg.block_k * w.element_size()) if launch["USE_PDL"] else 0
    _skinny_kernel[(tiles, split)](
        x, w, out, part, count, rows, n, k,
        x.stride(0), w.stride(0), out.stride(0), part.stride(0) if split > 1 else 0,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, GATED=gated,
        PREFETCH=prefetch, LINE=128 // w.element_size(), num_warps=cfg.num_warps, num_stages=stages, **launch,
    )
    return out
