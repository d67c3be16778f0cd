"""Decode step time on one GPU against the floor and transformers, in one process.

    python bench/gpu_decode.py [--batches 1,8,32,64,128] [--context 1024] [--steps 48]
    python bench/gpu_decode.py --batches 1,8,32 --hf-batches "" --pdl off,0,8,16,32   # launch variants

A Llama-3-8B-shaped model with dummy bf16 weights. For each batch size: that many distinct random
1,024-token prompts are prefilled, then `steps` engine steps of pure decode are timed one by one
(each ends when its sampled tokens reach the host). The floor is the bytes of every parameter
(embedding included) over the device copy bandwidth measured first in this process.
transformers' `generate` runs on the same weight tensors; its step time is
(time for 1 + N tokens - time for 1 token) / N.

With --pdl, the decode steps run once per launch variant, the graphs captured again for each:
`off` launches every kernel plainly, a number N uses programmatic dependent launch with N MB of
weights prefetched into L2 per multiply (kernels.pdl). Each variant also reports the graph
replay's GPU time alone (CUDA events), without the host's part of a step.

Prints a table, writes bench/results/gpu_decode.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_common import LLAMA3_8B, card, cuda_time_ms, copy_bandwidth, hf_over_ember_weights, param_bytes, write  # noqa: E402
from kernels import pdl  # noqa: E402
from runtime import LLM, SamplingParams  # noqa: E402
from runtime.cuda_graphs import StepGraphs  # noqa: E402

TARGETS = {1: 1.15, 8: 1.25, 32: 1.5, 64: 1.85, 128: 2.6}  # step / floor
VLLM_H200_MS = {1: 4.95, 8: 5.21, 32: 6.32, 64: 7.68, 128: 10.8}  # DESIGN.md, for reference


def ember_steps(llm: LLM, batch: int, context: int, steps: int, seed: int) -> list[float]:
    engine = llm.engine
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    # slack: sequences whose prefill finished a step earlier are a token or two ahead
    params = SamplingParams(max_tokens=steps + 16, temperature=0, ignore_eos=True)
    rids = []
    for _ in range(batch):
        prompt = torch.randint(0, vocab, (context,), generator=g).tolist()
        rids.append(engine.add_request(prompt, params).request_id)
    # prefill (and the first token) until every sequence is decoding
    while any(len(engine.scheduler.requests[r].token_ids) <= context for r in rids if r in engine.scheduler.requests):
        engine.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        outs = engine.step()
        times.append(time.perf_counter() - t)
        assert len(outs) == batch, f"expected a decode step of {batch}, got {len(outs)}"
    while engine.has_unfinished:
        engine.step()
    return times


def set_variant(llm: LLM, variant: str, batches: list[int]) -> None:
    """Switch the kernels' launch mode and capture the decode graphs again under it (decode
    shapes only: the prompts' prefill runs eagerly)."""
    pdl.settings.enabled = variant != "off"
    pdl.settings.prefetch_bytes = 0 if variant == "off" else int(variant) << 20
    eng = llm.engine
    runner = eng.runner
    runner.drop_launched()
    old = runner.graphs
    assert old is not None
    runner.graphs = None
    del old
    torch.cuda.empty_cache()
    runner.graphs = StepGraphs(runner.model, eng.kv_cache, runner.backend, max(batches),  # type: ignore[arg-type]
                               -(-eng.max_model_len // eng.kv_cache.block_size), eng.device, sizes=tuple(batches))
    runner.graphs.capture()


def replay_ms(llm: LLM, batch: int) -> float:
    """GPU time of one replay of the decode graph for `batch` (its inputs as the last step left them)."""
    graphs = llm.engine.runner.graphs
    assert graphs is not None
    return cuda_time_ms(graphs.graphs[(batch, 0)].replay, iters=30)


def hf_step_ms(hf, batch: int, context: int, n: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, hf.config.vocab_size, (batch, context), generator=g).cuda()
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)

    def run(k: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.inference_mode():
        run(2)  # warm-up
        full = statistics.median(run(n + 1) for _ in range(2))
        first = statistics.median(run(1) for _ in range(2))
    return (full - first) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--hf-batches", default="1,8,32,64,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--hf-steps", type=int, default=8)
    ap.add_argument("--kv-gib", type=float, default=22.0)
    ap.add_argument("--pdl", default="", help="launch variants to compare, say off,0,16 (see above)")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the --pdl variants, interleaved")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    torch.backends.cuda.matmul.allow_tf32 = True
    bw = copy_bandwidth()
    t0 = time.perf_counter()
    llm = LLM(str(LLAMA3_8B), load_format="dummy", device="cuda", dtype="bfloat16",
              max_num_seqs=max(batches), max_model_len=args.context + args.steps + 64,
              max_num_batched_tokens=16384, kv_cache_gib=args.kv_gib, enable_prefix_caching=False)
    load_s = time.perf_counter() - t0
    model = llm.engine.runner.model
    weights = param_bytes(model)
    floor_ms = weights / bw * 1e3
    print(f"{card()['name']}: copy bandwidth {bw / 1e12:.2f} TB/s, weights {weights / 1e9:.2f} GB, "
          f"floor {floor_ms:.2f} ms/step (engine ready in {load_s:.0f} s)", flush=True)

    if args.pdl:
        variants = args.pdl.split(",")
        runs: dict[tuple[str, int], list[float]] = {}
        replays_ms: dict[tuple[str, int], list[float]] = {}
        for rnd in range(args.rounds):
            for v in variants:
                set_variant(llm, v, batches)
                for b in batches:
                    runs.setdefault((v, b), []).extend(ember_steps(llm, b, args.context, args.steps, seed=b + rnd))
                    replays_ms.setdefault((v, b), []).append(replay_ms(llm, b))
                    print(f"round {rnd} variant {v:>4} batch {b:4d}: {statistics.median(runs[(v, b)]) * 1e3:7.3f} ms/step, "
                          f"replay {replays_ms[(v, b)][-1]:.3f} ms", flush=True)
        vrows = []
        print(f"\n{'variant':>7} {'batch':>5} {'step ms':>8} {'x floor':>8} {'replay ms':>9} {'x floor':>8}")
        for v in variants:
            for b in batches:
                ms = statistics.median(runs[(v, b)]) * 1e3
                rp = statistics.median(replays_ms[(v, b)])
                vrows.append({"variant": v, "batch": b, "ember_ms": ms, "over_floor": ms / floor_ms,
                              "replay_ms": rp, "replay_over_floor": rp / floor_ms, "target": TARGETS.get(b)})
                print(f"{v:>7} {b:5d} {ms:8.3f} {ms / floor_ms:8.3f} {rp:9.3f} {rp / floor_ms:8.3f}")
        path = write("gpu_decode_pdl", {"card": card(), "copy_bandwidth_Bps": bw, "weight_bytes": weights,
                                        "floor_ms": floor_ms, "context": args.context, "steps": args.steps,
                                        "rows": vrows, "command": " ".join(sys.argv)})
        print(f"wrote {path}")
        return

    rows: list[dict[str, Any]] = []
    for b in batches:
        times = ember_steps(llm, b, args.context, args.steps, seed=b)
        ms = statistics.median(times) * 1e3
        rows.append({"batch": b, "ember_ms": ms, "ember_p90_ms": sorted(times)[int(0.9 * len(times))] * 1e3,
                     "over_floor": ms / floor_ms, "target": TARGETS.get(b), "tokens_per_s": b / ms * 1e3})
        print(f"batch {b:4d}: {ms:7.2f} ms/step  {ms / floor_ms:5.2f}x floor  (target {TARGETS.get(b)})", flush=True)
    runner = llm.engine.runner
    replays = runner.graphs.replays if runner.graphs is not None else 0
    ahead = {"used": runner.spec_hits, "dropped": runner.spec_misses}

    hf = hf_over_ember_weights(model, LLAMA3_8B)
    hf_batches = [int(b) for b in args.hf_batches.split(",") if b]
    for row in rows:
        if row["batch"] not in hf_batches:
            continue
        try:
            row["hf_ms"] = hf_step_ms(hf, row["batch"], args.context, args.hf_steps, seed=row["batch"])
            row["hf_over_ember"] = row["hf_ms"] / row["ember_ms"]
        except torch.OutOfMemoryError:
            row["hf_ms"] = None  # transformers' own cache did not fit beside Ember's
        torch.cuda.empty_cache()
        print(f"batch {row['batch']:4d}: transformers {row.get('hf_ms') or float('nan'):7.2f} ms/step", flush=True)

    print(f"\n{'batch':>5} {'ember ms':>9} {'x floor':>8} {'target':>7} {'tok/s':>8} {'hf ms':>8} {'hf/ember':>8}")
    for r in rows:
        hf_ms = r.get("hf_ms")
        print(f"{r['batch']:5d} {r['ember_ms']:9.2f} {r['over_floor']:8.2f} {r['target'] or 0:7.2f} "
              f"{r['tokens_per_s']:8.0f} {hf_ms or float('nan'):8.2f} {r.get('hf_over_ember') or float('nan'):8.1f}")
    path = write("gpu_decode", {
        "card": card(), "copy_bandwidth_Bps": bw, "weight_bytes": weights, "floor_ms": floor_ms,
        "context": args.context, "steps": args.steps, "graph_replays": replays, "launched_ahead": ahead, "rows": rows,
        "vllm_h200_ms": VLLM_H200_MS, "command": " ".join(sys.argv),
    })
    print(f"graph replays: {replays}; steps launched ahead: {ahead}; wrote {path}")


if __name__ == "__main__":
    main()
