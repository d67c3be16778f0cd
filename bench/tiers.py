"""KV restore throughput from host RAM and from Redis against recomputing, by context length.

    python bench/tiers.py                 # CPU: SmolLM2-135M shape, dummy float32, to 32k tokens
    python bench/tiers.py --preset gpu    # one GPU: Llama-3-8B shape, dummy bf16, to 8k tokens

For each context length it times, in one process:
- recompute: the engine's time to first token for that prompt, cold (prefill of every token);
- host: restoring that many tokens' blocks from the host tier into the device cache through the
  mover's load path, the one requests take (on CUDA: block copies on the copy stream out of the
  pinned host slab, timed to the end of the last copy);
- redis: the mover's fetch (pipelined over parallel sockets, checksums checked, each value read
  straight into a pinned host-tier slot) plus the copies into the device cache.
It reports each as seconds and GB/s, the host restore against the pinned host-to-device bandwidth
measured in the same run (GPU), and the crossover: the shortest context from which a restore beats
recomputing at every longer context measured. Recompute is measured up to --max-recompute tokens;
past that it is reported as a lower bound (the rate at the cap applied linearly). Without
--redis-url it starts redis-server on a free loopback port. Writes bench/results/tiers[-gpu].json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Page-lock the host tier's slab in parallel threads (tens of GiB take a while on one).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "pinned_use_cuda_host_register:True,pinned_num_register_threads:8")

import torch  # noqa: E402

from bench.agents import start_redis  # noqa: E402
from runtime import LLM, SamplingParams  # noqa: E402

SMOLLM2_32K = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_theta": 100000.0, "initializer_range": 0.02, "eos_token_id": 2, "bos_token_id": 1,
}
LLAMA3_8B = Path(__file__).parent / "configs" / "llama-3-8b.json"


def pinned_h2d_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of one large copy from pinned host memory to the device (median of 5)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(6):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return nbytes / statistics.median(times[1:])


def redis_sweep(url: str, fmt: Any, pin: bool, blocks: int = 256) -> list[dict[str, Any]]:
    """Block reads into pinned rows by number of sockets, and the server's own GET rate for
    values of one block (redis-benchmark, when installed): where the Redis tier's time goes."""
    from kvstore.redis_tier import RedisTier

    rows = torch.empty((blocks, fmt.payload_bytes), dtype=torch.uint8, pin_memory=pin)
    rows.random_(0, 255)
    keys = [os.urandom(16) for _ in range(blocks)]
    out = []
    for conns in (1, 2, 4, 8, 16):
        tier = RedisTier(url, fmt, connections=conns, pin=pin)
        if conns == 1:
            tier.put_many([(k, rows[i].view(fmt.dtype).view(fmt.shape)) for i, k in enumerate(keys)])
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            assert all(tier.get_into(keys, list(rows)))
            best = min(best, time.perf_counter() - t0)
        out.append({"connections": conns, "GBps": blocks * fmt.payload_bytes / best / 1e9})
        print(f"redis sweep: {conns:2d} sockets {out[-1]['GBps']:.2f} GB/s", flush=True)
        tier.close()
    exe = shutil.which("redis-benchmark")
    if exe is not None and url.startswith("unix://"):
        for clients in (1, 8):
            res = subprocess.run([exe, "-s", url.removeprefix("unix://"), "-t", "set,get", "-d", str(fmt.payload_bytes),
                                  "-n", "400", "-c", str(clients), "-P", "4", "-q"], capture_output=True, text=True, timeout=60)
            rps = [float(w) for line in res.stdout.splitlines() if line.startswith("GET")
                   for w in line.replace(":", " ").split() if w.replace(".", "").isdigit()]
            if rps:
                out.append({"redis_benchmark_clients": clients, "GBps": rps[0] * fmt.payload_bytes / 1e9})
                print(f"redis-benchmark GET, {clients} clients: {out[-1]['GBps']:.2f} GB/s", flush=True)
    return out


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--lengths", default=None, help="context lengths (default: to 32768 on CPU, 8192 on GPU)")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--redis-connections", type=int, default=2)
    ap.add_argument("--max-recompute", type=int, default=None)
    ap.add_argument("--redis-sweep", action="store_true", help="also: block reads by socket count, and redis-benchmark")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gpu = args.preset == "gpu"
    lengths = [int(x) for x in (args.lengths or ("256,512,1024,2048,4096,8192" if gpu else
                                                   "256,512,1024,2048,4096,8192,16384,32768")).split(",")]
    max_recompute = args.max_recompute or (8192 if gpu else 8192)
    proc = None
    url = args.redis_url
    if url is None:
        proc, url = start_redis(64.0)
    if gpu:
        model, kw = str(LLAMA3_8B), dict(device="cuda", dtype="bfloat16")
    else:
        cfg_dir = Path(tempfile.mkdtemp())
        (cfg_dir / "config.json").write_text(json.dumps(SMOLLM2_32K))
        model, kw = str(cfg_dir / "config.json"), {}
    try:
        max_len = max(lengths)
        bw = pinned_h2d_bandwidth() if gpu else None
        c = json.loads(Path(model).read_text())
        per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * (2 if gpu else 4)
        llm = LLM(model, load_format="dummy", num_blocks=max_len // 16 + 64, host_cache_gib=max_len * per_token * 1.05 / 2**30,
                  redis_url=url, write_policy="write_back", redis_connections=args.redis_connections,
                  max_num_batched_tokens=max(2048, max_len), **kw)
        engine = llm.engine
        kv = engine.kv_cache.data
        cuda = kv.is_cuda
        block_bytes = engine.kv_cache.bytes_per_block
        rows = []
        for L in lengths:
            mover = engine.mover  # (a new one after each reset)
            assert mover is not None and mover.host is not None and mover.redis is not None
            n = L // 16
            hashes = [os.urandom(16) for _ in range(n)]
            ids = list(range(n))
            # Random content (restores must move real bytes), written down to host by the
            # mover's own demote path and to Redis by the tier's writer path.
            kv[:n].uniform_(-1, 1) if cuda else kv[:n].normal_()
            expect = kv[n - 1].clone()
            for h, i in zip(hashes, ids):
                mover.demote(h, i)
            mover.synchronize()
            t0 = time.perf_counter()
            mover.redis.put_many([(h, mover.host.get_many([h])[0]) for h in hashes])  # type: ignore[misc]
            put_s = time.perf_counter() - t0
            kv[:n].zero_()
            sync(cuda)
            t0 = time.perf_counter()
            loaded = mover.load("bench", [(h, "host") for h in hashes], ids)
            mover.synchronize()
            host_s = time.perf_counter() - t0
            assert loaded == n and torch.equal(kv[n - 1], expect)
            kv[:n].zero_()
            sync(cuda)
            mover.host.clear()  # so the blocks can only come from Redis
            t0 = time.perf_counter()
            mover.start_fetch("bench", hashes)  # the engine's path: into pinned host slots, then copied in
            while not mover.poll():
                time.sleep(0.0002)
            span = mover.lower_match("bench", hashes)
            loaded = mover.load("bench", span, ids)
            mover.synchronize()
            redis_s = time.perf_counter() - t0
            assert loaded == n and all(t == "redis" for _, t in span) and torch.equal(kv[n - 1], expect)
            mover.redis.delete_many(hashes)
            mover.host.clear()
            measured = L <= max_recompute
            if measured:
                prompt = torch.randint(3, 32000, (L - 1,)).tolist()
                llm.generate([prompt[:64]], SamplingParams(max_tokens=1))  # warm
                sync(cuda)
                t0 = time.perf_counter()
                llm.generate([prompt], SamplingParams(max_tokens=1))
                sync(cuda)
                recompute_s = time.perf_counter() - t0
                rate = L / recompute_s
                engine.reset()  # drop the prompt's cached blocks (and their host copies)
            else:
                recompute_s = L / rate  # lower bound from the last measured rate
            nbytes = n * block_bytes
            row: dict[str, Any] = {
                "tokens": L, "bytes": nbytes, "recompute_s": recompute_s, "recompute_measured": measured,
                "host_s": host_s, "redis_s": redis_s, "redis_put_s": put_s,
                "host_GBps": nbytes / host_s / 1e9, "redis_GBps": nbytes / redis_s / 1e9,
                "redis_put_GBps": nbytes / put_s / 1e9, "recompute_tok_s": L / recompute_s}
            if bw:
                row["host_of_pinned_bw"] = nbytes / host_s / bw
            rows.append(row)
            of_pinned = f", {row['host_of_pinned_bw']:.0%} of pinned" if bw else ""
            print(f"{L:>6} tokens {nbytes / 2**20:8.1f} MiB  recompute {'' if measured else '>'}{recompute_s:8.4f}s  "
                  f"host {host_s:7.4f}s ({row['host_GBps']:.2f} GB/s{of_pinned})  "
                  f"redis {redis_s:7.4f}s ({row['redis_GBps']:.2f} GB/s; put {row['redis_put_GBps']:.2f})", flush=True)
        redis_tier = engine.mover.redis if engine.mover is not None else None
        assert redis_tier is not None
        sweep = redis_sweep(url, redis_tier.fmt, cuda) if args.redis_sweep else []
        # From the crossover on, the restore beats recompute at every longer context measured.
        cross = {t: next((r["tokens"] for i, r in enumerate(rows)
                          if all(x[f"{t}_s"] < x["recompute_s"] for x in rows[i:])), None) for t in ("host", "redis")}
        print("crossover (the restore beats recompute from this context on; None: not at the longest):", cross)
        if bw:
            print(f"pinned host-to-device bandwidth: {bw / 1e9:.1f} GB/s")
        meta = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "block_bytes": block_bytes, "pinned_h2d_Bps": bw, "redis_connections": args.redis_connections,
                "card": torch.cuda.get_device_name() if cuda else None,
                "model": "Llama-3-8B shape, dummy bf16" if gpu else "SmolLM2-135M shape, dummy float32 weights, 32k context"}
        out = Path(args.out) if args.out else Path(__file__).parent / "results" / ("tiers-gpu.json" if gpu else "tiers.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows, "crossover": cross, "redis_sweep": sweep}, indent=2))
        llm.close()
    finally:
        if proc is not None:
            proc.kill()


if __name__ == "__main__":
    main()
