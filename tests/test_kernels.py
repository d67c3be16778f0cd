"""Triton kernels against the torch references on random data.

On a machine without CUDA these run under TRITON_INTERPRET=1 (set in conftest.py) at small shapes,
covering the kernels' indexing and masking logic; on a GPU the full matrix of dtypes, head dims,
GQA ratios, block sizes and ragged context lengths runs. Every output buffer is poisoned with NaN
first, so an element a kernel fails to write fails the comparison.
"""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from kernels import cache_ops, fused_ops, paged_attention, torch_ref

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
# the CPU interpreter handles float32 and float16 tensors; bfloat16 runs on the GPU
DTYPES = [torch.float16, torch.bfloat16, torch.float32] if CUDA else [torch.float16, torch.float32]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert not torch.isnan(out).any(), f"{what}: unwritten (NaN) elements"
    err = float((out.float() - ref.float()).abs().max()) if out.numel() else 0.0
    scale = max(1.0, float(ref.float().abs().max())) if ref.numel() else 1.0
    assert err <= TOL[dtype] * scale * 4, f"{what}: max error {err:.3e}"


def _paged(num_seqs_ctx: list[int], page: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """Random caches with each sequence's blocks scattered through the pool, and its table."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    need = [-(-c // page) for c in num_seqs_ctx]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need)
    table = torch.zeros(len(need), width, dtype=torch.int32)
    i = 0
    for s, n in enumerate(need):
        table[s, :n] = torch.tensor(perm[i : i + n])
        i += n
    # a strided per-layer view into a block-major tensor, as runtime.kv_cache lays it out
    data = torch.randn(num_blocks, 2, 2, page, kv_heads, head_dim, generator=g).to(dtype).to(DEV)
    return data[:, 1, 0], data[:, 1, 1], table.to(DEV)


def _decode_cases():
    if CUDA:
        heads = [(32, 8), (9, 3), (16, 16)]
        return [
            (dt, hd, h, kvh, 16, splits)
            for dt, hd, (h, kvh), splits in itertools.product(DTYPES, [64, 128], heads, [1, 8])
        ] + [
            (torch.bfloat16, 128, 32, 8, 32, 4), (torch.bfloat16, 128, 28, 4, 8, 16),
            (torch.bfloat16, 256, 8, 2, 16, 8), (torch.float16, 96, 12, 4, 16, 2),
        ]
    return [
        (torch.float16, 32, 4, 2, 4, 1), (torch.float32, 32, 6, 2, 8, 4), (torch.float16, 16, 3, 3, 4, 3),
        (torch.float32, 24, 4, 1, 4, 2),
    ]


@pytest.mark.parametrize("dtype,head_dim,heads,kv_heads,page,splits", _decode_cases())
def test_paged_decode(dtype, head_dim, heads, kv_heads, page, splits) -> None:
    rnd = random.Random(head_dim * 31 + heads + page + splits)
    ctx = [rnd.randint(1, 4100 if CUDA else 70) for _ in range(5 if CUDA else 3)] + [1, page, page + 1]
    kc, vc, table = _paged(ctx, page, kv_heads, head_dim, dtype, seed=len(ctx) + head_dim)
    q = torch.randn(len(ctx), heads, head_dim, device=DEV).to(dtype)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    block_n = 64 if CUDA else 8
    width = table.shape[1] * page
    mask = (torch.arange(width, device=DEV)[None, :] < lens[:, None].long())[:, None, None, :]
    ref = torch_ref.decode_attention(q.float(), kc.float(), vc.float(), table.long(), mask)
    for call in range(2):  # the splits' merge counters must be left at zero for the next call
        out = torch.full_like(q, float("nan"))
        paged_attention.paged_decode(q, kc, vc, table, lens, num_splits=splits, out=out, block_n=block_n)
        _close(out, ref, dtype, f"decode {dtype} hd{head_dim} {heads}/{kv_heads} page{page} splits{splits} call {call}")


def _prefill_cases():
    if CUDA:
        return [
            (dt, hd, h, kvh, 16)
            for dt, hd, (h, kvh) in itertools.product(DTYPES, [64, 128], [(32, 8), (9, 3)])
        ] + [(torch.bfloat16, 128, 16, 16, 32), (torch.bfloat16, 256, 8, 2, 16), (torch.float16, 128, 28, 4, 8)]
    # (24 dims: a head narrower than its tile, whose unmasked key blocks still mask the dims)
    return [(torch.float16, 32, 4, 2, 4), (torch.float32, 16, 6, 3, 8), (torch.float16, 24, 4, 2, 4)]


@pytest.mark.parametrize("dtype,head_dim,heads,kv_heads,page", _prefill_cases())
def test_paged_prefill(dtype, head_dim, heads, kv_heads, page) -> None:
    rnd = random.Random(head_dim + heads * 7 + page)
    # (cached prefix, new tokens): cold prefills, extends over a prefix, a single-token extend
    if CUDA:
        shapes = [(0, 700), (1000, 300), (33, 1), (0, 1), (4000, 64), (rnd.randint(0, 500), rnd.randint(1, 900))]
    else:
        # (40, 5): five unmasked key blocks before the causal one, each block's ids loaded ahead
        shapes = [(0, 19), (13, 9), (5, 1), (0, 1), (40, 5), (rnd.randint(0, 20), rnd.randint(1, 12))]
    ctx = [p + n for p, n in shapes]
    kc, vc, table = _paged(ctx, page, kv_heads, head_dim, dtype, seed=heads + head_dim)
    qlens = [n for _, n in shapes]
    starts = [sum(qlens[:i]) for i in range(len(qlens))]
    q = torch.randn(sum(qlens), heads, head_dim, device=DEV).to(dtype)
    out = torch.full_like(q, float("nan"))
    block_m = paged_attention.prefill_block_m(dtype, head_dim) if CUDA else 8
    pad = np.empty((2, sum(-(-n // block_m) for n in qlens) + 3), np.int32)  # padding tiles do nothing
    tiles = torch.from_numpy(paged_attention.prefill_tiles(qlens, ctx, block_m, out=pad)).to(DEV)
    refs = []
    for s, (start, n, c) in enumerate(zip(starts, qlens, ctx)):
        ids = table[s, : -(-c // page)].long()
        refs.append(torch_ref.prefill_attention(q[start : start + n].float(), kc.float(), vc.float(), ids, c))
    # keys in one slice, or sliced (rows whose position precedes a slice see nothing in it; the
    # merge's counters are left at zero, so a second call is right too); at the default minimum
    # slice length the tiny shapes' later slices are empty
    for splits, min_slice in ((1, 1), (2, 1), (3, 1), (2, 1), (4, paged_attention.MIN_SLICE_KEYS)):
        out = torch.full_like(q, float("nan"))
        paged_attention.paged_prefill(
            q, kc, vc, table,
            torch.tensor(starts, dtype=torch.int32, device=DEV),
            torch.tensor(qlens, dtype=torch.int32, device=DEV),
            torch.tensor(ctx, dtype=torch.int32, device=DEV),
            tiles, out=out, block_m=block_m, block_n=64 if CUDA else 8, num_splits=splits, min_slice=min_slice,
        )
        for s, (start, n) in enumerate(zip(starts, qlens)):
            _close(out[start : start + n], refs[s], dtype,
                   f"prefill seq {s} {dtype} hd{head_dim} {heads}/{kv_heads} splits {splits}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,head_dim,page", [(2, 32, 4), (8, 128, 16)] if CUDA else [(2, 32, 4), (1, 24, 8)])
def test_write_kv(dtype, kv_heads, head_dim, page) -> None:
    kc, vc, _ = _paged([page * 6], page, kv_heads, head_dim, dtype, seed=3)
    kc.fill_(float("nan"))
    vc.fill_(float("nan"))
    n = 5 * page - 3
    slots = torch.randperm(kc.shape[0] * page)[:n].to(DEV)
    slots[2] = -1  # a padding token: written nowhere
    qkv = torch.randn(n, (4 + 2) * kv_heads, head_dim, device=DEV).to(dtype)
    k, v = qkv[:, 4 * kv_heads : 5 * kv_heads], qkv[:, 5 * kv_heads :]  # strided views, as the model has them
    cache_ops.write_kv(kc, vc, k, v, slots)
    keep = slots >= 0
    ref_k = torch.full_like(kc, float("nan"))
    ref_v = torch.full_like(vc, float("nan"))
    torch_ref.write_kv(ref_k, ref_v, k[keep], v[keep], slots[keep] // page, slots[keep] % page)
    assert torch.equal(kc.isnan(), ref_k.isnan()) and torch.equal(vc.isnan(), ref_v.isnan())
    assert torch.equal(kc.nan_to_num(), ref_k.nan_to_num()) and torch.equal(vc.nan_to_num(), ref_v.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_scatter_blocks(dtype) -> None:
    shape = (40, 4, 2, 16, 8, 128) if CUDA else (12, 2, 2, 4, 2, 8)
    cache = torch.randn(*shape, device=DEV).to(dtype)
    ids = torch.tensor([7, 0, 3, 11, 5], device=DEV)
    staged = torch.full((6, *shape[1:]), float("nan"), dtype=dtype, device=DEV)
    cache_ops.gather_blocks(cache, ids, staged)
    assert torch.equal(staged[:5], cache[ids]) and staged[5].isnan().all()
    target = torch.full_like(cache, float("nan"))
    cache_ops.scatter_blocks(target, ids.to(torch.int32), staged)
    assert torch.equal(target[ids], cache[ids])
    untouched = torch.ones(shape[0], dtype=torch.bool, device=DEV)
    untouched[ids] = False
    assert target[untouched].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4096, 576] if CUDA else [48, 100])
def test_add_rmsnorm(dtype, hidden) -> None:
    x = torch.randn(7, hidden, device=DEV).to(dtype)
    res = torch.randn(7, hidden, device=DEV).to(dtype)
    w = (torch.rand(hidden, device=DEV) + 0.5).to(dtype)

    def ref_norm(t: torch.Tensor) -> torch.Tensor:
        tf = t.float()
        return w * (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

    out, r = fused_ops.add_rmsnorm(x, res.clone(), w, 1e-5)
    _close(r, x + res, dtype, "residual sum")
    _close(out, ref_norm(x + res), dtype, "add+rmsnorm")
    out0, r0 = fused_ops.add_rmsnorm(x, None, w, 1e-5)
    assert r0 is x
    _close(out0, ref_norm(x), dtype, "rmsnorm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64)] if CUDA else [(4, 2, 16), (3, 1, 8)])
def test_write_kv_with_rope(dtype, heads, kv_heads, head_dim) -> None:
    """The KV write that applies the rotary embedding: q rotated in place, K rotated into the
    cache, V copied, the caller's k and v untouched, a padding token (slot -1) left alone."""
    from runtime.models.llama import RotaryEmbedding

    n, max_pos, page = 11, 64, 4
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(max_pos).float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(DEV), emb.sin().to(DEV)
    qkv = torch.randn(n, heads + 2 * kv_heads, head_dim, device=DEV).to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    pos = torch.randint(0, max_pos, (n,), device=DEV)
    c, s = cos[pos].to(dtype)[:, None], sin[pos].to(dtype)[:, None]
    rq = q * c + RotaryEmbedding._rotate_half(q) * s
    rk = k * c + RotaryEmbedding._rotate_half(k) * s
    kv_before = qkv[:, heads:].clone()
    kc, vc, _ = _paged([page * 4], page, kv_heads, head_dim, dtype, seed=5)
    kc.fill_(float("nan"))
    vc.fill_(float("nan"))
    slots = torch.randperm(kc.shape[0] * page)[:n].to(DEV)
    slots[3] = -1
    cache_ops.write_kv(kc, vc, k, v, slots, cache_ops.Rope(q, pos, cos, sin))
    keep = slots >= 0
    _close(q[keep], rq[keep], dtype, "rope q")
    rows = kc.flatten(0, 1)[slots[keep]]
    _close(rows, rk[keep], dtype, "rope k in the cache")
    assert torch.equal(vc.flatten(0, 1)[slots[keep]], v[keep]), "v copied as is"
    assert int(kc.isnan().logical_not().sum()) == int(keep.sum()) * kv_heads * head_dim, "written outside the slots"
    assert torch.equal(qkv[:, heads:], kv_before), "the caller's k and v changed"


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype) -> None:
    inter = 14336 if CUDA else 40
    x = torch.randn(5, 2 * inter, device=DEV).to(dtype)
    ref = torch.nn.functional.silu(x[:, :inter]) * x[:, inter:]
    _close(fused_ops.silu_mul(x), ref, dtype, "silu*mul")


