"""Prefill throughput on one GPU against the bf16 matrix-multiply peak, in one process.

    python bench/gpu_prefill.py [--shapes 8x1024,4x2048,2x4096,1x8192] [--chunk 8192]

A Llama-3-8B-shaped model with dummy bf16 weights. For each shape (sequences x tokens), distinct
random prompts are prefilled cold (prefix caching off) in chunks of up to `--chunk` tokens; the
time from submission to every first token is measured (best of 3). Model FLOPs per token =
2 x (non-embedding parameters) + causal attention (2 x 2 x layers x heads x head_dim x the
token's context / 2 on average); achieved FLOP/s over the 8192^3 bf16 matmul rate measured first.
transformers' forward over the same weights runs the 8x1024 shape for comparison.

Prints a table, writes bench/results/gpu_prefill.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_common import LLAMA3_8B, card, hf_over_ember_weights, matmul_peak, write  # noqa: E402
from runtime import LLM, SamplingParams  # noqa: E402


def flops(cfg, seqs: int, tokens: int, weight_params: int) -> float:
    attn = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (tokens * (tokens + 1) / 2)
    return seqs * (2 * weight_params * tokens + attn)


def ember_prefill_s(llm: LLM, seqs: int, tokens: int, seed: int) -> float:
    engine = llm.engine
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, engine.model_config.vocab_size, (tokens,), generator=g).tolist() for _ in range(seqs)]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    while engine.has_unfinished:
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x1024,4x2048,2x4096,1x8000,16x512")
    ap.add_argument("--chunk", type=int, default=8192)
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]

    peak = matmul_peak()
    llm = LLM(str(LLAMA3_8B), load_format="dummy", device="cuda", dtype="bfloat16", max_num_seqs=64,
              max_model_len=max(t for _, t in shapes) + 8, max_num_batched_tokens=args.chunk,
              kv_cache_gib=8.0, enable_prefix_caching=False, enforce_eager=True)
    model = llm.engine.runner.model
    cfg = model.cfg
    # the embedding is a lookup, and the LM head runs only for each sequence's last token
    weight_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    print(f"{card()['name']}: bf16 matmul peak {peak / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for i, (seqs, tokens) in enumerate(shapes):
        ember_prefill_s(llm, 1, 256, seed=1000 + i)  # warm-up (kernel compilation for this shape's tiles)
        s = min(ember_prefill_s(llm, seqs, tokens, seed=i * 10 + k) for k in range(3))
        f = flops(cfg, seqs, tokens, weight_params)
        rows.append({"seqs": seqs, "tokens": tokens, "seconds": s, "tokens_per_s": seqs * tokens / s,
                     "tflops": f / s / 1e12, "of_peak": f / s / peak})
        print(f"{seqs:3d} x {tokens:5d}: {seqs * tokens / s:9.0f} tok/s  {f / s / 1e12:6.0f} TFLOP/s  "
              f"{f / s / peak:5.1%} of peak", flush=True)

    hf = hf_over_ember_weights(model, LLAMA3_8B)
    ids = torch.randint(0, cfg.vocab_size, (8, 1024), device="cuda")
    with torch.inference_mode():
        hf(ids, logits_to_keep=1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            hf(ids, logits_to_keep=1)
        torch.cuda.synchronize()
        hf_s = (time.perf_counter() - t) / 3
    hf_row = {"seqs": 8, "tokens": 1024, "seconds": hf_s, "tokens_per_s": 8 * 1024 / hf_s,
              "of_peak": flops(cfg, 8, 1024, weight_params) / hf_s / peak}
    print(f"transformers 8 x 1024: {8 * 1024 / hf_s:9.0f} tok/s  {hf_row['of_peak']:5.1%} of peak")
    path = write("gpu_prefill", {"card": card(), "matmul_peak_flops": peak, "chunk": args.chunk, "rows": rows,
                                 "transformers": hf_row, "command": " ".join(sys.argv)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
