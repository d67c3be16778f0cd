"""The Triton kernels alone on one GPU: achieved bandwidth against the device copy bandwidth.

    python bench/gpu_kernels.py

Decode attention over one layer of a Llama-3-8B-shaped paged cache (32 query heads, 8 KV heads,
head_dim 128, block 16, context 1,024) for each batch size and several tile configurations;
prefill attention at 8 x 1,024 tokens; an extend of a few hundred tokens over a long cached
context with its keys in 1, 2 and 4 slices per tile (and the count Ember picks), and in several
tile shapes; block gather/scatter of 2 MiB blocks. Bytes counted are the
K/V (or blocks) read and written. Prints a table, writes bench/results/gpu_kernels.json.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_common import card, copy_bandwidth, cuda_time_ms, graph_time_ms, write  # noqa: E402
from kernels import cache_ops, paged_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16


def paged_cache(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = num_tokens // PAGE + 8
    # one layer's view of the block-major layout: (blocks, layers=4, 2, page, kv_heads, head_dim)
    data = torch.randn(blocks, 4, 2, PAGE, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    return data[:, 1, 0], data[:, 1, 1]


def main() -> None:
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ctx = 1024
    kc, vc = paged_cache(128 * ctx)
    rows: list[dict[str, Any]] = []
    for batch in (1, 8, 32, 64, 128):
        perm = torch.randperm(kc.shape[0], device="cuda")[: batch * ctx // PAGE].to(torch.int32)
        tables = perm.view(batch, ctx // PAGE)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        kv_bytes = batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2
        default = paged_attention.decode_splits(batch, KV_HEADS, sms)
        best: dict[str, Any] | None = None
        for splits, block_n, warps, stages in itertools.product(
            sorted({1, 4, 8, 16, default}), (32, 64, 128), (4,), (2, 3)
        ):
            if batch * KV_HEADS * splits > 64 * sms:
                continue
            ms = graph_time_ms(lambda: paged_attention.paged_decode(
                q, kc, vc, tables, lens, num_splits=splits, out=out, block_n=block_n, num_warps=warps,
                num_stages=stages))
            row: dict[str, Any] = {"kernel": "decode", "batch": batch, "splits": splits, "block_n": block_n, "warps": warps,
                   "stages": stages, "us": ms * 1e3, "of_copy_bw": kv_bytes / (ms / 1e3) / bw,
                   "default": (splits, block_n, warps, stages) == (default, 64, 4, 2)}
            rows.append(row)
            if best is None or row["us"] < best["us"]:
                best = row
        assert best is not None
        dflt = next(r for r in rows if r["batch"] == batch and r["default"])
        print(f"decode b{batch:3d}: default {dflt['us']:7.1f} us ({dflt['of_copy_bw']:.0%} of copy bw); best "
              f"{best['us']:7.1f} us ({best['of_copy_bw']:.0%}) at splits {best['splits']} block_n {best['block_n']} "
              f"warps {best['warps']} stages {best['stages']}", flush=True)

    seqs, n = 8, 1024
    perm = torch.randperm(kc.shape[0], device="cuda")[: seqs * n // PAGE].to(torch.int32)
    tables = perm.view(seqs, n // PAGE)
    q = torch.randn(seqs * n, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    i32: dict[str, Any] = dict(dtype=torch.int32, device="cuda")
    starts = torch.arange(0, seqs * n, n, **i32)
    lens = torch.full((seqs,), n, **i32)
    attn_flops = seqs * 4 * HEADS * HEAD_DIM * n * (n + 1) / 2
    for bm, bn, warps, stages in itertools.product((64, 128), (32, 64), (4, 8), (2,)):
        try:
            tiles = torch.from_numpy(paged_attention.prefill_tiles([n] * seqs, [n] * seqs, bm)).cuda()
            ms = cuda_time_ms(lambda: paged_attention.paged_prefill(
                q, kc, vc, tables, starts, lens, lens, tiles, block_m=bm, block_n=bn, num_warps=warps,
                num_stages=stages), iters=10)
        except Exception as e:  # a tile too large for shared memory
            print(f"prefill {bm}x{bn} w{warps} s{stages}: {type(e).__name__}")
            continue
        rows.append({"kernel": "prefill", "block_m": bm, "block_n": bn, "warps": warps, "stages": stages,
                     "us": ms * 1e3, "tflops": attn_flops / (ms / 1e3) / 1e12})
        print(f"prefill 8x1024 {bm}x{bn} w{warps} s{stages}: {ms * 1e3:8.1f} us {attn_flops / (ms / 1e3) / 1e12:6.0f} TFLOP/s",
              flush=True)

    # A tool's output extending a long cached context (one sequence, few query tiles): the keys
    # in one slice per tile and in the slices Ember picks (paged_attention.prefill_splits).
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for prefix, new in ((4096, 300), (4096, 640), (1024, 300), (8192, 128)):
        ctx = prefix + new
        table = torch.randperm(kc.shape[0], device="cuda")[: -(-ctx // PAGE)].to(torch.int32)[None]
        qx = torch.randn(new, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        tiles = torch.from_numpy(paged_attention.prefill_tiles([new], [ctx], 64)).cuda()
        flops = 4 * HEADS * HEAD_DIM * new * (prefix + (new + 1) / 2)
        picked = paged_attention.prefill_splits(tiles.shape[1], HEADS, sms)
        for splits in sorted({1, 2, 4, picked}):
            ms = graph_time_ms(lambda: paged_attention.paged_prefill(
                qx, kc, vc, table, torch.zeros(1, **i32), torch.full((1,), new, **i32), torch.full((1,), ctx, **i32),
                tiles, num_splits=splits))
            rows.append({"kernel": "extend", "prefix": prefix, "new": new, "splits": splits, "picked": splits == picked,
                         "us": ms * 1e3, "tflops": flops / (ms / 1e3) / 1e12})
            print(f"extend {new} over {prefix}: splits {splits}{' (picked)' if splits == picked else ''} "
                  f"{ms * 1e3:8.1f} us {flops / (ms / 1e3) / 1e12:6.0f} TFLOP/s", flush=True)
        if prefix != 4096:
            continue
        # tile shapes for a tool's output over a 4k context (the default: 64 x 64, 4 warps, 2 stages)
        for bm, bn, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)):
            t = torch.from_numpy(paged_attention.prefill_tiles([new], [ctx], bm)).cuda()
            try:
                ms = graph_time_ms(lambda: paged_attention.paged_prefill(
                    qx, kc, vc, table, torch.zeros(1, **i32), torch.full((1,), new, **i32),
                    torch.full((1,), ctx, **i32), t, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                    num_splits=paged_attention.prefill_splits(t.shape[1], HEADS, sms)))
            except Exception as e:  # a tile too large for shared memory
                print(f"extend {new} over {prefix} {bm}x{bn} w{warps} s{stages}: {type(e).__name__}")
                continue
            rows.append({"kernel": "extend_tiles", "prefix": prefix, "new": new, "block_m": bm, "block_n": bn,
                         "warps": warps, "stages": stages, "us": ms * 1e3, "tflops": flops / (ms / 1e3) / 1e12})
            print(f"extend {new} over {prefix} {bm}x{bn} w{warps} s{stages}: {ms * 1e3:8.1f} us "
                  f"{flops / (ms / 1e3) / 1e12:6.0f} TFLOP/s", flush=True)

    cache = torch.randn(600, 32, 2, PAGE, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")  # 2 MiB blocks
    ids = torch.randperm(600, device="cuda")[:256]
    buf = torch.empty(256, *cache.shape[1:], dtype=cache.dtype, device="cuda")
    nbytes = 2 * buf.numel() * 2
    for name, fn in (("gather", lambda: cache_ops.gather_blocks(cache, ids, buf)),
                     ("scatter", lambda: cache_ops.scatter_blocks(cache, ids, buf)),
                     ("torch index_select", lambda: torch.index_select(cache, 0, ids, out=buf))):
        ms = cuda_time_ms(fn)
        rows.append({"kernel": name, "us": ms * 1e3, "of_copy_bw": nbytes / (ms / 1e3) / bw})
        print(f"{name:18s} 256 x 2 MiB: {ms * 1e3:8.1f} us  {nbytes / (ms / 1e3) / bw:.0%} of copy bw", flush=True)
    path = write("gpu_kernels", {"card": card(), "copy_bandwidth_Bps": bw, "rows": rows})
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; wrote {path}")


if __name__ == "__main__":
    main()
