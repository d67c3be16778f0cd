"""Executes a `SchedulerOutput`: builds the step's tensors, runs the model, samples."""
from __future__ import annotations

import time
from typing import Any

import torch

from runtime.attention import AttentionBackend, SeqSlice
from runtime.kv_cache import PagedKVCache
from runtime.models.llama import LlamaForCausalLM
from runtime.scheduler import RunnerOutput, SchedulerOutput
from runtime.sampler import Sampler


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
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        if not out.chunks:
            return RunnerOutput(sampled={})
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

        sampling = [(c, s) for c, s in zip(out.chunks, slices) if c.samples]
        if not sampling:
            return RunnerOutput(sampled={})
        rows = torch.tensor([s.query_start + s.query_len - 1 for _, s in sampling], device=self.device)
        logits = self.model.compute_logits(hidden[rows]).float()  # (num_sampled, vocab_size)
        reqs = [c.request for c, _ in sampling]
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
