"""Triton kernels for the elementwise parts of a decoder layer, one launch each where eager torch
takes five to ten (which dominates a small-batch decode step even inside a CUDA graph).

Each rounds where Hugging Face's implementation rounds (RMSNorm in float32, cast back, then the
weight multiply in the model dtype; SiLU products rounded per operation), so a kernel differs
from the torch path only by the order of a row's sum of squares. (RoPE runs inside the KV write,
kernels.cache_ops.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl


@triton.jit
def _add_rmsnorm_kernel(
    X, R, W, Out, stride_x, stride_r, stride_o, N, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.wait(USE_PDL)
    pdl.launch_dependents(USE_PDL)
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
            num_warps=8 if x.shape[1] >= 4096 else 4, **pdl.launch(x.device),
        )
    return out, (residual if residual is not None else x)


@triton.jit
def _silu_mul_kernel(X, Out, stride_x, stride_o, N, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl.wait(USE_PDL)
    pdl.launch_dependents(USE_PDL)
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
        _silu_mul_kernel[(rows, triton.cdiv(n, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block, **pdl.launch(gate_up.device))
    return out
