"""The attention backend seam.

The runner lays a step's tokens out flat, decodes first, each sequence contiguous, and describes
them as `SeqSlice`s. A backend turns those into its own metadata once per step, then, per layer,
writes the new K/V into the paged cache and attends.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kernels import torch_ref
from runtime.kv_cache import PagedKVCache

if TYPE_CHECKING:
    from runtime.models.llama import RotaryEmbedding


@dataclass(frozen=True, slots=True)
class SeqSlice:
    query_start: int  # index of the sequence's first new token in the flat batch
    query_len: int  # new tokens this step
    context_len: int  # tokens in the cache after this step (cached prefix + new)
    block_ids: list[int]  # the sequence's block table, covering context_len tokens


class AttentionBackend(ABC):
    """Contract: `build_metadata` is called once per step with slices ordered decodes first
    (query_len == 1) and returns an opaque object; `forward` is called once per layer with it and
    the projections before the rotary embedding: it rotates q and k to `positions` with `rope`
    (Hugging Face's arithmetic), writes the step's K/V into that layer's cache at the slices'
    positions, and returns the attention output (num_tokens, num_heads, head_dim) in q's dtype.
    It mutates that layer's cache and may rotate q in place; nothing else. Raises nothing on
    valid input; shapes are checked by the caller's invariants."""

    @abstractmethod
    def build_metadata(self, slices: list[SeqSlice], block_size: int, device: torch.device) -> Any: ...

    @abstractmethod
    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # (num_tokens, num_heads, head_dim)
        k: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        v: torch.Tensor,
        kv_cache: PagedKVCache,
        meta: Any,
        rope: RotaryEmbedding,
        positions: torch.Tensor,  # (num_tokens,) int64
    ) -> torch.Tensor: ...


@dataclass(slots=True)
class TorchMetadata:
    slot_block: torch.Tensor  # (num_tokens,) int64
    slot_offset: torch.Tensor  # (num_tokens,) int64
    num_decodes: int
    decode_table: torch.Tensor | None  # (num_decodes, max_blocks) int64
    decode_mask: torch.Tensor | None  # (num_decodes, 1, 1, max_blocks * block_size) bool
    prefills: list[tuple[int, int, int, torch.Tensor]]  # (query_start, query_len, context_len, block_ids)


