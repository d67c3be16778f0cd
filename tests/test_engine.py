"""Engine behaviour: batching really batches, prefix hits really skip work, bad input is refused
with a clear error while other requests keep running, sampling settings do what they say."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from runtime import LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def smol() -> LLM:
    return LLM("smollm2-135m")


def _rand_prompt(n: int, seed: int, vocab: int = 320) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def test_eight_concurrent_requests_share_forward_passes(smol: LLM) -> None:
    before = smol.engine.runner.num_forward_passes
    prompts = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(8)]
    outs = smol.chat(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert all(len(o.token_ids) == 32 for o in outs)
    passes = smol.engine.runner.num_forward_passes - before
    assert passes <= 40, f"{passes} forward passes for 8 x 32 tokens: requests were not batched"
    smol.engine.check_integrity()


def test_shared_prefix_computes_only_the_suffix(tiny: LLM) -> None:
    prefix = _rand_prompt(1000, seed=1)
    first = prefix + _rand_prompt(20, seed=2)
    second = prefix + _rand_prompt(37, seed=3)
    stats = tiny.engine.scheduler.stats
    tiny.generate([first], SamplingParams(max_tokens=4, temperature=0))
    before = stats.num_computed_prompt_tokens
    (out,) = tiny.generate([second], SamplingParams(max_tokens=4, temperature=0))
    computed = stats.num_computed_prompt_tokens - before
    assert computed <= 37 + 16, f"computed {computed} prompt tokens for a 37-token suffix"
    assert out.num_cached_tokens >= 1000 - 16
    tiny.engine.check_integrity()


def test_generated_tokens_are_cached_for_the_next_turn(tiny: LLM) -> None:
    prompt = _rand_prompt(40, seed=4)
    (first,) = tiny.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    turn2 = prompt + first.token_ids + _rand_prompt(5, seed=5)
    (second,) = tiny.generate([turn2], SamplingParams(max_tokens=2, temperature=0))
    # The first turn's prompt and its output (but the last, never-computed token) are reusable.
    assert second.num_cached_tokens == (len(prompt) + len(first.token_ids) - 1) // 16 * 16


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(max_tokens=4), "prompt is empty"),
        ([1] * 5000, SamplingParams(max_tokens=4), "context is 2048"),
        ([1, 2, 999999], SamplingParams(max_tokens=4), "token id 999999 at position 2 is outside the vocabulary"),
        ([1, -3], SamplingParams(max_tokens=4), "token id -3 at position 1"),
    ],
)
def test_bad_input_is_refused_and_others_keep_running(tiny: LLM, prompt, params, message) -> None:
    engine = tiny.engine
    good = engine.add_request(_rand_prompt(10, seed=6), SamplingParams(max_tokens=8, temperature=0))
    engine.step()
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params)
    finished = []
    while engine.has_unfinished:
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == [good.request_id]
    assert len(finished[0].token_ids) == 8
    engine.check_integrity()


def test_bad_sampling_params_and_model_paths() -> None:
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="unknown model '/no/such/model'"):
        LLM("/no/such/model")
    with pytest.raises(ValueError, match="no such GGUF file"):
        LLM("/no/such/model.gguf")


def test_text_prompt_needs_a_tokenizer(tiny: LLM) -> None:
    with pytest.raises(ValueError, match="no tokenizer"):
        tiny.generate("hello")


def test_request_that_cannot_fit_the_cache_is_refused(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), num_blocks=4)
    with pytest.raises(ValueError, match="KV cache holds 4 blocks"):
        llm.generate([_rand_prompt(60, seed=7)], SamplingParams(max_tokens=10))


def test_generation_stops_at_the_context_limit(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), max_model_len=64)
    (out,) = llm.generate([_rand_prompt(60, seed=8)], SamplingParams(max_tokens=50, ignore_eos=True))
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny: LLM) -> None:
    p = _rand_prompt(12, seed=9)
    runs = [tiny.generate([p], SamplingParams(max_tokens=16, temperature=1.0, seed=s))[0].token_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    # Batched with others, the seeded request draws the same tokens.
    outs = tiny.generate([_rand_prompt(30, seed=10), p], [SamplingParams(max_tokens=16, temperature=1.0, seed=5),
                                                          SamplingParams(max_tokens=16, temperature=1.0, seed=1)])
    assert outs[1].token_ids == runs[0]


def test_top_k_one_is_greedy_and_top_p_keeps_the_head(tiny: LLM) -> None:
    p = _rand_prompt(12, seed=11)
    greedy = tiny.generate([p], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    topk1 = tiny.generate([p], SamplingParams(max_tokens=12, temperature=5.0, top_k=1, seed=3))[0].token_ids
    tiny_p = tiny.generate([p], SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=3))[0].token_ids
    assert greedy == topk1 == tiny_p


def test_top_k_samples_only_among_the_k_best(tiny: LLM) -> None:
    p = _rand_prompt(12, seed=12)
    out = tiny.generate([p], SamplingParams(max_tokens=10, temperature=2.0, top_k=3, seed=4, output_logits=True))[0]
    for tok, logits in zip(out.token_ids, out.logits):
        assert tok in torch.topk(logits, 3).indices.tolist()


def test_logprobs(tiny: LLM) -> None:
    out = tiny.generate([_rand_prompt(12, seed=13)], SamplingParams(max_tokens=5, temperature=0, logprobs=3, output_logits=True))[0]
    assert len(out.logprobs) == 5
    for tok, lp, logits in zip(out.token_ids, out.logprobs, out.logits):
        assert tok in lp and len(lp) == 3  # greedy: the sampled token is the top one
        assert lp[tok] == pytest.approx(float(torch.log_softmax(logits, -1)[tok]), abs=1e-5)


def test_stop_token_ids_and_max_tokens(tiny: LLM) -> None:
    p = _rand_prompt(12, seed=14)
    ref = tiny.generate([p], SamplingParams(max_tokens=10, temperature=0))[0]
    assert ref.finish_reason == "length" and len(ref.token_ids) == 10
    stop_at = ref.token_ids[4]
    first = ref.token_ids.index(stop_at)
    out = tiny.generate([p], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == ref.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_chat_stop_strings_and_eos(smol: LLM) -> None:
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    (full,) = smol.chat(conv, SamplingParams(max_tokens=32, temperature=0))
    assert full.text == "The capital of France is Paris."
    assert full.finish_reason == "stop" and full.stop_reason is None  # the model's end-of-turn token
    (cut,) = smol.chat(conv, SamplingParams(max_tokens=32, temperature=0, stop=["France"]))
    assert cut.text == "The capital of " and cut.stop_reason == "France" and cut.finish_reason == "stop"
    (kept,) = smol.chat(conv, SamplingParams(max_tokens=32, temperature=0, stop=["France"], include_stop_str_in_output=True))
    assert kept.text == "The capital of France"
    smol.engine.check_integrity()


def test_streamed_deltas_add_up_to_the_text(smol: LLM) -> None:
    engine = smol.engine
    prompt = [{"role": "user", "content": "Write a haiku about autumn leaves."}]
    ids = list(smol.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    req = engine.add_request(ids, SamplingParams(max_tokens=40, temperature=0))
    deltas, final = [], None
    while engine.has_unfinished:
        for o in engine.step():
            deltas.append(o.delta_text)
            final = o
    assert final is not None and final.request_id == req.request_id
    assert "".join(deltas) == final.text == smol.tokenizer.decode(final.token_ids, skip_special_tokens=True)


def test_incremental_deltas_match_the_full_decode_on_both_decoders(smol: LLM) -> None:
    """Random token runs (special tokens and byte pieces included) pushed a few at a time: the
    deltas add up to the full decode, through the Rust decoder and through the tokenizer's own
    Python method alike."""
    import random

    from runtime.outputs import IncrementalDetokenizer

    tok = smol.tokenizer

    class SlowOnly:  # the tokenizer without its fast backend
        def decode(self, ids: list[int], **kw: object) -> str:
            return str(tok.decode(ids, **kw))

    rng = random.Random(0)
    specials = list(tok.all_special_ids)
    for _ in range(40):
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 9))]
        out = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(tok)) for _ in range(30)]
        cuts = [0]
        while cuts[-1] < len(out):
            cuts.append(cuts[-1] + rng.randrange(1, 4))
        runs = []
        for t in (tok, SlowOnly()):
            d = IncrementalDetokenizer(t, prompt)
            runs.append([d.push(out[a:b]) for a, b in zip(cuts, cuts[1:])])
        assert runs[0] == runs[1]
        whole = tok.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        text = "".join(runs[0])  # all of it, unless it ends in an incomplete character, held back
        assert whole.startswith(text) and (whole == text or whole.endswith("\ufffd"))


def test_mistral_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny
    from tests.reference import MIN_MARGIN, assert_matches, reference

    d = make_tiny("mistral", tmp_path / "mistral")
    hf = AutoModelForCausalLM.from_pretrained(d, dtype="float32").eval()
    llm = LLM(str(d))
    for n, seed in ((9, 20), (50, 21)):
        ref = reference(hf, _rand_prompt(n, seed, vocab=280), 16)
        assert ref.min_margin >= MIN_MARGIN
        (out,) = llm.generate([ref.prompt], SamplingParams(max_tokens=16, temperature=0, output_logits=True))
        assert_matches(out, ref, "mistral")


def test_dummy_weights_from_a_config(tiny_llama_dir: Path) -> None:
    config = str(tiny_llama_dir / "config.json")
    a = LLM(config, load_format="dummy", seed=1)
    b = LLM(config, load_format="dummy", seed=1)
    c = LLM(config, load_format="dummy", seed=2)
    p = [_rand_prompt(20, seed=22)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert a.generate(p, params)[0].token_ids == b.generate(p, params)[0].token_ids
    assert a.engine.fingerprint == b.engine.fingerprint != c.engine.fingerprint
    assert "dummy-seed-1" in a.engine.fingerprint


def test_new_requests_join_the_running_batch(tiny: LLM) -> None:
    engine = tiny.engine
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    first = engine.add_request(_rand_prompt(10, seed=23), params)
    for _ in range(5):
        engine.step()
    before = engine.runner.num_forward_passes
    second = engine.add_request(_rand_prompt(10, seed=24), params)
    while engine.has_unfinished:
        engine.step()
    # The newcomer's prefill ran alongside the first request's decodes: no pass was spent on it alone.
    assert engine.runner.num_forward_passes - before == 20
    assert len(first.output_token_ids) == len(second.output_token_ids) == 20


def test_tokenizer_from_elsewhere_for_a_dummy_model(tiny_llama_dir: Path, smol_dir: Path, tmp_path: Path) -> None:
    """A bare config gets the embedded model's tokenizer (and chat template) when its vocabulary
    can hold it; a tokenizer larger than the vocabulary is refused by name."""
    import json

    with pytest.raises(ValueError, match="more than the model's vocabulary of 320"):
        LLM(str(tiny_llama_dir / "config.json"), load_format="dummy", tokenizer=str(smol_dir))
    cfg = json.loads((tiny_llama_dir / "config.json").read_text()) | {"vocab_size": 49152}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(tmp_path / "config.json"), load_format="dummy", tokenizer="smollm2-135m")
    (out,) = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4 and isinstance(out.text, str)
    with pytest.raises(ValueError, match="no tokenizer files"):
        LLM(str(tmp_path / "config.json"), load_format="dummy", tokenizer=str(tmp_path))


def test_reset_drops_every_cached_block_and_keeps_the_model(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), num_blocks=40, host_cache_gib=0.01, host_offload="compute")
    engine = llm.engine
    p = _rand_prompt(50, seed=31)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    (first,) = llm.generate([p], params)
    engine.reset()
    assert engine.kv_manager.pool.num_free == 40 and engine.mover is not None and len(engine.mover.host) == 0  # type: ignore[arg-type]
    (again,) = llm.generate([p], params)
    assert again.token_ids == first.token_ids and again.num_cached_tokens == 0
    engine.reset(host=False)  # a tier left out
    assert engine.mover is None
    (third,) = llm.generate([p], params)
    assert third.token_ids == first.token_ids
    engine.reset()  # and back
    assert engine.mover is not None and engine.mover.host is not None
    engine.check_integrity()
