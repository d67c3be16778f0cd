"""Steps replayed from CUDA graphs: decode steps, and mixed steps of decodes and prefill chunks.

A step of a few sequences launches hundreds of small kernels; replaying them from a graph removes
the per-launch CPU cost, which otherwise exceeds the GPU time at small batch, and, in a step that
also carries a few hundred prefill tokens, is most of the step. Graphs are captured per shape, all
sharing one memory pool (only one replays at a time):

- decode steps: one graph per batch size in `sizes`;
- mixed steps: one graph per (decode rows D, prefill rows T) in `mixed_decodes` x `mixed_tokens`,
  holding up to `max_prefills` prefill chunks. The step's rows are laid out as D decode rows (the
  first n real, the rest padding), then T prefill rows (each chunk contiguous, then padding). The
  extend kernel walks a tile table of fixed width whose unused tiles are inert.

Inputs live in persistent device buffers, filled from pinned host staging with a few asynchronous
copies per step; a step pads to the smallest captured shape that holds it. Padding rows are inert:
slot -1 (the KV write skips them), position and token 0, a decode padding row a context of one token
of whatever block its stale table row names (read, never written), no tile for prefill padding.
Every layer works row by row outside attention, so padding rows never touch real ones.

Off CUDA (Triton's interpreter, in tests) nothing is captured: replaying calls the same fixed-shape
forward over the same buffers directly, so the padding, staging and launch-ahead logic is the one
the GPU runs.
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
MIXED_DECODES = (0, 8, 16, 32, 64, 96, 128, 192, 256)
# 32-64 rows apart up to 768 (a tool's output of a few hundred tokens pads by at most ~10%),
# then about 1.25-1.5x. Padding costs its full share of the multiplies: on an H200 a step of 16
# decodes and a 320-token extend replays in 15.6 ms from a 320-row graph, and 380 tokens in a
# 384-row graph take 18.0 ms: a ~320-token return padded to 384 rows paid up to ~2 ms a step.
MIXED_TOKENS = (128, 192, 256, 320, 352, 384, 448, 512, 576, 640, 704, 768, 896, 1024, 1280, 1536, 2048,
                3072, 4096, 6144, 8192)
MAX_PREFILLS = 16
# Off CUDA (the kernels in Triton's interpreter, for tests) nothing is captured, so a shape costs
# nothing to keep while every padded row is interpreted work: finer shapes below the card's.
INTERPRETED_MIXED_DECODES = (0, 1, 2, 4) + MIXED_DECODES[1:]
INTERPRETED_MIXED_TOKENS = (8, 16, 32, 64, 96) + MIXED_TOKENS


def _buckets(candidates: tuple[int, ...], limit: int) -> list[int]:
    """The candidates under `limit`, and `limit` itself as the largest."""
    return sorted({c for c in candidates if c < limit} | {limit})


@dataclass(slots=True)
class DecodeBatch:
    """Host-side inputs of one decode step, written in place by the runner (views of pinned memory)."""
    input_ids: np.ndarray  # (n,) int64
    positions: np.ndarray  # (n,) int64
    slots: np.ndarray  # (n,) int64
    context_lens: np.ndarray  # (n,) int32
    block_tables: np.ndarray  # (n, max_blocks) int32


@dataclass(slots=True)
class MixedBatch:
    """Host-side inputs of one mixed step (views of pinned memory, padding already inert). The
    runner writes decode i at row i and prefill chunk j at rows D + offset_j ..., its sequence
    entries at index D + j; `run_mixed` then builds the tile table from those entries."""
    num_decodes: int  # bucket D
    num_tokens: int  # bucket T
    num_prefills: int  # the chunks this step holds (<= max_prefills)
    input_ids: np.ndarray  # (D + T,) int64
    positions: np.ndarray  # (D + T,) int64
    slots: np.ndarray  # (D + T,) int64
    query_start: np.ndarray  # (D + P,) int32, P = max_prefills
    query_lens: np.ndarray  # (D + P,) int32
    context_lens: np.ndarray  # (D + P,) int32
    block_tables: np.ndarray  # (D + P, max_blocks) int32
    sample_rows: np.ndarray  # (D + P,) int64: the row whose logits row i of the output holds


class StepGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: PagedKVCache,
        backend: TritonAttentionBackend,
        max_batch: int,
        max_blocks: int,
        device: torch.device,
        sizes: tuple[int, ...] = DEFAULT_SIZES,
        max_tokens: int = 0,  # prefill rows of the largest mixed step (0: decode graphs only)
        mixed_decodes: tuple[int, ...] = MIXED_DECODES,
        mixed_tokens: tuple[int, ...] = MIXED_TOKENS,
        max_prefills: int = MAX_PREFILLS,
    ) -> None:
        self.model, self.kv_cache, self.backend, self.device = model, kv_cache, backend, device
        self.sizes = _buckets(sizes, max_batch)
        self.mixed_decodes = [0] + _buckets(tuple(d for d in mixed_decodes if d > 0), max_batch) if max_tokens else []
        self.mixed_tokens = _buckets(mixed_tokens, max_tokens) if max_tokens else []
        self.max_prefills = max_prefills if max_tokens else 0
        self.max_blocks = max_blocks
        b = self.sizes[-1]
        rows = b + (self.mixed_tokens[-1] if max_tokens else 0)
        seqs = b + self.max_prefills
        self.max_tiles = -(-(self.mixed_tokens[-1] if max_tokens else 0) // backend.block_m) + self.max_prefills
        i64, i32 = torch.int64, torch.int32
        # ids, positions and slots in one (3, rows) tensor; query starts, lengths and contexts in
        # one (3, seqs) tensor: one copy from the host each per step
        self._dev64 = torch.zeros(3, rows, dtype=i64, device=device)
        self.input_ids, self.positions, self.slots = self._dev64[0], self._dev64[1], self._dev64[2]
        self._seq32 = torch.ones(3, seqs, dtype=i32, device=device)
        self.context_lens = self._seq32[2]
        self.block_tables = torch.zeros(seqs, max_blocks, dtype=i32, device=device)  # (seqs, max_blocks)
        self.tiles = torch.full((2, self.max_tiles), -1, dtype=i32, device=device)
        self.sample_rows = torch.zeros(seqs, dtype=i64, device=device)
        # a decode step's query starts and lengths (read by no kernel, but part of the metadata)
        self._decode_starts = torch.arange(b, dtype=i32, device=device)
        self._decode_lens = torch.ones(b, dtype=i32, device=device)
        # Pinned host staging, two sets used in turn: a step's asynchronous copies may still be
        # pending when the next step is prepared (the runner launches one step ahead), and a set
        # is reused only after the step that used it has been synchronised on.
        self.use_graphs = device.type == "cuda"
        pin = self.use_graphs
        self._host64 = [torch.zeros(3, rows, dtype=i64, pin_memory=pin) for _ in range(2)]
        self._host_seq = [torch.ones(3, seqs, dtype=i32, pin_memory=pin) for _ in range(2)]
        self._host_tables = [torch.zeros(seqs, max_blocks, dtype=i32, pin_memory=pin) for _ in range(2)]
        self._host_tiles = [torch.full((2, self.max_tiles), -1, dtype=i32, pin_memory=pin) for _ in range(2)]
        self._host_rows = [torch.zeros(seqs, dtype=i64, pin_memory=pin) for _ in range(2)]
        self._set = 0
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (D, T); T = 0: decode
        self.logits: dict[tuple[int, int], torch.Tensor] = {}  # per shape, the graph's output
        self.replays = 0  # decode replays
        self.mixed_replays = 0
        self.pool: Any = None  # the graphs' shared memory pool

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    @property
    def num_graphs(self) -> int:
        return len(self.sizes) + (len(self.mixed_decodes) * len(self.mixed_tokens))

    # ---- shapes ---------------------------------------------------------------------------
    def _decode_meta(self, size: int) -> TritonMetadata:
        return TritonMetadata(
            slot_mapping=self.slots[:size],
            block_tables=self.block_tables[:size],
            context_lens=self.context_lens[:size],
            query_start=self._decode_starts[:size],
            query_lens=self._decode_lens[:size],
            num_decodes=size,
            tiles=None,
            num_splits=self.backend.splits_for(size),
        )

    def _mixed_meta(self, d: int, t: int) -> TritonMetadata:
        seqs = d + self.max_prefills
        return TritonMetadata(
            slot_mapping=self.slots[: d + t],
            block_tables=self.block_tables[:seqs],
            context_lens=self._seq32[2, :seqs],
            query_start=self._seq32[0, :seqs],
            query_lens=self._seq32[1, :seqs],
            num_decodes=d,
            tiles=self.tiles[:, : self._num_tiles(t)],
            num_splits=self.backend.splits_for(d),
            # as many key slices as a full bucket of tokens calls for (the table's width holds
            # padding tiles for the chunks' ragged ends too)
            extend_splits=self.backend.extend_splits_for(-(-t // self.backend.block_m)),
        )

    def _num_tiles(self, t: int) -> int:
        return -(-t // self.backend.block_m) + self.max_prefills

    def _forward(self, d: int, t: int) -> torch.Tensor:  # (rows sampled, vocab_size)
        if t == 0:
            hidden = self.model(self.input_ids[:d], self.positions[:d], self.backend, self.kv_cache, self._decode_meta(d))
            return self.model.compute_logits(hidden)
        meta = self._mixed_meta(d, t)
        hidden = self.model(self.input_ids[: d + t], self.positions[: d + t], self.backend, self.kv_cache, meta)
        return self.model.compute_logits(hidden.index_select(0, self.sample_rows[: d + self.max_prefills]))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every shape, largest first (its allocations size the shared pool). The inputs
        are inert during capture: slot -1, one token of context, no tiles."""
        self.slots.fill_(-1)
        self.positions.zero_()
        self._seq32.fill_(1)
        self.tiles.fill_(-1)
        if not self.use_graphs:
            return
        self.pool = torch.cuda.graph_pool_handle()
        shapes = [(d, t) for t in reversed(self.mixed_tokens) for d in reversed(self.mixed_decodes)]
        shapes += [(size, 0) for size in reversed(self.sizes)]
        for shape in shapes:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2 if shape[1] == 0 else 1):  # compiles kernels, settles the allocator
                    self._forward(*shape)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[shape] = self._forward(*shape)
            self.graphs[shape] = graph
        torch.cuda.synchronize(self.device)

    def _replay(self, shape: tuple[int, int]) -> torch.Tensor:
        if self.use_graphs:
            self.graphs[shape].replay()
        else:
            with torch.inference_mode():
                self.logits[shape] = self._forward(*shape)
        return self.logits[shape]

    # ---- decode steps ---------------------------------------------------------------------
    def host_batch(self, n: int) -> DecodeBatch:
        """Views of the next staging set for a step of n sequences, to be filled in, then `run`."""
        self._set ^= 1
        h = self._host64[self._set].numpy()
        k = self._set
        return DecodeBatch(h[0, :n], h[1, :n], h[2, :n], self._host_seq[k].numpy()[2, :n], self._host_tables[k].numpy()[:n])

    def run(self, n: int, width: int, input_ids: torch.Tensor | None = None) -> torch.Tensor:  # (n, vocab_size)
        """Replay for the n sequences whose inputs the last `host_batch(n)` holds; `width` is the
        widest table row in use (columns beyond it are never read for these sequences).
        `input_ids`, a device tensor (n,), replaces the host's token ids (a step launched before
        the previous step's tokens reached the host)."""
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        k = self._set
        host64, host_ctx, host_tables = self._host64[k], self._host_seq[k][2], self._host_tables[k]
        host64[2, n:size] = -1  # padding rows write nothing
        host_ctx[n:size] = 1
        self._dev64[:, :size].copy_(host64[:, :size], non_blocking=True)
        self.context_lens[:size].copy_(host_ctx[:size], non_blocking=True)
        self.block_tables[:n, :width].copy_(host_tables[:n, :width], non_blocking=True)
        if input_ids is not None:
            self.input_ids[:n].copy_(input_ids)
        self.replays += 1
        return self._replay((size, 0))[:n]

    # ---- mixed steps ----------------------------------------------------------------------
    def mixed_batch(self, num_decodes: int, prefill_lens: list[int]) -> MixedBatch | None:
        """Views of the next staging set for a step of `num_decodes` decodes and prefill chunks of
        `prefill_lens` tokens, padding set; None when no captured shape holds it."""
        tokens = sum(prefill_lens)
        if not self.mixed_tokens or len(prefill_lens) > self.max_prefills or tokens > self.mixed_tokens[-1] \
                or num_decodes > self.mixed_decodes[-1]:
            return None
        d = self.mixed_decodes[bisect.bisect_left(self.mixed_decodes, num_decodes)]
        t = self.mixed_tokens[bisect.bisect_left(self.mixed_tokens, tokens)]
        self._set ^= 1
        k = self._set
        h64, hseq = self._host64[k].numpy(), self._host_seq[k].numpy()
        rows, seqs = d + t, d + self.max_prefills
        pad = np.array([[0], [0], [-1]])  # token, position, slot
        h64[:, num_decodes:d] = pad  # decode padding
        h64[:, d + tokens : rows] = pad  # prefill padding
        hseq[2, num_decodes:d] = 1
        hrows = self._host_rows[k].numpy()
        hrows[:seqs] = 0
        hrows[:num_decodes] = np.arange(num_decodes)
        return MixedBatch(d, t, len(prefill_lens), h64[0, :rows], h64[1, :rows], h64[2, :rows],
                          hseq[0, :seqs], hseq[1, :seqs], hseq[2, :seqs], self._host_tables[k].numpy()[:seqs],
                          hrows[:seqs])

    def run_mixed(self, batch: MixedBatch, width: int) -> torch.Tensor:  # (D + max_prefills, vocab_size)
        """Replay the step the last `mixed_batch` holds, once the runner has filled it in; row i
        of the result is the logits of row `batch.sample_rows[i]`. `width`: the widest table row."""
        d, t, p = batch.num_decodes, batch.num_tokens, batch.num_prefills
        k = self._set
        tiles = self._host_tiles[k].numpy()
        self.backend.attn.prefill_tiles(batch.query_lens[d : d + p], batch.context_lens[d : d + p],
                                        self.backend.block_m, out=tiles[:, : self._num_tiles(t)])
        rows, seqs = d + t, d + self.max_prefills
        self._dev64[:, :rows].copy_(self._host64[k][:, :rows], non_blocking=True)
        self._seq32[:, :seqs].copy_(self._host_seq[k][:, :seqs], non_blocking=True)
        self.block_tables[:seqs, :width].copy_(self._host_tables[k][:seqs, :width], non_blocking=True)
        self.tiles[:, : self._num_tiles(t)].copy_(self._host_tiles[k][:, : self._num_tiles(t)], non_blocking=True)
        self.sample_rows[:seqs].copy_(self._host_rows[k][:seqs], non_blocking=True)
        self.mixed_replays += 1
        return self._replay((d, t))