class TorchAttentionBackend(AttentionBackend):
    """Gathers each sequence's K/V from the paged cache and runs SDPA: decodes as one padded
    batch, prefill chunks one sequence at a time. Runs on CPU and, slowly, on CUDA."""

    def build_metadata(self, slices: list[SeqSlice], block_size: int, device: torch.device) -> TorchMetadata:
        blocks: list[int] = []
        offsets: list[int] = []
        for s in slices:
            for pos in range(s.context_len - s.query_len, s.context_len):
                blocks.append(s.block_ids[pos // block_size])
                offsets.append(pos % block_size)
        decodes = [s for s in slices if s.query_len == 1]
        assert all(s.query_len == 1 for s in slices[: len(decodes)]), "decodes come first"
        decode_table = decode_mask = None
        if decodes:
            width = max(-(-s.context_len // block_size) for s in decodes)
            table = [s.block_ids[:width] + [0] * (width - min(width, len(s.block_ids))) for s in decodes]
            decode_table = torch.tensor(table, dtype=torch.int64, device=device)
            ctx = torch.tensor([s.context_len for s in decodes], device=device)
            if bool((ctx != width * block_size).any()):
                # Padding rows and the unfilled tail of the last block must not be attended.
                mask = torch.arange(width * block_size, device=device)[None, :] < ctx[:, None]
                decode_mask = mask[:, None, None, :]
        prefills = [
            (s.query_start, s.query_len, s.context_len,
             torch.tensor(s.block_ids, dtype=torch.int64, device=device))
            for s in slices[len(decodes):]
        ]
        return TorchMetadata(
            slot_block=torch.tensor(blocks, dtype=torch.int64, device=device),
            slot_offset=torch.tensor(offsets, dtype=torch.int64, device=device),
            num_decodes=len(decodes),
            decode_table=decode_table,
            decode_mask=decode_mask,
            prefills=prefills,
        )

    def forward(self, layer, q, k, v, kv_cache, meta: TorchMetadata, rope, positions) -> torch.Tensor:
        q, k = rope(positions, q, k)
        k_cache, v_cache = kv_cache.layer(layer)
        torch_ref.write_kv(k_cache, v_cache, k, v, meta.slot_block, meta.slot_offset)
        if not meta.prefills:
            assert meta.decode_table is not None
            return torch_ref.decode_attention(q, k_cache, v_cache, meta.decode_table, meta.decode_mask)
        out = torch.empty_like(q)
        n = meta.num_decodes
        if n:
            assert meta.decode_table is not None
            out[:n] = torch_ref.decode_attention(q[:n], k_cache, v_cache, meta.decode_table, meta.decode_mask)
        for start, qlen, ctx, block_ids in meta.prefills:
            out[start : start + qlen] = torch_ref.prefill_attention(
                q[start : start + qlen], k_cache, v_cache, block_ids, ctx
            )
        return out


@dataclass(slots=True)
class TritonMetadata:
    slot_mapping: torch.Tensor  # (num_tokens,) int64: block * block_size + row; -1 writes nothing
    block_tables: torch.Tensor  # (num_seqs, max_blocks) int32
    context_lens: torch.Tensor  # (num_seqs,) int32
    query_start: torch.Tensor  # (num_seqs,) int32
    query_lens: torch.Tensor  # (num_seqs,) int32
    num_decodes: int  # the first num_decodes sequences have one new token each
    tiles: torch.Tensor | None  # (2, num_tiles) int32: the extend kernel's work over the rest; None: no extends
    num_splits: int  # context splits of the decode kernel
    extend_splits: int = 1  # key slices per tile of the extend kernel


class TritonAttentionBackend(AttentionBackend):
    """Paged attention in Triton kernels (kernels/): the KV write with the rotary embedding, then decodes through the
    split-context decode kernel and prefill chunks through the extend kernel, all reading K/V
    in place from the paged cache. Metadata is built on the host without reading anything back
    from the device, and a CUDA graph can hold `forward` with metadata in persistent buffers
    (the extend kernel's grid is its tile table's width, padding tiles inert)."""

    def __init__(self, num_kv_heads: int, device: torch.device, dtype: torch.dtype, head_dim: int,
                 num_heads: int) -> None:
        from kernels import cache_ops, paged_attention

        self.cache_ops = cache_ops
        self.attn = paged_attention
        self.num_kv_heads = num_kv_heads
        self.num_heads = num_heads
        self.block_m = paged_attention.prefill_block_m(dtype, head_dim)
        self.extend_split_choices = paged_attention.EXTEND_SPLITS
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8

    def splits_for(self, num_decodes: int) -> int:
        return self.attn.decode_splits(num_decodes, self.num_kv_heads, self.num_sms)

    def extend_splits_for(self, num_tiles: int) -> int:
        return self.attn.prefill_splits(num_tiles, self.num_heads, self.num_sms)

    def build_metadata(self, slices: list[SeqSlice], block_size: int, device: torch.device) -> TritonMetadata:
        num_tokens = sum(s.query_len for s in slices)
        slots = np.empty(num_tokens, dtype=np.int64)
        width = max(-(-s.context_len // block_size) for s in slices)
        tables = np.zeros((len(slices), width), dtype=np.int32)
        seq = np.empty((3, len(slices)), dtype=np.int32)  # query_start, query_len, context_len
        num_decodes = 0
        for i, s in enumerate(slices):
            nblocks = -(-s.context_len // block_size)
            tables[i, :nblocks] = s.block_ids[:nblocks]
            pos = np.arange(s.context_len - s.query_len, s.context_len)
            slots[s.query_start : s.query_start + s.query_len] = tables[i, pos // block_size] * block_size + pos % block_size
            seq[:, i] = (s.query_start, s.query_len, s.context_len)
            if s.query_len == 1 and num_decodes == i:
                num_decodes += 1
        seq_t = torch.from_numpy(seq).to(device, non_blocking=True)
        tiles = None
        if num_decodes < len(slices):
            tiles = torch.from_numpy(self.attn.prefill_tiles(seq[1, num_decodes:], seq[2, num_decodes:], self.block_m))
            tiles = tiles.to(device, non_blocking=True)
        return TritonMetadata(
            slot_mapping=torch.from_numpy(slots).to(device, non_blocking=True),
            block_tables=torch.from_numpy(tables).to(device, non_blocking=True),
            context_lens=seq_t[2],
            query_start=seq_t[0],
            query_lens=seq_t[1],
            num_decodes=num_decodes,
            tiles=tiles,
            num_splits=self.splits_for(num_decodes),
            extend_splits=self.extend_splits_for(tiles.shape[1]) if tiles is not None else 1,
        )

    def forward(self, layer, q, k, v, kv_cache, meta: TritonMetadata, rope, positions) -> torch.Tensor:
        k_cache, v_cache = kv_cache.layer(layer)
        # one launch rotates q in place and writes rotated K and V into the cache
        self.cache_ops.write_kv(k_cache, v_cache, k, v, meta.slot_mapping,
                                self.cache_ops.Rope(q, positions, rope.cos, rope.sin))
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (num_tokens, num_heads, head_dim)
        n = meta.num_decodes
        if n:
            self.attn.paged_decode(
                q[:n], k_cache, v_cache, meta.block_tables[:n], meta.context_lens[:n],
                num_splits=meta.num_splits, out=out[:n],
            )
        if meta.tiles is not None:
            self.attn.paged_prefill(
                q, k_cache, v_cache, meta.block_tables[n:], meta.query_start[n:], meta.query_lens[n:],
                meta.context_lens[n:], meta.tiles, out=out, block_m=self.block_m, num_splits=meta.extend_splits,
            )
        return out
