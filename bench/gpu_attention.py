"""The extend kernel against the card's attention ceiling, on one GPU.

    python bench/gpu_attention.py

For a tool return's shape (a few hundred new tokens over a ~4k-token cached context) and a long
prefill, in one process: Ember's paged extend kernel (kernels.paged_attention, the Llama-3-8B
cache layout: 32 query heads, 8 KV heads, 128 dims, 16-token blocks, the slices Ember picks);
torch's `scaled_dot_product_attention` over the same queries with the keys contiguous per head
(non-causal: the card's ceiling for the shape); the same online-softmax loop as Ember's written
plainly in Triton over contiguous keys, with pointer loads and with TMA descriptor loads, at a
few tiles; and that loop under Triton's automatic warp specialization (its Hopper pass, which
needs descriptor loads), each output checked against SDPA's. Rates are attention FLOPs (4 x
heads x head_dim per query-key pair seen) over GPU time. Prints a table, writes
bench/results/gpu_attention.json.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_common import card, graph_time_ms, write  # noqa: E402
from bench.gpu_kernels import HEAD_DIM, HEADS, PAGE, paged_cache  # noqa: E402
from kernels import paged_attention  # noqa: E402

LOG2E = 1.4426950408889634
# (new queries, cached prefix) per shape; the plain loops run every query over all prefix + new keys
SHAPES = ((320, 4096), (640, 4096), (2048, 6144))
# plain loops: (BLOCK_M, BLOCK_N, warps, stages, warp-specialized); specialized ones need 4 warps
TILES = [(64, 64, 4, 3, False), (128, 64, 8, 3, False), (128, 128, 8, 3, False),
         (64, 64, 4, 2, True), (128, 64, 4, 2, True), (128, 128, 4, 2, True)]


@triton.jit
def _plain_ptr(Q, K, V, O, M, N, scale_log2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    # One program: BLOCK_M queries of one head over all N keys of that head (contiguous, N a
    # multiple of BLOCK_N), online softmax in the exp2 domain as Ember's _attend_tile.
    t = tl.program_id(0)
    h = tl.program_id(1)
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    q = tl.load(Q + h * M * D + rows[:, None] * D + d[None, :], mask=(rows < M)[:, None], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(K + h * N * D + n[:, None] * D + d[None, :])
        s = tl.dot(q, tl.trans(k)) * scale_log2
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(V + h * N * D + n[:, None] * D + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    tl.store(O + h * M * D + rows[:, None] * D + d[None, :], (acc / l[:, None]).to(O.dtype.element_ty),
             mask=(rows < M)[:, None])


@triton.jit
def _plain_desc(Q, K, V, O, M, N, scale_log2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                WS: tl.constexpr):
    # _plain_ptr with TMA descriptor loads; WS asks for automatic warp specialization.
    t = tl.program_id(0)
    h = tl.program_id(1)
    qd = tl.make_tensor_descriptor(Q + h * M * D, shape=[M, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    kd = tl.make_tensor_descriptor(K + h * N * D, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    vd = tl.make_tensor_descriptor(V + h * N * D, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    q = qd.load([t * BLOCK_M, 0])
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in tl.range(0, N, BLOCK_N, warp_specialize=WS):
        k = kd.load([n0, 0])
        s = tl.dot(q, tl.trans(k)) * scale_log2
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = vd.load([n0, 0])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    tl.store(O + h * M * D + rows[:, None] * D + d[None, :], (acc / l[:, None]).to(O.dtype.element_ty),
             mask=(rows < M)[:, None])


def timed(fn: Callable[[], Any], calls: int = 20, rounds: int = 5) -> float:
    """Median µs per call of `calls` back-to-back calls between two events, for the plain loops
    (not captured in a CUDA graph: a TMA descriptor made on the device allocates at each launch).
    Each runs longer than its bare launch, so the queue stays ahead of the card; Ember's kernel
    and SDPA, whose host-side calls cost more, are timed from graphs (`graph_time_ms`)."""
    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        per_call.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(per_call)


def main() -> None:
    # TMA descriptors made on the device take their scratch from this allocator.
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    i32: dict[str, Any] = dict(dtype=torch.int32, device="cuda")
    kc, vc = paged_cache(max(p + n for n, p in SHAPES))
    rows: list[dict[str, Any]] = []
    for new, prefix in SHAPES:
        ctx = prefix + new
        print(f"\n{new} new tokens over {prefix} cached ({HEADS} heads of {HEAD_DIM}):", flush=True)

        def report(name: str, us: float, flops: float, err: float | None = None) -> None:
            rows.append({"new": new, "prefix": prefix, "variant": name, "us": us, "tflops": flops / us / 1e6, "max_err": err})
            print(f"  {name:34s} {us:8.1f} us {flops / us / 1e6:6.0f} TFLOP/s" + ("" if err is None else f"  max err {err:.3g}"),
                  flush=True)

        # Ember's kernel: causal over the new tokens, the prefix seen whole.
        table = torch.randperm(kc.shape[0], device="cuda")[: -(-ctx // PAGE)].to(torch.int32)[None]
        qx = torch.randn(new, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        tiles = torch.from_numpy(paged_attention.prefill_tiles([new], [ctx], 64)).cuda()
        splits = paged_attention.prefill_splits(tiles.shape[1], HEADS, sms)
        starts, lens, ctxs = torch.zeros(1, **i32), torch.full((1,), new, **i32), torch.full((1,), ctx, **i32)
        out_x = torch.empty_like(qx)
        us = graph_time_ms(lambda: paged_attention.paged_prefill(qx, kc, vc, table, starts, lens, ctxs, tiles,
                                                                 num_splits=splits, out=out_x)) * 1e3
        report(f"ember paged extend ({splits} slice(s))", us, 4 * HEADS * HEAD_DIM * new * (prefix + (new + 1) / 2))

        # The rest: every query over all ctx keys, contiguous per head, non-causal.
        n_keys = -(-ctx // 128) * 128  # a multiple of every BLOCK_N
        flops = 4 * HEADS * HEAD_DIM * new * n_keys
        q = torch.randn(HEADS, new, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(HEADS, n_keys, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        v = torch.randn(HEADS, n_keys, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        ref = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
        report("torch scaled_dot_product_attention",
               graph_time_ms(lambda: F.scaled_dot_product_attention(q[None], k[None], v[None])) * 1e3, flops)
        scale = LOG2E / HEAD_DIM ** 0.5
        for bm, bn, warps, stages, ws in TILES:
            kinds: list[tuple[str, Any, dict[str, Any]]] = [("desc", _plain_desc, {"WS": ws})]
            if not ws:
                kinds.insert(0, ("ptr", _plain_ptr, {}))
            for kind, kernel, extra in kinds:
                out = torch.empty_like(q)
                name = f"triton {kind} {bm}x{bn} w{warps} s{stages}" + (" warp-specialized" if ws else "")
                call = lambda: kernel[(triton.cdiv(new, bm), HEADS)](  # noqa: E731
                    q, k, v, out, new, n_keys, scale, BLOCK_M=bm, BLOCK_N=bn, D=HEAD_DIM, num_warps=warps,
                    num_stages=stages, **extra)
                try:
                    us = timed(call)
                except Exception as e:  # a tiling past shared memory, or a compiler failure
                    print(f"  {name:34s} {type(e).__name__}: {str(e)[:100]}", flush=True)
                    rows.append({"new": new, "prefix": prefix, "variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                report(name, us, flops, (out.float() - ref.float()).abs().max().item())
    write("gpu_attention", {"card": card(), "rows": rows})


if __name__ == "__main__":
    main()
