"""Triton kernels for the elementwise parts of a decoder layer, one launch each where eager torch
takes five to ten (which dominates a small-batch decode step even inside a CUDA graph).

Each rounds where Hugging Face's implementation rounds (RMSNorm in float32, cast back, then the
weight multiply in the model dtype; RoPE and SiLU products rounded per operation), so a kernel
differs from the torch path only by the order of a row's sum of squares.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(
    X, R, W, Out, stride_x, stride_r, stride_o, N, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < N
    x = tl.load(X + row * stride_x + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + c, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(R + row * stride_r + c, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / N
    y = (xf * tl.rsqrt(var + eps)).to(X.dtype.element_ty)
    w = tl.load(W + c, mask=mask, other=0.0)
    tl.store(Out + row * stride_o + c, (w.to(tl.float32) * y.to(tl.float32)).to(Out.dtype.element_ty), mask=mask)


def add_rmsnorm(
    x: torch.Tensor,  # (rows, hidden)
    residual: torch.Tensor | None,  # (rows, hidden), updated in place to x + residual
    weight: torch.Tensor,  # (hidden,)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual); without a residual, (rmsnorm(x) * weight, x).
    Mutates `residual` (to the sum) and nothing else."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be (rows, hidden) with contiguous rows, got {tuple(x.shape)}")
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous ({x.shape[1]},) {x.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError("residual must match x")
    out = torch.empty_like(x)
    if x.shape[0]:
        r = residual if residual is not None else x
        _add_rmsnorm_kernel[(x.shape[0],)](
            x, r, weight, out, x.stride(0), r.stride(0), out.stride(0), x.shape[1], eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(x.shape[1]),
            num_warps=8 if x.shape[1] >= 4096 else 4,
        )
    return out, (residual if residual is not None else x)


@triton.jit
def _rotate_heads(base, stride_h, heads, c, s, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    mask = (h < heads)[:, None] & (j < HALF)[None, :]
    dt = base.dtype.element_ty
    p1 = base + h[:, None] * stride_h + j[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    # out = x * cos + rotate_half(x) * sin, each product rounded as the torch path rounds it
    o1 = (x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)
    o2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
    tl.store(p1, o1.to(dt), mask=mask)
    tl.store(p1 + HALF, o2.to(dt), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, Pos, Cos, Sin, stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(Pos + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    jm = j < HALF
    dt = Q.dtype.element_ty
    # The tables are cat(freqs, freqs): both halves share one cos/sin, cast to the model dtype first.
    c = tl.load(Cos + pos * stride_cos + j, mask=jm, other=0.0).to(dt).to(tl.float32)[None, :]
    s = tl.load(Sin + pos * stride_cos + j, mask=jm, other=0.0).to(dt).to(tl.float32)[None, :]
    _rotate_heads(Q + t * stride_qt, stride_qh, NUM_HEADS, c, s, HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(K + t * stride_kt, stride_kh, NUM_KV_HEADS, c, s, HALF, BLOCK_H, BLOCK_HALF)


def rope_(
    positions: torch.Tensor,  # (num_tokens,) int64
    q: torch.Tensor,  # (num_tokens, num_heads, head_dim), rotated in place
    k: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim), rotated in place
    cos: torch.Tensor,  # (max_positions, head_dim) float32, cat(freqs, freqs) layout
    sin: torch.Tensor,
) -> None:
    """Rotary embedding applied in place to q and k (which may be strided views of one qkv
    buffer). Mutates q and k only."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be (tokens, heads, head_dim)")
    if q.stride(2) != 1 or k.stride(2) != 1 or q.dtype != k.dtype:
        raise ValueError("q and k must share a dtype and be contiguous in head_dim")
    if positions.shape != (q.shape[0],) or positions.dtype != torch.int64:
        raise ValueError("positions must be int64 (num_tokens,)")
    head_dim = q.shape[2]
    if head_dim % 2 or cos.shape[1] != head_dim or cos.dtype != torch.float32 or cos.stride() != sin.stride():
        raise ValueError("cos/sin must be float32 (max_positions, head_dim) tables of one layout")
    if q.shape[0] == 0:
        return
    _rope_kernel[(q.shape[0],)](
        q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        NUM_HEADS=q.shape[1], NUM_KV_HEADS=k.shape[1], HALF=head_dim // 2,
        BLOCK_H=triton.next_power_of_2(max(q.shape[1], k.shape[1])),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
    )


@triton.jit
def _silu_mul_kernel(X, Out, stride_x, stride_o, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    dt = X.dtype.element_ty
    g = tl.load(X + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + N + c, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(Out + row * stride_o + c, (s * u).to(dt), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:  # (rows, 2 * inter) -> (rows, inter)
    """silu(gate) * up for the fused gate/up projection's output [gate | up]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be (rows, 2 * inter) with contiguous rows, got {tuple(gate_up.shape)}")
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = 1024
        _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block)
    return out