def _skinny_cases():
    if CUDA:  # the Llama-3-8B projections, at decode batch sizes
        shapes = [(6144, 4096), (4096, 4096), (4096, 14336), (28672, 4096)]
        return [(dt, m, n, k) for dt in (torch.bfloat16, torch.float16) for m in (1, 8, 32) for n, k in shapes]
    return [(torch.float16, 1, 40, 96), (torch.float16, 5, 64, 300), (torch.float32, 16, 33, 128),
            (torch.float32, 32, 70, 64)]


@pytest.mark.parametrize("dtype,m,n,k", _skinny_cases())
def test_skinny_matmul(dtype, m, n, k) -> None:
    """Plain, split along K (partials reduced by the last program, counters left at zero for the
    next call: run twice) and gated (silu(x @ gate.T) * (x @ up.T) from a stacked weight)."""
    from kernels import skinny_gemm

    x = torch.randn(m, k, device=DEV).to(dtype)
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(dtype)
    ref = (x.float() @ w.float().T).to(dtype)
    for split in (1, 2, 3):
        cfg = skinny_gemm.SkinnyConfig(block_n=32 if not CUDA else 64, block_k=32 if not CUDA else 128,
                                       split_k=split, num_stages=1 if not CUDA else 4)
        for _ in range(2):
            out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
            skinny_gemm.skinny_matmul(x, w, cfg, out=out)
            _close(out, ref, dtype, f"skinny split {split}")
    gate_up = torch.cat([w, (torch.randn(n, k, device=DEV) / k**0.5).to(dtype)])
    g, u = (x.float() @ gate_up.float().T).to(dtype).float().chunk(2, dim=-1)
    gref = (torch.nn.functional.silu(g).to(dtype).float() * u).to(dtype)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if CUDA else 8
    gout = skinny_gemm.skinny_matmul(x, gate_up, skinny_gemm.config_for(n, k, sms, gated=True), gated=True)
    _close(gout, gref, dtype, "skinny gated")


