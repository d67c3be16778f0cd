"""Turning sampled tokens into user-facing outputs: incremental detokenization and stop strings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from runtime.request import Request


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated so far
    text: str  # generated so far
    delta_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None  # the stop token id or stop string, when one ended it
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    # Prompt tokens by source: {"gpu", "host", "redis", "recomputed"}, adding up to the prompt.
    cache: dict[str, int] = field(default_factory=dict)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    logits: list[Any] = field(default_factory=list)


def plain_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`; for
    a fast tokenizer, its Rust decoder called directly: the same text (that is all the Python
    method does with these flags) at about a third of the cost, which counts at two decodes per
    token of every running request, each step."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids: str(backend.decode(ids, skip_special_tokens=True))
    return lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


class IncrementalDetokenizer:
    """Decodes a growing token list into text deltas without re-decoding it all each step.

    Decodes a short window before the new tokens so that leading-space and multi-byte merges come
    out as the full decode would, and holds back text that ends in an incomplete character.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.decode = plain_decoder(tokenizer)
        self.ids = list(prompt_ids[-6:])
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]


@dataclass(slots=True)
class _TextState:
    detok: IncrementalDetokenizer | None
    prompt_ids: list[int]  # one copy shared by every output of the request (not to be mutated)
    text: str = ""
    sent_tokens: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _TextState] = {}

    def add(self, req: Request) -> None:
        prompt = req.token_ids[: req.num_prompt_tokens]
        detok = IncrementalDetokenizer(self.tokenizer, prompt) if self.tokenizer else None
        self._states[req.request_id] = _TextState(detok, prompt)

    def process(self, req: Request) -> tuple[RequestOutput, str | None]:
        """The output for `req` after its latest tokens, and the stop string found in them, if any
        (the caller finishes the request; the text is already cut)."""
        st = self._states[req.request_id]
        out_ids = req.output_token_ids
        new_ids = out_ids[st.sent_tokens :]
        st.sent_tokens = len(out_ids)
        delta = st.detok.push(new_ids) if st.detok else ""
        hit: str | None = None
        if delta and req.params.stop:
            start = max(0, len(st.text) - max(map(len, req.params.stop)) + 1)
            text = st.text + delta
            found = [(i, s) for s in req.params.stop if (i := text.find(s, start)) >= 0]
            if found:
                idx, hit = min(found)
                cut = idx + len(hit) if req.params.include_stop_str_in_output else idx
                delta = text[len(st.text) : cut] if cut > len(st.text) else ""
                text = text[:cut]
            st.text = text
        else:
            st.text += delta
        finished = req.status.finished or hit is not None
        out = RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=st.prompt_ids,
            token_ids=out_ids,
            text=st.text,
            delta_token_ids=new_ids,
            delta_text=delta,
            finished=finished,
            finish_reason="stop" if hit is not None else (req.status.value if req.status.finished else None),
            stop_reason=hit if hit is not None else req.stop_reason,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            cache=dict(req.cache_by_tier or {"gpu": 0, "host": 0, "redis": 0, "recomputed": req.num_prompt_tokens}),
            logprobs=req.logprobs,
            logits=req.logits,
        )
        if finished:
            del self._states[req.request_id]
        return out, hit
