"""The Triton attention backend and fused layer ops inside the engine.

On CPU they run through Triton's interpreter on the tiny models: the same greedy tokens as
transformers on the cold, batched, prefix-hit, chunked and preempted paths. On CUDA: the engine's
own path (bf16 graphs aside), the embedded SmolLM2 in float32 with TF32 off against transformers
on the same GPU, with decode and mixed steps replayed from CUDA graphs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.llm import LLM
from runtime.sampling_params import SamplingParams
from tests.reference import reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def tiny_refs(tiny_llama_dir: Path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompts = [[(7 * i + 3 * j) % 300 + 5 for j in range(n)] for i, n in enumerate([5, 23, 40, 17])]
    return prompts, [reference(hf, p, 12).tokens for p in prompts]


def test_tiny_model_matches_transformers_on_every_path(tiny_llama_dir: Path, tiny_refs) -> None:
    prompts, refs = tiny_refs
    # few blocks force preemption; a small token budget forces chunked prefill
    llm = LLM(str(tiny_llama_dir), device=DEVICE, dtype="float32", attention_backend="triton",
              block_size=4, num_blocks=22, max_num_batched_tokens=16, max_num_seqs=4)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, greedy)  # batched, chunked, ragged
    assert [o.token_ids for o in outs] == refs
    llm.engine.check_integrity()
    again = llm.generate(prompts[1], greedy)[0]  # a prefix hit: cached blocks, then an extend
    assert again.token_ids == refs[1] and again.num_cached_tokens > 0
    stats = llm.engine.scheduler.stats
    assert stats.num_preemptions > 0, "the small pool should have preempted a sequence"
    llm.engine.check_integrity()
    runner = llm.engine.runner
    assert runner.graphs is not None and runner.graphs.replays > 0
    assert runner.graphs.mixed_replays > 0  # prefill chunks with decodes, through the mixed graphs
    assert runner.spec_hits > 0  # decode steps launched ahead were used


def test_kernel_warmup_leaves_the_engine_exact(tiny_llama_dir: Path, tiny_refs) -> None:
    """The start-up pass over the kernel variants (run by the engine on CUDA) writes only into
    free blocks: requests afterwards still get transformers' tokens."""
    prompts, refs = tiny_refs
    llm = LLM(str(tiny_llama_dir), device=DEVICE, dtype="float32", attention_backend="triton",
              block_size=4, num_blocks=64, max_num_seqs=4, enforce_eager=True)
    engine = llm.engine
    splits = [engine.runner.backend.splits_for(b) for b in range(1, 3)]  # type: ignore[attr-defined]
    changes = 1 + sum(a != b for a, b in zip(splits, splits[1:]))
    # two table widths per split count, and at one decode the extend's keys in each slice count it picks from
    assert engine.runner.warmup(2) == 2 * (changes + 1)
    if not CUDA:
        assert changes == 2  # (CPU: 8 "SMs", so one and two decodes split differently)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(prompts, greedy)] == refs
    engine.check_integrity()


def test_launched_ahead_steps_with_eos_stops_and_arrivals(tiny_llama_dir: Path, tiny_refs) -> None:
    """Sequences stopping on a token mid-run (so a step launched ahead is dropped), arrivals
    joining a running batch (after the step launched ahead, which is used), and eager mode agree
    token for token."""
    prompts, refs = tiny_refs
    outs = {}
    for eager in (False, True):
        llm = LLM(str(tiny_llama_dir), device=DEVICE, dtype="float32", attention_backend="triton",
                  block_size=4, num_blocks=64, max_num_seqs=4, enforce_eager=eager)
        engine = llm.engine
        stop_tok = refs[0][5]  # the first prompt stops early on this token
        res = {}
        engine.add_request(prompts[0], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_tok]), "a")
        engine.add_request(prompts[1], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), "b")
        steps = 0
        while engine.has_unfinished:
            for o in engine.step():
                if o.finished:
                    res[o.request_id] = o.token_ids
            steps += 1
            if steps == 9 and not eager:  # "c" joined the step after the one launched ahead
                assert (engine.runner.spec_hits, engine.runner.spec_misses) == (hits + 1, misses)
                assert engine.scheduler.requests["c"].num_computed_tokens == 0
            if steps == 8:  # after "a" stopped
                assert eager or engine.runner.launched_ahead
                hits, misses = engine.runner.spec_hits, engine.runner.spec_misses
                engine.add_request(prompts[2], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), "c")
        engine.check_integrity()
        outs[eager] = res
        if not eager:  # steps launched ahead were used, and dropped when "a" stopped or "c" came
            assert engine.runner.spec_hits > 0 and engine.runner.spec_misses > 0
    assert outs[False] == outs[True]
    assert outs[False]["a"] == refs[0][: refs[0].index(refs[0][5]) + 1]
    assert outs[False]["b"] == refs[1] and outs[False]["c"] == refs[2]


