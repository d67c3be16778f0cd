"""CPU benchmark of the engine against transformers, in one process on one machine.

    python bench/cpu_engine.py [--decode-tokens 128] [--repeats 3]

Measures, on the embedded model in float32:
- decode tokens/s at batch 1 (Ember and transformers' generate) and at batch 16 (Ember);
- time to first token of a second turn (64 new tokens after a ~1,000-token history) that hits the
  prefix cache, against the same prompt cold (another tenant, so no block is shared).
Writes bench/results/cpu_engine.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import LLM, SamplingParams  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ember_generate(llm: LLM, prompts: list[list[int]], n: int, tenant: str = "default") -> None:
    engine = llm.engine
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params, tenant=tenant)
    while engine.has_unfinished:
        engine.step()


def decode_rate_ember(llm: LLM, prompts: list[list[int]], n: int, repeats: int) -> float:
    """Generated tokens per second over the decode phase: (time for n) - (time for 1)."""
    rates = []
    for _ in range(repeats):
        full = timed(lambda: ember_generate(llm, prompts, n + 1))
        first = timed(lambda: ember_generate(llm, prompts, 1))
        rates.append(len(prompts) * n / (full - first))
    return statistics.median(rates)


def decode_rate_hf(hf, prompt: list[int], n: int, repeats: int) -> float:
    ids = torch.tensor([prompt])
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    rates = []
    with torch.inference_mode():
        for _ in range(repeats):
            full = timed(lambda: hf.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1, **kw))
            first = timed(lambda: hf.generate(ids, max_new_tokens=1, **kw))
            rates.append(n / (full - first))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_engine.json"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from runtime.config import EngineConfig
    from runtime.models.loader import convert_gguf, embedded_gguf_path

    llm = LLM("smollm2-135m")
    tok = llm.tokenizer
    hf_dir, _ = convert_gguf(embedded_gguf_path(), EngineConfig.from_env().cache_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    chat = lambda msgs: list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    prompts = [chat([{"role": "user", "content": f"Write a long story about a lighthouse keeper, part {i}."}]) for i in range(16)]
    n = args.decode_tokens
    res: dict[str, float] = {}
    res["hf_b1_tok_s"] = decode_rate_hf(hf, prompts[0], n, args.repeats)
    res["ember_b1_tok_s"] = decode_rate_ember(llm, prompts[:1], n, args.repeats)
    res["ember_b16_tok_s"] = decode_rate_ember(llm, prompts, n, args.repeats)

    # Second turn: a ~1,000-token history, then 64 new tokens.
    filler = " ".join(f"Fact {i}: the lighthouse at cape {i} was painted in {1900 + i}." for i in range(60))
    history = chat([{"role": "user", "content": filler}])[:1000]
    ember_generate(llm, [history], 1, tenant="warm")  # the first turn, cached
    rng = torch.Generator().manual_seed(0)
    warm, cold = [], []
    for r in range(args.repeats):
        turn = history + torch.randint(100, 40000, (64,), generator=rng).tolist()
        cold.append(timed(lambda: ember_generate(llm, [turn], 1, tenant=f"cold-{r}")))
        warm.append(timed(lambda: ember_generate(llm, [turn[:1000] + turn[1000:][::-1]], 1, tenant="warm")))
    res["ttft_cold_s"] = statistics.median(cold)
    res["ttft_prefix_hit_s"] = statistics.median(warm)

    res["ember_vs_hf_b1"] = res["ember_b1_tok_s"] / res["hf_b1_tok_s"]
    res["ember_b16_vs_b1"] = res["ember_b16_tok_s"] / res["ember_b1_tok_s"]
    res["ttft_hit_over_cold"] = res["ttft_prefix_hit_s"] / res["ttft_cold_s"]
    meta = {"machine": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
            "decode_tokens": n, "repeats": args.repeats, "history_tokens": len(history)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": res}, indent=2))
    print(f"{'metric':28} value")
    for k, v in res.items():
        print(f"{k:28} {v:.4g}")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
