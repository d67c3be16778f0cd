"""Grammar-constrained sampling through llguidance: a matcher per request, token masks applied to
the logits before sampling, every sampled token consumed by the matcher."""
from __future__ import annotations

from typing import Any

import torch


class GrammarError(ValueError):
    pass


class GrammarMasker:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_id: int) -> None:
        import llguidance
        import llguidance.hf

        # The model's end-of-turn token ends a grammar (a converted tokenizer's own eos may differ).
        self._ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_token_id)
        self.vocab_size = vocab_size

    def matcher(self, grammar: str) -> Any:
        g = self._ll.LLMatcher.grammar_from_lark(grammar)
        problem = self._ll.LLMatcher.validate_grammar(g, self.tokenizer)
        if problem:
            raise GrammarError(f"invalid grammar: {problem}")
        return self._ll.LLMatcher(self.tokenizer, g)

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list[Any]) -> None:
        """Mask, in place, the tokens each row's matcher does not allow next."""
        import llguidance.torch as lt

        bitmask = lt.allocate_token_bitmask(len(rows), self.vocab_size)
        for i, m in enumerate(matchers):
            lt.fill_next_token_bitmask(m, bitmask, i)
        sub = logits[rows].cpu()  # (len(rows), vocab_size)
        lt.apply_token_bitmask_inplace(sub, bitmask)
        logits[rows] = sub.to(logits.device)

    @staticmethod
    def consume(matcher: Any, token: int) -> None:
        if not matcher.consume_token(token):
            raise GrammarError(f"token {token} rejected by the grammar: {matcher.get_error()}")
