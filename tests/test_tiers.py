"""KV tiers: host RAM and a real Redis under the device pool.

Greedy continuations stay token-identical (float32, CPU) when the prefix comes from the device,
host RAM or Redis; faults (Redis stopping, pausing, corrupt values) never fail a request; every
path is shown to have been taken through the per-tier counts."""
from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

from kvstore.cost_model import CostModel
from kvstore.redis_tier import BlockFormat, CorruptBlock
from kvstore.tiers import HostTier
from runtime import LLM, SamplingParams
from tests.redis_util import RedisServer, redis_server, start_cluster  # noqa: F401 (fixture)
from tests.reference import Reference, assert_matches, reference

NEW = 16
FAST = dict(redis_bandwidth=1e12, host_bandwidth=1e12)  # tiny models recompute so fast that only
# a fixed, generous bandwidth makes the cost model choose loading; calibration is tested on SmolLM2.


def _rand(n: int, seed: int, vocab: int = 320) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=NEW, temperature=0, output_logits=True)


def _full_blocks(prompt: list[int]) -> int:
    return (len(prompt) - 1) // 16 * 16


@pytest.fixture(scope="module")
def tiny_ref(tiny_llama_dir: Path) -> Reference:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype="float32").eval()
    return reference(hf, _rand(100, seed=42), NEW)


# ---- units --------------------------------------------------------------------------------
def test_host_tier_is_bounded_lru_and_hands_evictions_down() -> None:
    evicted: list[bytes] = []
    shape = (2, 2, 4, 1, 8)
    per_block = 2 * 2 * 4 * 8 * 4
    host = HostTier(3 * per_block + 10, shape, torch.float32, on_evict=lambda h, t, slot: evicted.append(h) is not None)
    assert host.num_slots == 3
    blocks = {bytes([i]) * 16: torch.full(shape, float(i)) for i in range(5)}
    keys = list(blocks)
    host.put_many([(k, blocks[k]) for k in keys[:3]])
    host.get_many([keys[0]])  # keys[0] becomes most recently used
    host.put_many([(k, blocks[k]) for k in keys[3:]])
    assert evicted == [keys[1], keys[2]]
    assert len(host) == 3 and host.contains_many(keys) == [True, False, False, True, True]
    got = host.get_many([keys[0], keys[4]])
    assert torch.equal(got[0], blocks[keys[0]]) and torch.equal(got[1], blocks[keys[4]])
    host.check_integrity()


