"""Sampling from logits: greedy, temperature, top-k, top-p, seeded per request, with log-probs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.sampling_params import SamplingParams


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row, when asked for


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,  # (num_rows, vocab_size) float32
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> SampleResult:
        n = logits.shape[0]
        tokens = torch.empty(n, dtype=torch.int64, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if len(greedy) == n:
            tokens = logits.argmax(dim=-1)
        elif greedy:
            idx = torch.tensor(greedy, device=logits.device)
            tokens[idx] = logits[idx].argmax(dim=-1)
        for i, p in enumerate(params):
            if not p.greedy:
                tokens[i] = self._sample_row(logits[i], p, generators[i])
        token_list = tokens.tolist()
        lps: list[dict[int, float] | None] = [None] * n
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            logp = torch.log_softmax(logits[want].float(), dim=-1)
            for j, i in enumerate(want):
                k = params[i].logprobs or 0
                entry = {token_list[i]: float(logp[j, token_list[i]])}
                if k:
                    top = torch.topk(logp[j], k)
                    entry.update(zip(top.indices.tolist(), top.values.tolist()))
                lps[i] = entry
        return SampleResult(token_ids=token_list, logprobs=lps)

    @staticmethod
    def _sample_row(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
        row = row.float() / p.temperature  # (vocab_size,)
        if p.top_k:
            kth = torch.topk(row, min(p.top_k, row.shape[0])).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=gen).item())
