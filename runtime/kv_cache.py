"""The paged KV cache tensor.

One block-major tensor ``(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)``: a block
is one contiguous buffer spanning every layer's K and V, so moving a block between tiers is a single
copy. Attention sees per-layer strided views ``(num_blocks, block_size, num_kv_heads, head_dim)``.
"""
from __future__ import annotations

import torch

from runtime.config import ModelConfig


class PagedKVCache:
    def __init__(
        self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
        self.data = torch.zeros(
            num_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim,
            dtype=dtype, device=device,
        )
        self._k = [self.data[:, layer, 0] for layer in range(cfg.num_layers)]
        self._v = [self.data[:, layer, 1] for layer in range(cfg.num_layers)]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V views of one layer, each (num_blocks, block_size, num_kv_heads, head_dim)."""
        return self._k[layer], self._v[layer]

    @property
    def bytes_per_block(self) -> int:
        return self.data[0].numel() * self.data.element_size()

    @staticmethod
    def blocks_for_budget(cfg: ModelConfig, block_size: int, dtype: torch.dtype, gib: float) -> int:
        per_block = block_size * cfg.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size())
        return max(1, int(gib * 2**30) // per_block)
