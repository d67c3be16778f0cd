"""Greedy outputs are token-identical to transformers (float32, CPU) on every path the engine can
take a request through: cold, batched with others of different lengths, prefix hit, chunked
prefill, preempted and resumed. Each path is also shown to have really been taken."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import pytest

from runtime import LLM, SamplingParams
from tests.reference import MIN_MARGIN, Reference, assert_matches, reference

NEW_TOKENS = 24


def _tiny_prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(vocab) for _ in range(n)] for n in (3, 17, 40, 64, 101)]


@pytest.fixture(scope="module", params=["smollm2-135m", "tiny-llama", "tiny-qwen2"])
def case(request, smol_hf, smol_prompts, tmp_path_factory) -> tuple[Callable[..., LLM], list[Reference]]:
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny

    if request.param == "smollm2-135m":
        hf, prompts, model = smol_hf, smol_prompts, "smollm2-135m"
    else:
        kind = request.param.removeprefix("tiny-")
        model = str(make_tiny(kind, tmp_path_factory.mktemp(request.param)))
        hf = AutoModelForCausalLM.from_pretrained(model, dtype="float32").eval()
        prompts = _tiny_prompts(hf.config.vocab_size)
    refs = [reference(hf, p, NEW_TOKENS) for p in prompts]
    return (lambda **kw: LLM(model, **kw)), refs


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, output_logits=True)


def test_reference_has_no_near_ties(case) -> None:
    _, refs = case
    for r in refs:
        assert r.min_margin >= MIN_MARGIN, f"reference margin {r.min_margin:.2e} too small to judge greedy identity"


def test_cold(case) -> None:
    make, refs = case
    llm = make(enable_prefix_caching=False)
    for r in refs:
        (out,) = llm.generate([r.prompt], _params())
        assert out.num_cached_tokens == 0
        assert_matches(out, r, "cold")
    llm.engine.check_integrity()


def test_prefix_hit(case) -> None:
    make, refs = case
    llm = make()
    llm.generate([r.prompt for r in refs], _params())
    for r in refs:
        (out,) = llm.generate([r.prompt], _params())
        # Every full block but the one holding the last prompt token comes from the cache.
        assert out.num_cached_tokens == (len(r.prompt) - 1) // 16 * 16
        assert_matches(out, r, "prefix hit")
    llm.engine.check_integrity()


def test_batched_with_different_lengths(case) -> None:
    make, refs = case
    llm = make()
    outs = llm.generate([r.prompt for r in refs], _params())
    for out, r in zip(outs, refs):
        assert_matches(out, r, "batched")
    # One forward pass per generated token, all sequences together (prefills joined in step one).
    assert llm.engine.runner.num_forward_passes <= NEW_TOKENS + 1
    llm.engine.check_integrity()


def test_chunked_prefill(case) -> None:
    make, refs = case
    llm = make(max_num_batched_tokens=7)
    outs = llm.generate([r.prompt for r in refs], _params())
    for out, r in zip(outs, refs):
        assert_matches(out, r, "chunked prefill")
    longest = max(len(r.prompt) for r in refs)
    assert llm.engine.runner.num_forward_passes >= longest // 7, "prefill was not chunked"
    llm.engine.check_integrity()


def test_preempted_and_resumed(case) -> None:
    make, refs = case
    need = max(-(-(len(r.prompt) + NEW_TOKENS) // 16) for r in refs)
    llm = make(num_blocks=need + 2)
    outs = llm.generate([r.prompt for r in refs], _params())
    for out, r in zip(outs, refs):
        assert_matches(out, r, "preempted")
    assert llm.engine.scheduler.stats.num_preemptions > 0
    llm.engine.check_integrity()
