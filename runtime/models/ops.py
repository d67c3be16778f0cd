"""The per-layer operations other than attention, behind one seam: eager torch (Hugging Face's
arithmetic op for op, on any device) or Triton kernels (for CUDA): fused elementwise kernels, and
for the few rows of a decode step, matrix multiplies that stream the weights faster than cuBLAS
and fold the MLP's SiLU gate into its projection."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from runtime.models.llama import RMSNorm


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
    def linear(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        """layer(x): (rows, in) -> (rows, out)."""

    @abstractmethod
    def gated(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        """silu(gate) * up where [gate | up] = layer(x): (rows, in) -> (rows, out / 2)."""

    @abstractmethod
    def logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight.T: (rows, hidden) -> (rows, vocab)."""


class TorchOps(LayerOps):
    def add_rmsnorm(self, x, residual, norm):
        if residual is not None:
            x = x + residual
        return norm(x), x

    def linear(self, x, layer):
        return layer(x)

    def gated(self, x, layer):
        gate, up = layer(x).chunk(2, dim=-1)
        return F.silu(gate) * up

    def logits(self, x, weight):
        return F.linear(x, weight)


class TritonOps(LayerOps):
    def __init__(self) -> None:
        from kernels import fused_ops, skinny_gemm

        self.k = fused_ops
        self.skinny = skinny_gemm
        self._configs: dict[tuple[int, int, bool], Any] = {}

    def _skinny(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool) -> Any:
        """The skinny kernel's tiling for this product, or None where cuBLAS is the better choice:
        more than MAX_ROWS rows (compute-bound), float32 (kept on the IEEE path), or a bias."""
        if x.shape[0] > self.skinny.MAX_ROWS or x.dtype == torch.float32 or bias is not None or x.stride(1) != 1:
            return None
        key = (weight.shape[0], weight.shape[1], gated)
        cfg = self._configs.get(key)
        if cfg is None:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8
            cfg = self._configs[key] = self.skinny.config_for(
                weight.shape[0] // 2 if gated else weight.shape[0], weight.shape[1], sms, gated)
        return cfg

    def add_rmsnorm(self, x, residual, norm):
        return self.k.add_rmsnorm(x, residual, norm.weight, norm.eps)

    def linear(self, x, layer):
        cfg = self._skinny(x, layer.weight, layer.bias, False)
        return layer(x) if cfg is None else self.skinny.skinny_matmul(x, layer.weight, cfg)

    def gated(self, x, layer):
        cfg = self._skinny(x, layer.weight, layer.bias, True)
        if cfg is None:
            return self.k.silu_mul(layer(x))
        return self.skinny.skinny_matmul(x, layer.weight, cfg, gated=True)

    def logits(self, x, weight):
        cfg = self._skinny(x, weight, None, False)
        return F.linear(x, weight) if cfg is None else self.skinny.skinny_matmul(x, weight, cfg)
