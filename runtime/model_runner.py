"""Executes a `SchedulerOutput`: builds the step's tensors, runs the model, samples."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

import torch

from runtime.attention import AttentionBackend, SeqSlice
from runtime.cuda_graphs import DecodeBatch, MixedBatch, StepGraphs
from runtime.kv_cache import PagedKVCache
from runtime.models.llama import LlamaForCausalLM
from runtime.request import Request
from runtime.scheduler import RunnerOutput, ScheduledChunk, SchedulerOutput
from runtime.sampler import Sampler


def _plain_greedy(req: Request) -> bool:
    """Sampled by argmax alone on the device: no host-side sampling state is involved."""
    p = req.params
    return p.greedy and p.logprobs is None and not p.output_logits and p.grammar is None


@dataclass(slots=True)
class _Launched:
    """A graph decode step on its way through the GPU, or a mixed step's sampled tokens (no
    `batch`): what a step launched after it is fed from."""
    key: tuple[tuple[str, int], ...]  # (request id, position) of each row
    logits: torch.Tensor  # (n, vocab_size): the graph's output buffer, valid until the next replay
    tokens: torch.Tensor | None  # (n,) the argmax on the device, when every row is plain greedy
    batch: DecodeBatch | None  # the host inputs it was launched from (None: a mixed step's)
    width: int  # block-table columns in use
    host_tokens: torch.Tensor | None = None  # (n,) pinned: the tokens' copy, queued right behind them
    ready: Any = None  # a CUDA event recorded after that copy

    def __post_init__(self) -> None:
        # The copy to the host is queued before any step launched after this one, so reading the
        # tokens waits for this step only (a plain .tolist() would queue behind the next step).
        if self.tokens is not None and self.tokens.is_cuda:
            self.host_tokens = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            self.host_tokens.copy_(self.tokens, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def read_tokens(self) -> list[int]:
        assert self.tokens is not None
        if self.ready is None:
            return self.tokens.tolist()
        self.ready.synchronize()
        assert self.host_tokens is not None
        return self.host_tokens.tolist()


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: PagedKVCache, backend: AttentionBackend, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.device = device
        self.sampler = Sampler()
        self.num_forward_passes = 0
        self.grammar: Any = None  # a GrammarMasker, made on first use (needs the tokenizer)
        self.grammar_factory: Any = None
        self.graphs: StepGraphs | None = None  # set by the engine for the Triton backend unless eager
        # (request, num_tokens) -> its block ids after growing its table to hold num_tokens, or
        # None when the pool cannot; set by the engine to let decode steps be launched ahead
        self.reserve: Callable[[Request, int], list[int] | None] | None = None
        self._spec: _Launched | None = None
        self.spec_hits = 0  # steps launched ahead and used
        self.spec_misses = 0  # steps launched ahead and dropped

    @property
    def launched_ahead(self) -> bool:
        """Whether a decode step is in flight already (the scheduler should ask for exactly it)."""
        return self._spec is not None

    @property
    def launched_ids(self) -> frozenset[str]:
        """The requests of the decode step in flight (empty when none)."""
        return frozenset(r for r, _ in self._spec.key) if self._spec is not None else frozenset()

    def drop_launched(self) -> None:
        """Forget a step launched ahead (its requests are gone)."""
        if self._spec is not None:
            self._spec = None
            self.spec_misses += 1

    @torch.inference_mode()
    def profile_prefill(self, num_tokens: int) -> float:
        """Prefill tokens/s of one forward over `num_tokens` random tokens, written into the
        first blocks of the cache (call before any request holds them)."""
        bs = self.kv_cache.block_size
        num_tokens = max(1, min(num_tokens, self.kv_cache.num_blocks * bs))
        ids = torch.randint(0, self.model.cfg.vocab_size, (num_tokens,), device=self.device)
        pos = torch.arange(num_tokens, device=self.device)
        blocks = list(range(-(-num_tokens // bs)))
        meta = self.backend.build_metadata([SeqSlice(0, num_tokens, num_tokens, blocks)], bs, self.device)
        self.model(ids[:1], pos[:1], self.backend, self.kv_cache,
                   self.backend.build_metadata([SeqSlice(0, 1, 1, blocks)], bs, self.device))  # warm-up
        t0 = time.perf_counter()
        self.model(ids, pos, self.backend, self.kv_cache, meta)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return num_tokens / (time.perf_counter() - t0)

    @torch.inference_mode()
    def warmup(self, max_num_seqs: int) -> int:
        """Run the eager path once for each kernel variant a step can meet, so that kernels
        compile here and not inside a request's step: a mixed step of b decodes and a short
        prefill chunk for every b at which the backend's decode split count changes, with block
        tables of a narrow and a wide width (Triton specialises on an argument's divisibility by
        16), the chunk's keys in each slice count the backend picks from.
        Writes only into the cache's first four blocks: call before any request holds them.
        Returns the forwards run (0 for a backend without variants, or a cache under 4 blocks)."""
        splits_for = getattr(self.backend, "splits_for", None)
        extend_choices = getattr(self.backend, "extend_split_choices", (1,))
        bs = self.kv_cache.block_size
        if splits_for is None or self.kv_cache.num_blocks < 4:
            return 0
        sizes = [b for b in range(1, max_num_seqs + 1) if b == 1 or splits_for(b) != splits_for(b - 1)]
        chunk = 2 * bs
        max_positions = self.model.rope.cos.shape[0]
        runs = 0
        for width in [w for w in (2, 16) if w * bs <= max_positions]:
            for b in sizes:
                # b decodes of one token after bs cached ones (all over blocks 0-1: their writes
                # land in block 1), then a prefill chunk that fills blocks 2-3 at the table's end.
                slices = [SeqSlice(i, 1, bs + 1, [0, 1]) for i in range(b)]
                slices.append(SeqSlice(b, chunk, width * bs, [2] * (width - 2) + [2, 3]))
                ids = torch.zeros(b + chunk, dtype=torch.int64, device=self.device)
                pos = torch.tensor([bs] * b + list(range((width - 2) * bs, width * bs)), device=self.device)
                meta = self.backend.build_metadata(slices, bs, self.device)
                for extend_splits in extend_choices if b == 1 else (meta.extend_splits,):
                    hidden = self.model(ids, pos, self.backend, self.kv_cache,
                                        replace(meta, extend_splits=extend_splits))  # (b + chunk, hidden)
                    self.model.compute_logits(hidden[-1:]).float().argmax(dim=-1)
                    runs += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return runs

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, launch_ahead: bool = True) -> RunnerOutput:
        """Run one step. With `launch_ahead`, a greedy decode step may launch the same
        sequences' next decode step before returning (the scheduler should then ask for it)."""
        if not out.chunks:
            return RunnerOutput(sampled={})
        if self.graphs is not None:
            # decodes come first: a step's decodes are its chunks up to the first longer one
            nd = next((i for i, c in enumerate(out.chunks) if c.num_tokens != 1), len(out.chunks))
            if nd == len(out.chunks) and nd <= self.graphs.max_batch:
                return self._execute_graphed(out.chunks, launch_ahead)
            batch = self.graphs.mixed_batch(nd, [c.num_tokens for c in out.chunks[nd:]])
            if batch is not None:
                return self._execute_mixed(out.chunks, nd, batch, launch_ahead)

        ids: list[int] = []
        positions: list[int] = []
        slices: list[SeqSlice] = []
        for c in out.chunks:
            slices.append(SeqSlice(len(ids), c.num_tokens, c.start + c.num_tokens, c.block_ids))
            ids.extend(c.request.token_ids[c.start : c.start + c.num_tokens])
            positions.extend(range(c.start, c.start + c.num_tokens))
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)  # (num_tokens,)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)  # (num_tokens,)
        meta = self.backend.build_metadata(slices, self.kv_cache.block_size, self.device)
        hidden = self.model(input_ids, pos, self.backend, self.kv_cache, meta)  # (num_tokens, hidden)
        self.num_forward_passes += 1

        sampled = [(c, s) for c, s in zip(out.chunks, slices) if c.samples]
        if not sampled:
            return RunnerOutput(sampled={})
        rows = torch.tensor([s.query_start + s.query_len - 1 for _, s in sampled], device=self.device)
        logits = self.model.compute_logits(hidden[rows]).float()  # (num_sampled, vocab_size)
        return self._sample(logits, [c.request for c, _ in sampled])

    def _execute_graphed(self, chunks: list[ScheduledChunk], launch_ahead: bool) -> RunnerOutput:
        """One new token per sequence through the captured graphs. A greedy step also launches
        the step after it before reading its own tokens back (see `_speculate`), so the GPU
        runs that step while the host applies this one's results and schedules the next."""
        key = tuple((c.request.request_id, c.start) for c in chunks)
        spec, self._spec = self._spec, None
        if spec is not None and (spec.key == key or sorted(spec.key) == sorted(key)):
            # The same rows, perhaps in another order (a step launched after a mixed step has
            # its prefill rows last): the launched order is the one its rows were filled in.
            if spec.key != key:
                by_id = {c.request.request_id: c for c in chunks}
                chunks = [by_id[rid] for rid, _ in spec.key]
            launched = spec
            self.spec_hits += 1
        else:
            self.spec_misses += spec is not None
            launched = self._launch(chunks, key)
        if launched.tokens is None:
            sampling = [i for i, c in enumerate(chunks) if c.samples]
            if not sampling:
                return RunnerOutput(sampled={})
            rows = launched.logits if len(sampling) == len(chunks) else launched.logits[sampling]
            return self._sample(rows.float(), [chunks[i].request for i in sampling])
        if launch_ahead and self._may_launch_after(chunks):
            self._spec = self._speculate(launched, chunks)
        tokens = launched.read_tokens()  # the step's one synchronisation
        return RunnerOutput(sampled={c.request.request_id: t for c, t in zip(chunks, tokens)})

    def _may_launch_after(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether the decode step after this one may be launched before this one's tokens reach
        the host: every row samples, and none reaches its token limit with this step's token."""
        return self.reserve is not None and all(
            c.samples and c.request.num_output_tokens + 1 < c.request.params.max_tokens
            and c.request.num_tokens + 1 < c.request.max_total_tokens
            for c in chunks
        )

    def _fill_decodes(self, batch: DecodeBatch | MixedBatch, chunks: list[ScheduledChunk]) -> int:
        """Write decode chunk i into row i of a graph step's host inputs; returns the widest
        block-table row written."""
        bs = self.kv_cache.block_size
        width = 0
        for i, c in enumerate(chunks):
            pos = c.start
            nblocks = pos // bs + 1
            batch.input_ids[i] = c.request.token_ids[pos]
            batch.positions[i] = pos
            batch.slots[i] = c.block_ids[pos // bs] * bs + pos % bs
            batch.context_lens[i] = pos + 1
            batch.block_tables[i, :nblocks] = c.block_ids[:nblocks]
            width = max(width, nblocks)
        return width

    def _execute_mixed(self, chunks: list[ScheduledChunk], nd: int, batch: MixedBatch, launch_ahead: bool) -> RunnerOutput:
        """Decodes and prefill chunks in one replay of a mixed-step graph (see StepGraphs). With
        `launch_ahead`, a greedy step whose every chunk samples (decodes, and prompts it
        completes) also launches the decode step of the same sequences after it (`_speculate`)."""
        assert self.graphs is not None
        bs = self.kv_cache.block_size
        d = batch.num_decodes
        width = self._fill_decodes(batch, chunks[:nd])
        row = d
        for j, c in enumerate(chunks[nd:]):
            n, end = c.num_tokens, c.start + c.num_tokens
            nblocks = -(-end // bs)
            table = np.asarray(c.block_ids[:nblocks], dtype=np.int64)
            at = np.arange(c.start, end)
            batch.input_ids[row : row + n] = c.request.token_ids[c.start : end]
            batch.positions[row : row + n] = at
            batch.slots[row : row + n] = table[at // bs] * bs + at % bs
            batch.query_start[d + j], batch.query_lens[d + j], batch.context_lens[d + j] = row, n, end
            batch.block_tables[d + j, :nblocks] = table
            batch.sample_rows[d + j] = row + n - 1
            width = max(width, nblocks)
            row += n
        self.num_forward_passes += 1
        logits = self.graphs.run_mixed(batch, width)  # (D + max_prefills, vocab_size)
        sampling = [(i if i < nd else d + i - nd) for i, c in enumerate(chunks) if c.samples]
        if not sampling:
            return RunnerOutput(sampled={})
        reqs = [c.request for c in chunks if c.samples]
        rows = torch.tensor(sampling, device=self.device)
        if not all(_plain_greedy(r) for r in reqs):
            return self._sample(logits.index_select(0, rows).float(), reqs)
        picked = logits.index_select(0, rows)  # (sampled, vocab_size)
        # (the argmax and its copy to the host are queued before any step launched after this one)
        done = _Launched(tuple((c.request.request_id, c.start) for c in chunks), picked,
                         picked.argmax(dim=-1), None, 0)
        if launch_ahead and self._may_launch_after(chunks):
            self._spec = self._speculate(done, chunks)
        return RunnerOutput(sampled={r.request_id: t for r, t in zip(reqs, done.read_tokens())})

    def _launch(self, chunks: list[ScheduledChunk], key: tuple[tuple[str, int], ...]) -> _Launched:
        assert self.graphs is not None
        n = len(chunks)
        batch = self.graphs.host_batch(n)
        width = self._fill_decodes(batch, chunks)
        self.num_forward_passes += 1
        logits = self.graphs.run(n, width)
        greedy = all(c.samples and _plain_greedy(c.request) for c in chunks)
        return _Launched(key, logits, logits.argmax(dim=-1) if greedy else None, batch, width)

    def _speculate(self, prev: _Launched, chunks: list[ScheduledChunk]) -> _Launched | None:
        """Launch the next decode step of the same sequences, fed by `prev`'s tokens on the
        device. It is used only if the scheduler asks for exactly that step (same sequences,
        next positions); otherwise it is dropped. Dropping is safe: it wrote only the KV of
        each sequence's next position (the token `prev` sampled), which any later step
        rewrites identically or, for a finished sequence, never reads. After a mixed step
        (`prev.batch` None) each row's inputs are built from its chunk."""
        assert self.graphs is not None and self.reserve is not None and prev.tokens is not None
        bs = self.kv_cache.block_size
        n = len(chunks)
        last = prev.batch
        if last is None:
            return self._speculate_after_mixed(prev, chunks)
        batch = self.graphs.host_batch(n)
        np.add(last.positions, 1, out=batch.positions)
        np.add(last.context_lens, 1, out=batch.context_lens)
        np.add(last.slots, 1, out=batch.slots)
        width = prev.width
        batch.block_tables[:, :width] = last.block_tables[:, :width]
        for i in np.flatnonzero(batch.positions % bs == 0).tolist():
            pos = int(batch.positions[i])
            ids = self.reserve(chunks[i].request, pos + 1)  # the next position opens a block
            if ids is None:
                return None
            batch.slots[i] = ids[pos // bs] * bs
            batch.block_tables[i, pos // bs] = ids[pos // bs]
            width = max(width, pos // bs + 1)
        self.num_forward_passes += 1
        logits = self.graphs.run(n, width, input_ids=prev.tokens)
        key = tuple((rid, pos + 1) for rid, pos in prev.key)
        return _Launched(key, logits, logits.argmax(dim=-1), batch, width)

    def _speculate_after_mixed(self, prev: _Launched, chunks: list[ScheduledChunk]) -> _Launched | None:
        assert self.graphs is not None and self.reserve is not None
        if len(chunks) > self.graphs.max_batch:
            return None
        bs = self.kv_cache.block_size
        batch = self.graphs.host_batch(len(chunks))
        width = 0
        for i, c in enumerate(chunks):
            pos = c.start + c.num_tokens  # where the token this step sampled goes
            ids = c.block_ids if pos // bs < len(c.block_ids) else self.reserve(c.request, pos + 1)
            if ids is None:
                return None
            nblocks = pos // bs + 1
            batch.positions[i], batch.context_lens[i] = pos, pos + 1
            batch.slots[i] = ids[pos // bs] * bs + pos % bs
            batch.block_tables[i, :nblocks] = ids[:nblocks]
            width = max(width, nblocks)
        self.num_forward_passes += 1
        logits = self.graphs.run(len(chunks), width, input_ids=prev.tokens)
        key = tuple((c.request.request_id, c.start + c.num_tokens) for c in chunks)
        return _Launched(key, logits, logits.argmax(dim=-1), batch, width)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> RunnerOutput:
        for r in reqs:
            if r.params.seed is not None and r.generator is None:
                r.generator = torch.Generator(device=self.device).manual_seed(r.params.seed)
        constrained = [i for i, r in enumerate(reqs) if r.params.grammar is not None]
        if constrained:
            if self.grammar is None:
                self.grammar = self.grammar_factory()
            for i in constrained:
                if reqs[i].matcher is None:
                    reqs[i].matcher = self.grammar.matcher(reqs[i].params.grammar)
            self.grammar.apply(logits, constrained, [reqs[i].matcher for i in constrained])
        result = self.sampler(logits, [r.params for r in reqs], [r.generator for r in reqs])
        for i in constrained:
            self.grammar.consume(reqs[i].matcher, result.token_ids[i])
        out_ = RunnerOutput(sampled={r.request_id: t for r, t in zip(reqs, result.token_ids)})
        for i, r in enumerate(reqs):
            lp = result.logprobs[i]
            if lp is not None:
                out_.logprobs[r.request_id] = lp
            if r.params.output_logits:
                out_.logits[r.request_id] = logits[i].cpu()
        return out_