@pytest.mark.parametrize("rows", [1, 7, 40])
def test_triton_ops_match_torch_ops(rows) -> None:
    """The layer-op seam: the Triton ops give the torch ops' projections, gated MLP activation
    and logits, through the skinny kernel up to its row limit and cuBLAS past it or with a bias."""
    from runtime.models.ops import TorchOps, TritonOps

    dtype = torch.bfloat16 if CUDA else torch.float16
    hidden, inter, vocab = (4096, 14336, 32000) if CUDA else (64, 96, 80)
    torch.manual_seed(0)
    qkv = torch.nn.Linear(hidden, 2 * hidden, bias=False).to(DEV, dtype)
    biased = torch.nn.Linear(hidden, hidden, bias=True).to(DEV, dtype)
    gate_up = torch.nn.Linear(hidden, 2 * inter, bias=False).to(DEV, dtype)
    lm_head = (torch.randn(vocab, hidden, device=DEV) / hidden**0.5).to(dtype)
    x = torch.randn(rows, hidden, device=DEV).to(dtype)
    fast, ref = TritonOps(), TorchOps()
    with torch.no_grad():
        _close(fast.linear(x, qkv), ref.linear(x, qkv), dtype, "linear")
        _close(fast.linear(x, biased), ref.linear(x, biased), dtype, "linear with bias")
        _close(fast.gated(x, gate_up), ref.gated(x, gate_up), dtype, "gated")
        _close(fast.logits(x, lm_head), ref.logits(x, lm_head), dtype, "logits")


