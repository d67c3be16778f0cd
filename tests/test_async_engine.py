"""The engine thread driven from asyncio: concurrent streams, aborts, errors that stay local."""
from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from runtime import LLM, SamplingParams
from runtime.async_engine import AsyncEngine


@pytest.fixture(scope="module")
def aengine(tiny_llama_dir: Path):
    eng = AsyncEngine(LLM(str(tiny_llama_dir)).engine)
    yield eng
    eng.shutdown()


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(320) for _ in range(n)]


async def _collect(eng: AsyncEngine, prompt, params, **kw):
    outs = []
    async for out in eng.generate(prompt, params, **kw):
        outs.append(out)
    return outs


async def test_concurrent_streams_match_offline_results(aengine: AsyncEngine, tiny_llama_dir: Path) -> None:
    prompts = [_prompt(n, s) for s, n in enumerate((5, 30, 70))]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    streams = await asyncio.gather(*(_collect(aengine, p, params) for p in prompts))
    offline = LLM(str(tiny_llama_dir)).generate(prompts, params)
    for outs, ref in zip(streams, offline):
        assert [t for o in outs for t in o.delta_token_ids] == ref.token_ids
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])


async def test_abort_ends_the_stream_and_others_continue(aengine: AsyncEngine) -> None:
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    other = asyncio.create_task(_collect(aengine, _prompt(8, 10), SamplingParams(max_tokens=20, ignore_eos=True)))
    seen = []
    async for out in aengine.generate(_prompt(8, 11), params, request_id="victim"):
        seen.append(out)
        if len(seen) == 3:
            aengine.abort("victim")
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    assert len(seen[-1].token_ids) < 200
    assert len((await other)[-1].token_ids) == 20


async def test_leaving_the_stream_early_aborts_the_request(aengine: AsyncEngine) -> None:
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
    async for _ in aengine.generate(_prompt(8, 12), params, request_id="left"):
        break
    for _ in range(100):
        if "left" not in aengine.engine.scheduler.requests:
            break
        await asyncio.sleep(0.01)
    assert "left" not in aengine.engine.scheduler.requests


async def test_bad_request_raises_in_the_caller_only(aengine: AsyncEngine) -> None:
    good = asyncio.create_task(_collect(aengine, _prompt(8, 13), SamplingParams(max_tokens=10, ignore_eos=True)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        await _collect(aengine, [1, 10**6], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="prompt is empty"):
        await _collect(aengine, [], SamplingParams(max_tokens=4))
    assert len((await good)[-1].token_ids) == 10