def test_block_format_detects_every_kind_of_damage() -> None:
    fmt = BlockFormat("model-a", num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
    block = torch.randn(fmt.shape)
    data = bytes(fmt.encode(block))
    assert torch.equal(fmt.decode(data), block)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    other = BlockFormat("model-b", 2, 2, 8, 4, torch.float32)
    for bad, why in ((bytes(flipped), "checksum"), (data[: len(data) // 2], "payload"), (data[:10], "shorter"),
                     (bytes(other.encode(block)), "another model"), (b"junk" * 30, "magic")):
        with pytest.raises(CorruptBlock, match=why):
            fmt.decode(bad)
    bf16 = BlockFormat("model-a", 2, 2, 8, 4, torch.bfloat16)
    b16 = torch.randn(bf16.shape).to(torch.bfloat16)
    assert torch.equal(bf16.decode(bytes(bf16.encode(b16))), b16)


@pytest.mark.parametrize("connections", [1, 4])
def test_block_client_round_trips_in_order_over_parallel_sockets(redis_server: RedisServer, connections: int) -> None:
    """The RESP block client: values read straight into the staging rows, split over sockets,
    misses and wrong-length values reported in place, and a server restart survived."""
    from kvstore.redis_tier import RedisTier

    fmt = BlockFormat("model-a", num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.bfloat16)
    tier = RedisTier(redis_server.url, fmt, connections=connections)
    keys = [bytes([i]) * 16 for i in range(37)]
    blocks = {k: torch.randn(fmt.shape).to(torch.bfloat16) for k in keys}
    assert tier.put_many(list(blocks.items())) == 37
    missing = b"\xff" * 16
    redis_server.client().set(tier.key(keys[5]), b"short")
    got = tier.get_many(keys[:10] + [missing] + keys[10:])
    assert got[5] is None and got[10] is None and tier.stats.corrupt == 1 and tier.stats.misses == 1
    for k, g in zip(keys[:5] + keys[6:10] + keys[10:], got[:5] + got[6:10] + got[11:]):
        assert g is not None and torch.equal(g, blocks[k])
    redis_server.stop()
    redis_server.start()
    tier.put_many([(keys[0], blocks[keys[0]])])  # kept-open sockets found dead, reopened
    assert tier.available and torch.equal(tier.get_many([keys[0]])[0], blocks[keys[0]])  # type: ignore[arg-type]
    tier.close()


def test_cost_model_prefers_the_faster_path() -> None:
    cost = CostModel(bytes_per_token=1000, prefill_tokens_per_s=1000.0, bandwidth={"host": 1e9, "redis": 1e3},
                     latency_s={"redis": 1e-3})
    assert cost.should_load("host", 256)  # 0.26 ms against 256 ms
    assert not cost.should_load("redis", 256)  # 256 s against 256 ms
    cost.observe_load("redis", 10**9, 1.0)  # a fast transfer moves the estimate
    assert cost.bandwidth["redis"] > 1e8 and cost.should_load("redis", 256)


# ---- the real model through each tier -----------------------------------------------------
@pytest.fixture(scope="module")
def smol_case(smol_hf, smol_prompts) -> Reference:
    return reference(smol_hf, smol_prompts[4], NEW)


@pytest.mark.parametrize("offload", ["evict", "compute"])
def test_prefix_from_host_is_identical(smol_case: Reference, offload: str) -> None:
    ref = smol_case
    llm = LLM("smollm2-135m", num_blocks=24, host_offload=offload)
    (cold,) = llm.generate([ref.prompt], _params())
    assert_matches(cold, ref, "cold")
    mover = llm.engine.mover
    assert mover is not None
    # Offloaded as computed, or not yet (demoted when evicted).
    assert (mover.stats.offloaded_to_host > 0) == (offload == "compute")
    for seed in (1, 2):  # evict the prompt's blocks from the device
        llm.generate([_rand(300, seed, vocab=49152)], SamplingParams(max_tokens=1))
    (warm,) = llm.generate([ref.prompt], _params())
    assert warm.cache == {"gpu": 0, "host": _full_blocks(ref.prompt), "redis": 0,
                          "recomputed": len(ref.prompt) - _full_blocks(ref.prompt)}
    assert_matches(warm, ref, f"restored from host (offload on {offload})")
    # Blocks offloaded when computed need no copy when evicted.
    assert (mover.stats.demoted_to_host > 0) == (offload == "evict")
    assert mover.stats.loaded_bytes["host"] == _full_blocks(ref.prompt) // 16 * mover.block_bytes  # type: ignore[index]
    llm.engine.check_integrity()


def test_prefix_from_redis_is_identical_in_a_new_engine(smol_case: Reference, redis_server: RedisServer) -> None:
    ref = smol_case
    first = LLM("smollm2-135m", redis_url=redis_server.url)
    (out,) = first.generate([ref.prompt], _params())
    assert_matches(out, ref, "cold with write-through")
    first.close()
    # A second engine (its own random secret, replaced by the one kept in Redis) finds the blocks.
    second = LLM("smollm2-135m", redis_url=redis_server.url)
    assert second.engine.kv_secret == first.engine.kv_secret
    (out,) = second.generate([ref.prompt], _params())
    assert out.cache == {"gpu": 0, "host": 0, "redis": _full_blocks(ref.prompt),
                         "recomputed": len(ref.prompt) - _full_blocks(ref.prompt)}
    assert_matches(out, ref, "restored from Redis")
    second.engine.check_integrity()
    second.close()


# ---- faults -------------------------------------------------------------------------------
def _write_prompt(tiny_llama_dir: Path, url: str, prompt: list[int]) -> LLM:
    llm = LLM(str(tiny_llama_dir), redis_url=url, **FAST)
    llm.generate([prompt], SamplingParams(max_tokens=1))
    llm.close()
    return llm


@pytest.mark.parametrize("damage", ["overwritten", "truncated", "other_fingerprint"])
def test_corrupt_redis_blocks_are_discarded_and_recomputed(
    damage: str, tiny_llama_dir: Path, tiny_ref: Reference, redis_server: RedisServer
) -> None:
    writer = _write_prompt(tiny_llama_dir, redis_server.url, tiny_ref.prompt)
    redis = writer.engine.mover.redis  # type: ignore[union-attr]
    chain: list[bytes] = []
    writer.engine.hasher("default").extend(chain, tiny_ref.prompt)
    key = redis.key(chain[2])
    r = redis_server.client()
    value = r.get(key)
    assert value is not None
    if damage == "overwritten":
        damaged = bytearray(value)
        damaged[len(damaged) // 2 : len(damaged) // 2 + 8] = b"\x00\xff" * 4
        r.set(key, bytes(damaged))
    elif damage == "truncated":
        r.set(key, value[: len(value) - 100])
    else:
        other = BlockFormat("another-model", *[getattr(redis.fmt, f) for f in ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype")])
        r.set(key, bytes(other.encode(redis.fmt.decode(value))))
    reader = LLM(str(tiny_llama_dir), redis_url=redis_server.url, **FAST)
    (out,) = reader.generate([tiny_ref.prompt], _params())
    assert out.cache["redis"] == 2 * 16 and out.cache["recomputed"] == len(tiny_ref.prompt) - 32
    assert reader.engine.mover.redis.stats.corrupt == 1  # type: ignore[union-attr]
    assert_matches(out, tiny_ref, f"{damage} block recomputed")
    reader.engine.check_integrity()
    reader.close()


def test_low_redis_bandwidth_makes_the_cost_model_recompute(
    tiny_llama_dir: Path, tiny_ref: Reference, redis_server: RedisServer
) -> None:
    _write_prompt(tiny_llama_dir, redis_server.url, tiny_ref.prompt)
    llm = LLM(str(tiny_llama_dir), redis_url=redis_server.url, redis_bandwidth=1.0)
    (out,) = llm.generate([tiny_ref.prompt], _params())
    assert out.cache == {"gpu": 0, "host": 0, "redis": 0, "recomputed": len(tiny_ref.prompt)}
    assert llm.engine.mover.stats.fetches == 0  # type: ignore[union-attr]
    assert_matches(out, tiny_ref, "recomputed by choice")
    llm.close()


def test_redis_going_away_mid_workload_fails_no_request(tiny_llama_dir: Path, redis_server: RedisServer) -> None:
    llm = LLM(str(tiny_llama_dir), redis_url=redis_server.url, redis_retry_interval_s=0.2, **FAST)
    engine = llm.engine
    reqs = [engine.add_request(_rand(60 + 10 * i, seed=100 + i), SamplingParams(max_tokens=40, ignore_eos=True)) for i in range(6)]
    for _ in range(5):
        engine.step()
    redis_server.stop()
    reqs.append(engine.add_request(_rand(80, seed=200), SamplingParams(max_tokens=40, ignore_eos=True)))
    while engine.has_unfinished:
        engine.step()
    assert all(len(r.output_token_ids) == 40 for r in reqs)
    redis = engine.mover.redis  # type: ignore[union-attr]
    engine.mover.flush()  # type: ignore[union-attr]
    assert redis.stats.outages >= 1 and not redis.available
    # Back on the same port: after the retry interval the tier is used again.
    redis_server.start()
    time.sleep(0.3)
    llm.generate([_rand(90, seed=300)], SamplingParams(max_tokens=4))
    engine.mover.flush()  # type: ignore[union-attr]
    assert redis.available
    assert redis_server.client().dbsize() > 0
    reader = LLM(str(tiny_llama_dir), redis_url=redis_server.url, **FAST)
    (out,) = reader.generate([_rand(90, seed=300)], SamplingParams(max_tokens=4))
    assert out.cache["redis"] == _full_blocks(_rand(90, seed=300))
    engine.check_integrity()
    llm.close()
    reader.close()


def test_paused_redis_never_stalls_decode(tiny_llama_dir: Path, tiny_ref: Reference, redis_server: RedisServer) -> None:
    _write_prompt(tiny_llama_dir, redis_server.url, tiny_ref.prompt)
    llm = LLM(str(tiny_llama_dir), redis_url=redis_server.url, load_timeout_s=0.5, **FAST)
    engine = llm.engine
    runner = engine.add_request(_rand(20, seed=7), SamplingParams(max_tokens=1800, ignore_eos=True))
    for _ in range(3):
        engine.step()
    redis_server.client().execute_command("CLIENT", "PAUSE", 2000, "ALL")
    t0 = time.monotonic()
    before = runner.num_output_tokens
    # A request whose prefix is in Redis arrives during the pause: its fetch blocks, it waits at
    # most load_timeout_s, then recomputes.
    late = engine.add_request(tiny_ref.prompt, _params())
    outs = []
    while time.monotonic() - t0 < 1.5:
        outs += [o for o in engine.step() if o.request_id == late.request_id and o.finished]
    assert runner.num_output_tokens - before >= 50, "decode stalled while Redis was paused"
    assert outs and outs[0].cache["redis"] == 0
    assert_matches(outs[0], tiny_ref, "recomputed after a fetch timeout")
    assert engine.mover.stats.fetch_timeouts == 1  # type: ignore[union-attr]
    engine.abort(runner.request_id)
    engine.check_integrity()
    llm.close()


def test_redis_cluster_url(tiny_llama_dir: Path, tiny_ref: Reference, tmp_path: Path) -> None:
    nodes = start_cluster(tmp_path / "cluster")
    try:
        url = f"redis+cluster://127.0.0.1:{nodes[0].port}"
        _write_prompt(tiny_llama_dir, url, tiny_ref.prompt)
        assert sum(1 for n in nodes if n.client().dbsize() > 0) >= 2  # keys spread over the shards
        llm = LLM(str(tiny_llama_dir), redis_url=url, **FAST)
        (out,) = llm.generate([tiny_ref.prompt], _params())
        assert out.cache["redis"] == _full_blocks(tiny_ref.prompt)
        assert_matches(out, tiny_ref, "restored from a Redis cluster")
        llm.close()
    finally:
        for n in nodes:
            n.stop()


def test_capacity_bounds_and_write_back(tiny_llama_dir: Path, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "small", None, "--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru").start()
    try:
        block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # tiny llama: layers, K/V, block, kv heads, head dim, fp32
        llm = LLM(str(tiny_llama_dir), num_blocks=16, host_cache_gib=20 * block_bytes / 2**30,
                  redis_url=server.url, write_policy="write_back", **FAST)
        engine = llm.engine
        mover = engine.mover
        assert mover is not None and mover.host is not None and mover.host.num_slots == 20
        llm.generate([_rand(100, seed=1)], SamplingParams(max_tokens=1))
        mover.flush()
        assert server.client().dbsize() == 1  # write-back: nothing but the secret until evictions
        for seed in range(2, 80):
            llm.generate([_rand(200, seed=seed)], SamplingParams(max_tokens=1))
            assert engine.kv_manager.pool.num_free <= 16
            assert len(mover.host) <= mover.host.num_slots
        mover.flush()
        assert mover.host.num_evictions > 0 and mover.stats.written_to_redis > 0
        info = server.client().info("memory")
        assert info["used_memory"] <= info["maxmemory"] * 1.05
        engine.check_integrity()
        # Without the Redis tier the same host slab evicts to nowhere: no slot is lent out.
        engine.reset(redis=False)
        for seed in range(80, 100):
            llm.generate([_rand(200, seed=seed)], SamplingParams(max_tokens=1))
        assert mover.host.num_lent == 0 and len(mover.host) == mover.host.num_slots
        engine.check_integrity()
        llm.close()
    finally:
        server.stop()


def test_redis_unreachable_at_start_serves_by_recompute(tiny_llama_dir: Path, tiny_ref: Reference, tmp_path: Path, caplog) -> None:
    from tests.redis_util import free_port

    port = free_port()  # nothing listens there yet
    llm = LLM(str(tiny_llama_dir), redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.5,
              redis_retry_interval_s=0.2, **FAST)
    redis = llm.engine.mover.redis  # type: ignore[union-attr]
    assert not redis.available and redis.stats.outages == 1
    assert any("unavailable" in r.message for r in caplog.records)
    (out,) = llm.generate([tiny_ref.prompt], _params())
    assert_matches(out, tiny_ref, "Redis down from the start")
    # Redis appears later on that port: the tier starts being used.
    server = RedisServer(tmp_path / "late", port).start()
    try:
        time.sleep(0.3)
        llm.generate([_rand(70, seed=900)], SamplingParams(max_tokens=2))
        llm.engine.mover.flush()  # type: ignore[union-attr]
        assert redis.available and server.client().dbsize() > 0
    finally:
        llm.close()
        server.stop()


def test_block_client_over_a_unix_socket_with_auth_and_db(tmp_path: Path) -> None:
    """unix:// URLs, AUTH and SELECT at connect; a wrong password is an outage (counted, every
    read a miss), not an exception."""
    from kvstore.redis_tier import RedisTier

    sock = tmp_path / "r.sock"
    server = RedisServer(tmp_path / "redis", None, "--unixsocket", str(sock), "--unixsocketperm", "700").start()
    try:
        fmt = BlockFormat("model-a", num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
        block = torch.randn(fmt.shape)
        admin = server.client()
        admin.config_set("requirepass", "s3cret")
        good = RedisTier(f"unix://:s3cret@{sock}?db=3", fmt, connections=2)
        assert good.available and good.put_many([(b"k" * 16, block)]) == 1
        got = good.get_many([b"k" * 16])[0]
        assert got is not None and torch.equal(got, block)
        admin.execute_command("AUTH", "s3cret")
        assert admin.execute_command("SELECT", 3) and admin.dbsize() == 1  # it went to db 3
        bad = RedisTier(f"unix://:wrong@{sock}?db=3", fmt, connections=2, retry_interval_s=0.0)
        errors = bad.stats.errors  # (its start-up ping already failed)
        assert bad.get_many([b"k" * 16]) == [None]  # the block client's AUTH is refused
        assert not bad.available and bad.stats.errors == errors + 1
        good.close()
        bad.close()
    finally:
        server.stop()
