"""The elementwise operations of a decoder layer, behind one seam: eager torch (Hugging Face's
arithmetic op for op, on any device) or fused Triton kernels (one launch each, for CUDA)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from runtime.models.llama import RMSNorm, RotaryEmbedding


class LayerOps(ABC):
    """Contract: each call returns new tensors or mutates only what its docstring names; the
    values are Hugging Face's up to float rounding order."""

    @abstractmethod
    def add_rmsnorm(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), or (norm(x), x) without a residual. May update
        `residual` in place to the sum."""

    @abstractmethod
    def rope(
        self, rope: RotaryEmbedding, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k rotated to their positions (may rotate them in place and return them)."""

    @abstractmethod
    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a fused (rows, 2 * inter) projection output."""


class TorchOps(LayerOps):
    def add_rmsnorm(self, x, residual, norm):
        if residual is not None:
            x = x + residual
        return norm(x), x

    def rope(self, rope, positions, q, k):
        return rope(positions, q, k)

    def silu_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class TritonOps(LayerOps):
    def __init__(self) -> None:
        from kernels import fused_ops

        self.k = fused_ops

    def add_rmsnorm(self, x, residual, norm):
        return self.k.add_rmsnorm(x, residual, norm.weight, norm.eps)

    def rope(self, rope, positions, q, k):
        self.k.rope_(positions, q, k, rope.cos, rope.sin)
        return q, k

    def silu_mul(self, gate_up):
        return self.k.silu_mul(gate_up)
