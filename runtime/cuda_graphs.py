"""Decode steps replayed from CUDA graphs.

A decode step of a few sequences launches hundreds of small kernels; replaying them from a graph
removes the per-launch CPU cost, which otherwise exceeds the GPU time at small batch. One graph is
captured per batch size in `sizes`, all sharing one memory pool (only one replays at a time).
Inputs live in persistent device buffers; a step of `n` sequences fills rows [:n] from pinned host
staging buffers with one asynchronous copy each, pads to the smallest captured size >= n, replays,
and returns logits rows [:n].

Padding rows are inert: slot -1 (the KV write skips them) and a context of one token of whatever
block their stale table row names (read, never written).

Off CUDA (Triton's interpreter, in tests) nothing is captured: `run` calls the same fixed-size
forward over the same buffers directly, so the padding, staging and launch-ahead logic is the
one the GPU runs.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from runtime.attention import TritonAttentionBackend, TritonMetadata
from runtime.kv_cache import PagedKVCache
from runtime.models.llama import LlamaForCausalLM

DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass(slots=True)
class DecodeBatch:
    """Host-side inputs of one decode step, written in place by the runner (views of pinned memory)."""
    input_ids: np.ndarray  # (n,) int64
    positions: np.ndarray  # (n,) int64
    slots: np.ndarray  # (n,) int64
    context_lens: np.ndarray  # (n,) int32
    block_tables: np.ndarray  # (n, max_blocks) int32


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: PagedKVCache,
        backend: TritonAttentionBackend,
        max_batch: int,
        max_blocks: int,
        device: torch.device,
        sizes: tuple[int, ...] = DEFAULT_SIZES,
    ) -> None:
        self.model, self.kv_cache, self.backend, self.device = model, kv_cache, backend, device
        self.sizes = sorted({s for s in sizes if s < max_batch} | {max_batch})
        self.max_blocks = max_blocks
        b = self.sizes[-1]
        i64, i32 = torch.int64, torch.int32
        # ids, positions and slots in one (3, max_batch) tensor: one copy from host per step
        self._dev64 = torch.zeros(3, b, dtype=i64, device=device)
        self.input_ids, self.positions, self.slots = self._dev64[0], self._dev64[1], self._dev64[2]
        self.context_lens = torch.ones(b, dtype=i32, device=device)
        self.block_tables = torch.zeros(b, max_blocks, dtype=i32, device=device)  # (max_batch, max_blocks)
        self.query_start = torch.arange(b, dtype=i32, device=device)
        self.query_lens = torch.ones(b, dtype=i32, device=device)
        # Pinned host staging, two sets used in turn: a step's asynchronous copies may still be
        # pending when the next step is prepared (the runner launches one step ahead), and a set
        # is reused only after the step that used it has been synchronised on.
        self.use_graphs = device.type == "cuda"
        pin = self.use_graphs
        self._host64 = [torch.zeros(3, b, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._host_ctx = [torch.ones(b, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._host_tables = [torch.zeros(b, max_blocks, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._set = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # per size: (size, vocab_size), the graph's output
        self.replays = 0
        self.pool: Any = None  # the graphs' shared memory pool

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def host_batch(self, n: int) -> DecodeBatch:
        """Views of the next staging set for a step of n sequences, to be filled in, then `run`."""
        self._set ^= 1
        h = self._host64[self._set].numpy()
        k = self._set
        return DecodeBatch(h[0, :n], h[1, :n], h[2, :n], self._host_ctx[k].numpy()[:n], self._host_tables[k].numpy()[:n])

    def _meta(self, size: int) -> TritonMetadata:
        return TritonMetadata(
            slot_mapping=self.slots[:size],
            block_tables=self.block_tables[:size],
            context_lens=self.context_lens[:size],
            query_start=self.query_start[:size],
            query_lens=self.query_lens[:size],
            num_decodes=size,
            max_query_len=0,
            num_splits=self.backend.splits_for(size),
        )

    def _forward(self, size: int) -> torch.Tensor:  # (size, vocab_size)
        hidden = self.model(self.input_ids[:size], self.positions[:size], self.backend, self.kv_cache, self._meta(size))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first (its allocations size the shared pool). The inputs
        are inert during capture: slot -1 and one token of context."""
        self.slots.fill_(-1)
        self.context_lens.fill_(1)
        if not self.use_graphs:
            return
        self.pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compiles the kernels and settles the allocator outside capture
                    self._forward(size)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)

    def run(self, n: int, width: int, input_ids: torch.Tensor | None = None) -> torch.Tensor:  # (n, vocab_size)
        """Replay for the n sequences whose inputs the last `host_batch(n)` holds; `width` is the
        widest table row in use (columns beyond it are never read for these sequences).
        `input_ids`, a device tensor (n,), replaces the host's token ids (a step launched before
        the previous step's tokens reached the host)."""
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        k = self._set
        host64, host_ctx, host_tables = self._host64[k], self._host_ctx[k], self._host_tables[k]
        host64[2, n:size] = -1  # padding rows write nothing
        host_ctx[n:size] = 1
        self._dev64[:, :size].copy_(host64[:, :size], non_blocking=True)
        self.context_lens[:size].copy_(host_ctx[:size], non_blocking=True)
        self.block_tables[:n, :width].copy_(host_tables[:n, :width], non_blocking=True)
        if input_ids is not None:
            self.input_ids[:n].copy_(input_ids)
        if self.use_graphs:
            self.graphs[size].replay()
        else:
            with torch.inference_mode():
                self.logits[size] = self._forward(size)
        self.replays += 1
        return self.logits[size][:n]
