"""Where a step's time goes, on one GPU: engine step wall time, graph replay GPU time, the CPU
phases of a step, and the GPU time of each kernel (torch.profiler over the same forward run
without the graph). Decode steps of each batch size, and mixed steps: D sequences decoding at a
context of CTX tokens while one prompt of T new tokens extends a cached prefix of P tokens (an
agent's tool return; P = 0: a first turn).

    python bench/gpu_profile.py [--batches 1,8,64,128] [--context 1024] [--mixed 48:4096:300:4096]
                                [--graph-tokens 128,256,320,384,...]

Prints tables, writes bench/results/gpu_profile.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_common import LLAMA3_8B, card, cuda_time_ms, write  # noqa: E402
from runtime import LLM, SamplingParams  # noqa: E402
from runtime.cuda_graphs import StepGraphs  # noqa: E402
from runtime.engine import LLMEngine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--mixed", default="", help="D:CTX:T:P,... mixed steps to profile")
    ap.add_argument("--graph-tokens", default="", help="prefill rows of the mixed-step graphs (default: the engine's)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")] if args.batches else []
    mixed = [tuple(int(x) for x in m.split(":")) for m in args.mixed.split(",") if m]
    longest = max([args.context] + [max(m[1], m[2] + m[3]) for m in mixed])
    llm = LLM(str(LLAMA3_8B), load_format="dummy", device="cuda", dtype="bfloat16",
              max_num_seqs=max(batches + [m[0] + 1 for m in mixed]),
              max_model_len=longest + 512, max_num_batched_tokens=16384, kv_cache_gib=48.0,
              graph_tokens=tuple(int(t) for t in args.graph_tokens.split(",") if t))
    engine = llm.engine
    graphs = engine.runner.graphs
    assert graphs is not None
    report = [profile_mixed(engine, *m) for m in mixed]
    for b in batches:
        g = torch.Generator().manual_seed(b)
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        for _ in range(b):
            engine.add_request(torch.randint(0, 128000, (args.context,), generator=g).tolist(), params)
        for _ in range(40):  # past prefill, into steady decode
            engine.step()
        phases: dict[str, list[float]] = defaultdict(list)
        for _ in range(20):
            t0 = time.perf_counter()
            sched = engine.scheduler.schedule()
            t1 = time.perf_counter()
            res = engine.runner.execute(sched)
            t2 = time.perf_counter()
            ups = engine.scheduler.update_from_output(sched, res)
            for u in ups:
                engine.outputs.process(u.request)
            t3 = time.perf_counter()
            phases["schedule"].append(t1 - t0)
            phases["execute"].append(t2 - t1)
            phases["update"].append(t3 - t2)
        size = graphs.sizes[next(i for i, s in enumerate(graphs.sizes) if s >= b)]
        replay_ms = cuda_time_ms(graphs.graphs[(size, 0)].replay, iters=20)
        row: dict[str, Any] = {"batch": b, "graph_size": size, "replay_ms": replay_ms,
               **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in phases.items()}}
        row.update(kernel_times(graphs, (size, 0)))
        report.append(row)
        print(f"\nbatch {b} (graph {size}): replay {replay_ms:.3f} ms; schedule {row['schedule_ms']:.3f} "
              f"execute {row['execute_ms']:.3f} update {row['update_ms']:.3f} ms; kernels {row['kernels_total_us'] / 1e3:.3f} ms")
        for name, us in row["kernels_us"].items():
            print(f"  {us:9.1f} us  {name}")
        drain(engine)
    write("gpu_profile", {"card": card(), "rows": report})


def drain(engine: LLMEngine) -> None:
    while engine.has_unfinished:
        for r in list(engine.scheduler.requests):
            engine.abort(r)
        engine.step()


def kernel_times(graphs: StepGraphs, shape: tuple[int, int]) -> dict[str, Any]:
    """GPU time per kernel of the forward of one graph shape, run eagerly over its inputs. A
    kernel launched as a dependent (kernels.pdl) starts before its predecessor ends and waits, so
    each kernel is charged from the later of its start and the previous kernel's end: the
    charges partition the stream's busy time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.inference_mode():
            graphs._forward(*shape)
        torch.cuda.synchronize()
    kernels: dict[str, float] = defaultdict(float)
    prev_end = float("-inf")
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in sorted(events, key=lambda e: e.time_range.start):
        kernels[e.name[:60]] += max(0.0, e.time_range.end - max(e.time_range.start, prev_end))
        prev_end = max(prev_end, e.time_range.end)
    return {"kernels_us": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:20]),
            "kernels_total_us": sum(kernels.values())}


def profile_mixed(engine: LLMEngine, d: int, ctx: int, t: int, prefix: int, reps: int = 8) -> dict[str, Any]:
    """Steps of d decodes at context ~ctx, each also extending a cached `prefix`-token prompt by
    t new tokens, against the decode-only steps between them."""
    graphs = engine.runner.graphs
    assert graphs is not None
    g = torch.Generator().manual_seed(d * 7919 + t)
    rand = lambda n: torch.randint(0, 32000, (n,), generator=g).tolist()  # noqa: E731
    for _ in range(d):
        engine.add_request(rand(ctx), SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running + list(engine.scheduler.waiting)):
        engine.step()
    head = rand(prefix)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    if prefix:
        engine.add_request(head + rand(16), one)  # caches the prefix
        while len(engine.scheduler.running) > d:
            engine.step()
    shapes: list[tuple[int, int]] = []
    replay = graphs._replay

    def record(shape: tuple[int, int]) -> torch.Tensor:
        shapes.append(shape)
        return replay(shape)

    graphs._replay = record  # type: ignore[method-assign]
    mixed_s, decode_s, hits = [], [], []
    for _ in range(reps):
        for _ in range(3):
            t0 = time.perf_counter()
            engine.step()
            decode_s.append(time.perf_counter() - t0)
        req = engine.add_request(head + rand(t), one)
        while req.num_computed_tokens == 0:  # (a decode step launched ahead goes first)
            t0 = time.perf_counter()
            engine.step()
        mixed_s.append(time.perf_counter() - t0)
        hits.append(req.num_cached_tokens)
        while len(engine.scheduler.running) > d:
            engine.step()
    graphs._replay = replay  # type: ignore[method-assign]
    shape = next(s for s in reversed(shapes) if s[1] > 0)
    row: dict[str, Any] = {
        "mixed": f"{d}:{ctx}:{t}:{prefix}", "shape": list(shape), "prefix_hit_tokens": hits,
        "mixed_step_ms": statistics.median(mixed_s) * 1e3, "decode_step_ms": statistics.median(decode_s) * 1e3,
        "mixed_replay_ms": cuda_time_ms(lambda: graphs._replay(shape), iters=10),
    }
    row.update(kernel_times(graphs, shape))
    print(f"\nmixed {row['mixed']} (graph {shape}, prefix hits {hits[0]}): step {row['mixed_step_ms']:.2f} ms, "
          f"replay {row['mixed_replay_ms']:.2f} ms; decode-only step {row['decode_step_ms']:.2f} ms; "
          f"kernels {row['kernels_total_us'] / 1e3:.3f} ms")
    for name, us in row["kernels_us"].items():
        print(f"  {us:9.1f} us  {name}")
    drain(engine)
    return row


if __name__ == "__main__":
    main()