def test_launchers_refuse_bad_input() -> None:
    kc, vc, table = _paged([8, 8], 4, 2, 16, torch.float32, seed=1)
    q = torch.randn(2, 4, 16, device=DEV)
    lens = torch.tensor([8, 8], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="dtype mismatch"):
        paged_attention.paged_decode(q.half(), kc, vc, table, lens)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        paged_attention.paged_decode(q, kc, vc, table.long(), lens)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_attention.paged_decode(torch.randn(2, 3, 16, device=DEV), kc, vc, table, lens)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention.paged_decode(torch.randn(2, 4, 8, device=DEV), kc, vc, table, lens)
    with pytest.raises(ValueError, match="slots must be int64"):
        cache_ops.write_kv(kc, vc, q[:, :2], q[:, :2], lens)
    tab = torch.zeros(16, 16, device=DEV)
    with pytest.raises(ValueError, match="positions must be int64"):
        cache_ops.write_kv(kc, vc, q[:, :2], q[:, :2], lens.long(), cache_ops.Rope(q, lens, tab, tab))
    with pytest.raises(ValueError, match="cannot hold"):
        cache_ops.gather_blocks(kc.contiguous(), torch.tensor([0, 1, 2], device=DEV), kc.contiguous()[:2])
    with pytest.raises(ValueError, match="gate_up"):
        fused_ops.silu_mul(torch.randn(2, 3, device=DEV))
    from kernels import skinny_gemm

    with pytest.raises(ValueError, match="exceed"):
        skinny_gemm.skinny_matmul(torch.randn(33, 8, device=DEV), torch.randn(4, 8, device=DEV))
    with pytest.raises(ValueError, match="does not match"):
        skinny_gemm.skinny_matmul(torch.randn(2, 8, device=DEV), torch.randn(4, 9, device=DEV))
    with pytest.raises(ValueError, match="odd"):
        skinny_gemm.skinny_matmul(torch.randn(2, 8, device=DEV), torch.randn(5, 8, device=DEV), gated=True)


