"""transformers as the reference: greedy generation, its decision margins, teacher-forced logits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

MIN_MARGIN = 5e-3  # top-1 minus top-2 logit at every reference step: no near-tie decides a token
LOGIT_TOL = 1e-3  # max abs difference of Ember's logits from the reference's, teacher-forced


@dataclass
class Reference:
    prompt: list[int]
    tokens: list[int]
    min_margin: float
    logits: torch.Tensor  # (len(tokens), vocab_size), teacher-forced over prompt + tokens


@torch.inference_mode()
def reference(hf: Any, prompt: list[int], max_new_tokens: int) -> Reference:
    ids = torch.tensor([prompt])
    g = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    tokens = g.sequences[0, len(prompt):].tolist()
    step = torch.stack(g.logits)[:, 0].float()  # (steps, vocab_size)
    top2 = step.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    full = torch.tensor([prompt + tokens])
    tf = hf(full).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(tokens)].float()
    return Reference(prompt, tokens, margin, tf)


def assert_matches(out: Any, ref: Reference, path: str) -> None:
    """Ember's output on one path equals the reference token for token, logits within tolerance."""
    assert out.token_ids == ref.tokens, f"{path}: tokens differ\n ember {out.token_ids}\n   ref {ref.tokens}"
    ours = torch.stack(out.logits)
    diff = float((ours - ref.logits).abs().max())
    assert diff <= LOGIT_TOL, f"{path}: logits differ from transformers by {diff:.2e}"
