"""KV restore throughput from host RAM and from Redis against recomputing, by context length.

    python bench/tiers.py [--lengths 256,512,...,32768] [--redis-url URL]

Model: the SmolLM2-135M architecture with dummy weights and a 32k context (46 KiB of float32 KV a
token). For each context length it times, in one process:
- recompute: the engine's time to first token for that prompt, cold (prefill of every token);
- host: restoring that many tokens' blocks from the host tier into the device cache (the mover's
  load path, the one requests take);
- redis: a pipelined fetch of the blocks from Redis (decode and checksum included) plus the copy
  into the device cache.
It reports each as seconds and GB/s, and the crossover: the shortest context from which a restore
beats recomputing. Recompute is measured up to --max-recompute tokens; past that (a 2-core CPU
needs over an hour for 32k) it is reported as a lower bound, the measured rate at the cap applied
linearly (prefill cost grows at least linearly with the context). Without --redis-url it starts redis-server on a free loopback port.
Writes bench/results/tiers.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import LLM, SamplingParams  # noqa: E402

SMOLLM2_32K = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_theta": 100000.0, "initializer_range": 0.02, "eos_token_id": 2, "bos_token_id": 1,
}


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server not found: run `make setup`, or pass --redis-url")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="256,512,1024,2048,4096,8192,16384,32768")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--max-recompute", type=int, default=8192)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tiers.json"))
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    proc = None
    url = args.redis_url
    if url is None:
        proc, url = start_redis()
    cfg_dir = Path(tempfile.mkdtemp())
    (cfg_dir / "config.json").write_text(json.dumps(SMOLLM2_32K))
    try:
        max_len = max(lengths)
        llm = LLM(str(cfg_dir / "config.json"), load_format="dummy", num_blocks=max_len // 16 + 64,
                  host_cache_gib=max_len * 46080 * 1.1 / 2**30, redis_url=url, write_policy="write_back")
        engine = llm.engine
        mover = engine.mover
        assert mover is not None and mover.host is not None and mover.redis is not None
        block_bytes = mover.block_bytes
        rows = []
        for L in lengths:
            n = L // 16
            hashes = [os.urandom(16) for _ in range(n)]
            ids = list(range(n))
            # Random content: restores must move real bytes, not a page of zeros.
            src = torch.randn(n, *engine.kv_cache.data.shape[1:], dtype=engine.kv_cache.data.dtype)
            mover.host.put_many(list(zip(hashes, src)))
            t0 = time.perf_counter()
            loaded = mover.load("bench", [(h, "host") for h in hashes], ids)
            host_s = time.perf_counter() - t0
            assert loaded == n and torch.equal(engine.kv_cache.data[n - 1], src[n - 1])
            mover.redis.put_many(list(zip(hashes, src)))
            t0 = time.perf_counter()
            got = mover.redis.get_many(hashes)
            for i, blk in zip(ids, got):
                assert blk is not None
                engine.kv_cache.data[i].copy_(blk)
            redis_s = time.perf_counter() - t0
            mover.redis.delete_many(hashes)
            for h in hashes:  # leave the host tier empty for the next length
                mover.host._index.pop(h, None)
            mover.host._free = list(range(mover.host.num_slots - 1, -1, -1))
            measured = L <= args.max_recompute
            if measured:
                prompt = torch.randint(3, 49152, (L - 1,)).tolist()
                t0 = time.perf_counter()
                llm.generate([prompt], SamplingParams(max_tokens=1))
                recompute_s = time.perf_counter() - t0
                rate = L / recompute_s
            else:
                recompute_s = L / rate  # lower bound from the last measured rate
            nbytes = n * block_bytes
            row = {"tokens": L, "bytes": nbytes, "recompute_s": recompute_s, "recompute_measured": measured,
                   "host_s": host_s, "redis_s": redis_s,
                   "host_GBps": nbytes / host_s / 1e9, "redis_GBps": nbytes / redis_s / 1e9,
                   "recompute_tok_s": L / recompute_s}
            rows.append(row)
            print(f"{L:>6} tokens {nbytes / 2**20:8.1f} MiB  recompute {'' if measured else '>'}{recompute_s:8.3f}s  "
                  f"host {host_s:7.4f}s ({row['host_GBps']:.2f} GB/s)  redis {redis_s:7.4f}s ({row['redis_GBps']:.2f} GB/s)",
                  flush=True)
        cross = {t: next((r["tokens"] for r in rows if r[f"{t}_s"] < r["recompute_s"]), None) for t in ("host", "redis")}
        print("crossover (shortest context where the restore beats recompute):", cross)
        meta = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "block_bytes": block_bytes, "model": "SmolLM2-135M shape, dummy float32 weights, 32k context"}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "crossover": cross}, indent=2))
        llm.close()
    finally:
        if proc is not None:
            proc.kill()


if __name__ == "__main__":
    main()