def test_prefill_tiles_cover_every_chunk_once_longest_first() -> None:
    """The extend kernel's work list: each (sequence, query tile) exactly once, the tiles that see
    the most keys first, padding columns marked -1 (and a table too small refused)."""
    qlens, ctx = [130, 1, 64, 65], [130, 501, 100, 1000]
    tiles = paged_attention.prefill_tiles(qlens, ctx, 64, out=np.zeros((2, 12), np.int32))
    real = [(int(s), int(t)) for s, t in tiles.T if s >= 0]
    assert sorted(real) == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (3, 0), (3, 1)]
    assert (tiles[:, len(real):] == -1).all()
    keys = [min(c, c - q + (t + 1) * 64) for s, t in real for q, c in [(qlens[s], ctx[s])]]
    assert keys == sorted(keys, reverse=True)
    with pytest.raises(ValueError, match="do not fit"):
        paged_attention.prefill_tiles(qlens, ctx, 64, out=np.zeros((2, 6), np.int32))


def test_prefetch_budget_is_a_power_of_two_within_each_programs_tiles() -> None:
    from kernels import pdl, skinny_gemm

    saved = pdl.settings.prefetch_bytes
    try:
        pdl.settings.prefetch_bytes = 16 << 20
        tile = 64 * 128 * 2  # a bf16 weight tile of 64 rows x 128 columns
        assert skinny_gemm._prefetch_tiles(96, 32, tile) == 8  # qkv 6144 x 4096: 10 fit, rounded down
        assert skinny_gemm._prefetch_tiles(64, 32, tile) == 16  # o 4096 x 4096
        assert skinny_gemm._prefetch_tiles(4, 3, tile) == 2  # no more than the program's own tiles
        assert skinny_gemm._prefetch_tiles(224, 32, 2 * tile) == 2
        pdl.settings.prefetch_bytes = 0
        assert skinny_gemm._prefetch_tiles(1, 32, tile) == 0
    finally:
        pdl.settings.prefetch_bytes = saved
    assert pdl.launch(torch.device("cpu")) == {"USE_PDL": False}


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs a Hopper GPU")
def test_dependent_launches_in_a_graph_change_no_value() -> None:
    """Decode layers' kernel chain (norm, qkv, KV write with RoPE, split decode, o, norm, gated
    MLP, down), captured in a CUDA graph with programmatic dependent launch and weight prefetch,
    and with plain launches, replayed on two different inputs: bit-identical outputs and caches.
    A kernel that read its input before its predecessor wrote it would differ."""
    from kernels import pdl, skinny_gemm

    torch.manual_seed(0)
    dt, rows, hidden, heads, kv_heads, hd, inter, page, layers = torch.bfloat16, 8, 4096, 32, 8, 128, 14336, 16, 3
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    w = [{"qkv": (torch.randn((heads + 2 * kv_heads) * hd, hidden, device=DEV) / hidden**0.5).to(dt),
          "o": (torch.randn(hidden, heads * hd, device=DEV) / hidden**0.5).to(dt),
          "gu": (torch.randn(2 * inter, hidden, device=DEV) / hidden**0.5).to(dt),
          "down": (torch.randn(hidden, inter, device=DEV) / inter**0.5).to(dt),
          "n1": torch.rand(hidden, device=DEV).to(dt) + 0.5, "n2": torch.rand(hidden, device=DEV).to(dt) + 0.5}
         for _ in range(layers)]
    ctx = [700, 1, 33, 1024, 5, 300, 64, 999]
    kc0, vc0, table = _paged(ctx, page, kv_heads, hd, dt, seed=3)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    pos = lens.long() - 1
    slots = (table.long().gather(1, (pos // page)[:, None])[:, 0] * page + pos % page).contiguous()
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=DEV).float() / hd))
    freqs = torch.outer(torch.arange(2048, device=DEV).float(), inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    x_in = torch.empty(rows, hidden, dtype=dt, device=DEV)
    cfg = {k: skinny_gemm.config_for(n, kk, sms, gated=g) for k, n, kk, g in
           (("qkv", (heads + 2 * kv_heads) * hd, hidden, False), ("o", hidden, heads * hd, False),
            ("gu", inter, hidden, True), ("down", hidden, inter, False))}

    def forward(kc, vc):
        h, res = x_in, None
        for lw in w:
            x, res = fused_ops.add_rmsnorm(h, res, lw["n1"], 1e-5)
            q, k, v = skinny_gemm.skinny_matmul(x, lw["qkv"], cfg["qkv"]).split([heads * hd, kv_heads * hd, kv_heads * hd], -1)
            q = q.view(rows, heads, hd)
            cache_ops.write_kv(kc, vc, k.view(rows, kv_heads, hd), v.view(rows, kv_heads, hd), slots,
                               cache_ops.Rope(q, pos, cos, sin))
            o = paged_attention.paged_decode(q, kc, vc, table, lens, num_splits=4)
            h = skinny_gemm.skinny_matmul(o.view(rows, heads * hd), lw["o"], cfg["o"])
            x, res = fused_ops.add_rmsnorm(h, res, lw["n2"], 1e-5)
            h = skinny_gemm.skinny_matmul(skinny_gemm.skinny_matmul(x, lw["gu"], cfg["gu"], gated=True), lw["down"], cfg["down"])
        return h

    def run(enabled: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        saved = (pdl.settings.enabled, pdl.settings.prefetch_bytes)
        pdl.settings.enabled, pdl.settings.prefetch_bytes = enabled, 16 << 20
        try:
            kc, vc = kc0.clone(), vc0.clone()
            x_in.normal_(generator=torch.Generator(device=DEV).manual_seed(1))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                forward(kc, vc)  # compiles
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = forward(kc, vc)
            results = []
            for seed in (2, 3):
                kc.copy_(kc0)
                vc.copy_(vc0)
                x_in.normal_(generator=torch.Generator(device=DEV).manual_seed(seed))
                graph.replay()
                results.append((out.clone(), kc.clone()))
            torch.cuda.synchronize()
            return results
        finally:
            pdl.settings.enabled, pdl.settings.prefetch_bytes = saved

    plain, dependent = run(False), run(True)
    for (o1, k1), (o2, k2) in zip(plain, dependent):
        assert not torch.isnan(o1).any()
        assert torch.equal(o1, o2) and torch.equal(k1, k2)
    assert not torch.equal(plain[0][0], plain[1][0])  # the two inputs gave different outputs
