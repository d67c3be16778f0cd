"""Where a decode step's time goes, on one GPU: engine step wall time, graph replay GPU time, the
CPU phases of a step, and the GPU time of each kernel (torch.profiler over the same forward run
without the graph).

    python bench/gpu_profile.py [--batches 1,8,64,128] [--context 1024]

Prints tables, writes bench/results/gpu_profile.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_common import LLAMA3_8B, card, cuda_time_ms, write  # noqa: E402
from runtime import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64,128")
    ap.add_argument("--context", type=int, default=1024)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(str(LLAMA3_8B), load_format="dummy", device="cuda", dtype="bfloat16", max_num_seqs=max(batches),
              max_model_len=args.context + 256, max_num_batched_tokens=16384, kv_cache_gib=22.0,
              enable_prefix_caching=False)
    engine = llm.engine
    graphs = engine.runner.graphs
    assert graphs is not None
    report = []
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
        row = {"batch": b, "graph_size": size, "replay_ms": replay_ms,
               **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in phases.items()}}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            with torch.inference_mode():
                graphs._forward(size, 0)
            torch.cuda.synchronize()
        kernels: dict[str, float] = defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.name[:60]] += e.device_time_total
        row["kernels_us"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:20])
        row["kernels_total_us"] = sum(kernels.values())
        report.append(row)
        print(f"\nbatch {b} (graph {size}): replay {replay_ms:.3f} ms; schedule {row['schedule_ms']:.3f} "
              f"execute {row['execute_ms']:.3f} update {row['update_ms']:.3f} ms; kernels {row['kernels_total_us'] / 1e3:.3f} ms")
        for name, us in row["kernels_us"].items():
            print(f"  {us:9.1f} us  {name}")
        while engine.has_unfinished:
            for r in list(engine.scheduler.requests):
                engine.abort(r)
            engine.step()
    write("gpu_profile", {"card": card(), "rows": report})


if __name__ == "__main__":
    main()