def test_a_launched_step_is_dropped_when_its_requests_end(tiny_llama_dir: Path, tiny_refs) -> None:
    """The only running request stops on a token, or is aborted, while the step after it is
    launched ahead: that step is dropped, and a request arriving next is served (it used to wait
    forever behind a decodes-only step with nothing to decode)."""
    prompts, refs = tiny_refs
    llm = LLM(str(tiny_llama_dir), device=DEVICE, dtype="float32", attention_backend="triton",
              block_size=4, num_blocks=64, max_num_seqs=4)
    engine = llm.engine
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def serve(prompt: list[int], params: SamplingParams, rid: str, steps: int = 40) -> list[int] | None:
        engine.add_request(prompt, params, rid)
        for _ in range(steps):  # bounded: a stuck engine fails here instead of hanging
            for o in engine.step():
                if o.finished:
                    return o.token_ids
        return None

    stop = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[refs[0][5]])
    assert serve(prompts[0], stop, "stops") == refs[0][: refs[0].index(refs[0][5]) + 1]
    assert engine.runner.launched_ahead  # the step after the stop, in flight
    misses = engine.runner.spec_misses
    assert serve(prompts[1], greedy, "next") == refs[1]
    assert engine.runner.spec_misses == misses + 1  # dropped, not waited on
    engine.add_request(prompts[2], greedy, "gone")
    for _ in range(4):
        engine.step()
    assert engine.runner.launched_ahead
    engine.abort("gone")  # a client that went away mid-stream
    assert serve(prompts[3], greedy, "after") == refs[3]
    assert engine.runner.spec_misses == misses + 2
    engine.check_integrity()


def test_restores_from_host_match_transformers(tiny_llama_dir: Path, tiny_refs) -> None:
    """Blocks offloaded to host as they are computed, evicted from the device, and copied back
    (on CUDA: on the copy stream, each request joining the batch once its copies land) while the
    other requests keep decoding."""
    prompts, refs = tiny_refs
    long = [p * 2 for p in prompts[1:]]  # several full blocks each
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    long_refs = [reference(hf, p, 12).tokens for p in long]
    llm = LLM(str(tiny_llama_dir), device=DEVICE, dtype="float32", attention_backend="triton",
              block_size=4, num_blocks=36, max_num_seqs=4, host_offload="compute")
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(long, greedy)] == long_refs
    llm.generate([[(5 * j) % 300 + 1 for j in range(130)]], SamplingParams(max_tokens=1))  # evicts them
    engine = llm.engine
    engine.add_request(long[0], greedy, "first")  # decoding while the others are restored
    engine.step()
    outs = {}
    for i, p in enumerate(long[1:], 1):
        engine.add_request(p, greedy, f"r{i}")
    while engine.has_unfinished:
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    assert [outs[k].token_ids for k in ("first", "r1", "r2")] == long_refs
    assert sum(o.cache["host"] for o in outs.values()) > 0
    mover = engine.mover
    assert mover is not None and mover.stats.offloaded_to_host > 0 and mover.stats.loaded_bytes["host"] > 0  # type: ignore[index]
    engine.check_integrity()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_smollm2_float32_on_gpu_matches_transformers(smol_dir: Path, smol_prompts) -> None:
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).to("cuda").eval()
    refs = []
    for p in smol_prompts:
        ids = torch.tensor([p], device="cuda")
        g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        refs.append(g[0, len(p):].tolist())
    del hf
    llm = LLM("smollm2-135m", device="cuda", dtype="float32", max_num_seqs=8, kv_cache_gib=2.0)
    greedy = SamplingParams(max_tokens=32, temperature=0)  # stops at eos, as generate does
    for p, ref in zip(smol_prompts, refs):  # one at a time: batch-1 graphs
        assert llm.generate(p, greedy)[0].token_ids == ref
    outs = llm.generate(smol_prompts, greedy)  # all together: batched graphs
    assert [o.token_ids for o in outs] == refs
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.replays >= 32 * 2 - len(smol_prompts)
    assert graphs.mixed_replays > 0
    llm.engine.check_integrity()


def test_triton_backend_off_cuda_needs_the_interpreter(tiny_llama_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA, or TRITON_INTERPRET=1"):
        LLM(str(tiny_llama_dir), device="cpu", attention_backend="triton")
