"""Building the KV tiers for an engine and calibrating the restore-or-recompute cost model."""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

import torch

from kvstore.cost_model import CostModel
from kvstore.mover import TierMover
from kvstore.redis_tier import BlockFormat, RedisTier
from kvstore.tiers import HostTier
from runtime.config import EngineConfig, ModelConfig
from runtime.kv_cache import PagedKVCache

log = logging.getLogger("ember.tiers")


def _measure_host_bandwidth(kv: PagedKVCache, host: HostTier | None) -> float:
    """Bytes/s of device -> host block copies (the slower of the two directions on a GPU host)."""
    n = min(8, kv.num_blocks)
    scratch = torch.empty_like(kv.data[:n], device="cpu", pin_memory=host is not None and host.slab.is_pinned())
    scratch.copy_(kv.data[:n])  # warm-up (first-touch page faults)
    t0 = time.perf_counter()
    for _ in range(3):
        scratch.copy_(kv.data[:n])
    if kv.data.is_cuda:
        torch.cuda.synchronize()
    return 3 * n * kv.bytes_per_block / (time.perf_counter() - t0)


def _measure_redis(redis: RedisTier, block_shape: tuple[int, ...], dtype: torch.dtype) -> tuple[float, float]:
    """(bytes/s of pipelined block reads, round-trip latency in s) against the live server."""
    hashes = [os.urandom(16) for _ in range(4)]
    block = torch.randn(block_shape).to(dtype)
    redis.put_many([(h, block) for h in hashes])
    t0 = time.perf_counter()
    got = redis.get_many(hashes)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    redis.contains_many(hashes[:1])
    rtt = time.perf_counter() - t1
    redis.delete_many(hashes)
    # Calibration traffic is not workload traffic.
    redis.stats.hits = redis.stats.misses = redis.stats.writes = 0
    redis.stats.bytes_read = redis.stats.bytes_written = 0
    if any(g is None for g in got) or dt <= 0:
        return 0.0, rtt
    return len(hashes) * redis.fmt.payload_bytes / dt, rtt


def build_tiers(
    cfg: EngineConfig,
    mcfg: ModelConfig,
    kv: PagedKVCache,
    fingerprint: str,
    profile_prefill: Callable[[], float],
) -> tuple[TierMover | None, bytes]:
    """The tier mover (None without tiers) and the block-hash secret (shared through Redis when
    it is reachable, so restarted servers and replicas compute the same hashes)."""
    t = cfg.tiers
    secret = cfg.kv_secret
    if not cfg.cache.enable_prefix_caching or (t.host_cache_gib <= 0 and t.redis_url is None):
        return None, secret
    dtype = kv.data.dtype
    block_shape = tuple(kv.data.shape[1:])
    host = None
    if t.host_cache_gib > 0:
        host = HostTier(int(t.host_cache_gib * 2**30), block_shape, dtype, pin=kv.data.is_cuda)
    redis = None
    if t.redis_url is not None:
        fmt = BlockFormat(fingerprint, mcfg.num_layers, mcfg.num_kv_heads, mcfg.head_dim, kv.block_size, dtype)
        redis = RedisTier(t.redis_url, fmt, t.redis_ttl_s, t.redis_timeout_s, t.redis_retry_interval_s,
                          connections=t.redis_connections, pin=kv.data.is_cuda)
        shared = redis.shared_secret(secret)
        if shared is None:
            log.warning("Redis unreachable at start: block hashes use a local secret, so blocks written "
                        "by other servers will not be found")
        else:
            secret = shared
    bandwidth: dict[str, float] = {"host": t.host_bandwidth or _measure_host_bandwidth(kv, host)}
    latency: dict[str, float] = {"host": 0.0}
    if redis is not None:
        if t.redis_bandwidth is not None:
            bandwidth["redis"], latency["redis"] = t.redis_bandwidth, 0.0
        elif redis.available:
            bandwidth["redis"], latency["redis"] = _measure_redis(redis, block_shape, dtype)
        else:
            bandwidth["redis"], latency["redis"] = 1e9, 1e-3  # a guess until transfers are observed
    fixed = frozenset(k for k, v in (("host", t.host_bandwidth), ("redis", t.redis_bandwidth)) if v is not None)
    cost = CostModel(
        bytes_per_token=kv.bytes_per_block // kv.block_size,
        prefill_tokens_per_s=profile_prefill(),
        bandwidth=bandwidth,
        latency_s=latency,
        fixed=fixed,
    )
    log.info("KV tiers: host=%s redis=%s cost=%s", host is not None, t.redis_url, cost)
    offload = None if t.host_offload == "auto" else t.host_offload == "compute"
    mover = TierMover(kv.data, host, redis, cost, t.write_through, t.max_pending_write_mib << 20, offload)
    return mover, secret
