"""The skinny Triton multiply against cuBLAS on the Llama-3-8B projections, at decode row counts.

    python bench/gpu_gemm.py [--rows 1,8,32] [--sweep]

Each weight exists in six copies that the timed calls rotate through, so it is cold in L2 as in a
forward pass (one weight called again and again stays partly in the 50 MB L2 and flatters the
small shapes). GPU time per call from a CUDA graph of ten calls. The gate/up row is the fused
gated product against cuBLAS plus the SiLU kernel. With --sweep, every tiling of a grid is timed
too and the five best are printed (how `skinny_gemm.config_for` was chosen). Writes
bench/results/gpu_gemm.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_common import card, graph_time_ms, write  # noqa: E402
from kernels.fused_ops import silu_mul  # noqa: E402
from kernels.skinny_gemm import SkinnyConfig, config_for, skinny_matmul  # noqa: E402

COPIES = 6
SHAPES = {"qkv": (6144, 4096, False), "o": (4096, 4096, False), "gate_up": (14336, 4096, True),
          "down": (4096, 14336, False)}
GRID = [SkinnyConfig(bn, bk, sp, wp, st) for bn in (32, 64, 128) for (bk, st) in ((128, 4), (128, 6), (128, 8), (256, 3), (256, 4))
        for sp in (1, 2, 4) for wp in (4, 8)]


def rotating(fn: Callable[[int], Any]) -> Callable[[], Any]:
    """fn(i) over the copies in turn, one more each call (the graph captures each call's copy)."""
    i = [0]

    def call() -> Any:
        i[0] = (i[0] + 1) % COPIES
        return fn(i[0])
    return call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows_out = []
    print(f"{'rows':>4} {'shape':>8} {'cuBLAS us':>10} {'skinny us':>10} {'TB/s':>6}  tiling")
    for m in [int(r) for r in args.rows.split(",")]:
        for name, (n, k, gated) in SHAPES.items():
            ws = [torch.randn(2 * n if gated else n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(COPIES)]
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            if gated:
                cublas = graph_time_ms(rotating(lambda j: silu_mul(F.linear(x, ws[j]))))
            else:
                cublas = graph_time_ms(rotating(lambda j: F.linear(x, ws[j])))
            cfg = config_for(n, k, sms, gated)
            ours = graph_time_ms(rotating(lambda j: skinny_matmul(x, ws[j], cfg, gated=gated)))
            tbs = ws[0].numel() * 2 / (ours / 1e3) / 1e12
            row: dict[str, Any] = {"rows": m, "shape": name, "cublas_us": cublas * 1e3, "skinny_us": ours * 1e3,
                                   "skinny_TBps": tbs,
                                   "tiling": [cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps, cfg.num_stages]}
            if args.sweep:
                timed = []
                for c in GRID:
                    if gated and c.split_k > 1:
                        continue
                    try:
                        timed.append((graph_time_ms(rotating(lambda j: skinny_matmul(x, ws[j], c, gated=gated))), c))
                    except Exception:  # a tiling past the card's shared memory
                        continue
                timed.sort(key=lambda tc: tc[0])
                row["best"] = [(round(t * 1e3, 2), [c.block_n, c.block_k, c.split_k, c.num_warps, c.num_stages])
                               for t, c in timed[:5]]
            rows_out.append(row)
            print(f"{m:>4} {name:>8} {cublas * 1e3:>10.1f} {ours * 1e3:>10.1f} {tbs:>6.2f}  {row['tiling']}"
                  + (f"  best {row['best']}" if args.sweep else ""))
            del ws
    path = write("gpu_gemm", {"card": card(), "rows": rows_out})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
