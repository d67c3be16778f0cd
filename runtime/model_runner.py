"""Executes a `SchedulerOutput`: builds the step's tensors, runs the model, samples."""
from __future__ import annotations

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
        result = self.sampler(logits, [r.params for r in reqs], [r.generator for r in reqs])
        out_ = RunnerOutput(sampled={r.request_id: t for r, t in zip(reqs, result.token_ids)})
        for i, r in enumerate(reqs):
            lp = result.logprobs[i]
            if lp is not None:
                out_.logprobs[r.request_id] = lp
            if r.params.output_logits:
                out_.logits[r.request_id] = logits[i].cpu()
        return out_
