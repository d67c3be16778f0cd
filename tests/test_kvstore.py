"""The block pool, the cache manager and the block hashes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from kvstore.block_pool import BlockPool
from kvstore.cache_manager import KVCacheManager
from kvstore.hashing import BlockHasher, model_fingerprint, tenant_salt

BS = 4
FP = model_fingerprint("llama", "cfg", "weights", "float32", BS)


def hasher(tenant: str = "t", secret: bytes = b"s" * 32) -> BlockHasher:
    return BlockHasher.create(FP, tenant_salt(secret, tenant), BS)


def test_hash_chain_matches_the_documented_formula() -> None:
    import numpy as np
    import xxhash

    h = hasher()
    toks = list(range(10))
    chain: list[bytes] = []
    h.extend(chain, toks)
    assert len(chain) == 2  # two full blocks of four; the last two tokens are not hashed
    root = xxhash.xxh3_128_digest(FP.encode() + tenant_salt(b"s" * 32, "t"))
    b0 = xxhash.xxh3_128_digest(root + np.array([0, 1, 2, 3], "<u4").tobytes())
    b1 = xxhash.xxh3_128_digest(b0 + np.array([4, 5, 6, 7], "<u4").tobytes())
    assert chain == [b0, b1]
    # Extending is incremental and gives the same chain as hashing at once.
    inc: list[bytes] = []
    h.extend(inc, toks[:5])
    h.extend(inc, toks)
    assert inc == chain


def test_hashes_are_stable_across_processes() -> None:
    code = (
        "from kvstore.hashing import *; h = BlockHasher.create(model_fingerprint('llama','cfg','weights','float32',4),"
        " tenant_salt(b's'*32, 't'), 4); c = []; h.extend(c, list(range(12))); print(c[-1].hex())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    chain: list[bytes] = []
    hasher().extend(chain, list(range(12)))
    assert other == chain[-1].hex()


def test_tenants_and_models_never_share() -> None:
    toks = list(range(8))
    chains = []
    for h in (hasher("a"), hasher("b"), hasher("a", secret=b"x" * 32),
              BlockHasher.create(model_fingerprint("llama", "cfg", "other-weights", "float32", BS), tenant_salt(b"s" * 32, "a"), BS)):
        c: list[bytes] = []
        h.extend(c, toks)
        chains.append(c[0])
    assert len(set(chains)) == len(chains)


def test_sharing_and_ref_counts() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    h = hasher()
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    assert kv.find_prefix("a", prompt, h).num_tokens == 0
    assert kv.allocate("a", len(prompt))
    kv.cache_blocks("a", prompt, len(prompt), h)
    kv.check_integrity()
    match = kv.find_prefix("b", prompt, h)
    hits = match.device
    assert match.num_tokens == 8 and [b.block_id for b in hits] == kv.block_ids("a")[:2]
    assert kv.allocate("b", len(prompt), match)
    assert [b.ref_cnt for b in hits] == [2, 2]
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert kv.block_ids("b")[2] != kv.block_ids("a")[2]  # the partial block is private
    kv.check_integrity()
    kv.forget("a")
    assert [b.ref_cnt for b in hits] == [1, 1]
    kv.forget("b")
    assert kv.pool.num_free == 8 and kv.pool.num_cached == 2  # still reusable
    kv.check_integrity()


def test_different_salts_never_share_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(9))
    kv.allocate("a", 9)
    kv.cache_blocks("a", prompt, 9, hasher("tenant-a"))
    assert kv.find_prefix("b", prompt, hasher("tenant-b")).num_tokens == 0
    assert kv.find_prefix("c", prompt, hasher("tenant-a")).num_tokens == 8
    kv.check_integrity()


def test_last_token_is_always_recomputed() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    h = hasher()
    prompt = list(range(8))  # exactly two blocks
    kv.allocate("a", 8)
    kv.cache_blocks("a", prompt, 8, h)
    assert kv.find_prefix("b", prompt, h).num_tokens == 4  # the block holding the last token is not taken from the cache


def test_eviction_order_is_lru_with_tails_first() -> None:
    pool_kv = KVCacheManager(num_blocks=6, block_size=BS)
    h = hasher()
    seq_a = list(range(12))  # three full blocks
    seq_b = list(range(100, 112))
    for rid, seq in (("a", seq_a), ("b", seq_b)):
        pool_kv.allocate(rid, 12)
        pool_kv.cache_blocks(rid, seq, 12, h)
    a_ids, b_ids = pool_kv.block_ids("a"), pool_kv.block_ids("b")
    pool_kv.forget("a")  # released first: evicted first, its tail before its head
    pool_kv.forget("b")
    assert pool_kv.pool.eviction_order() == a_ids[::-1] + b_ids[::-1]
    # Reviving a's head moves it out of the queue; a new allocation takes a's tail first.
    match = pool_kv.find_prefix("c", seq_a[:5], h)
    assert [b.block_id for b in match.device] == a_ids[:1]
    pool_kv.allocate("c", 5, match)
    assert pool_kv.block_ids("c") == [a_ids[0], a_ids[2]]
    assert pool_kv.pool.num_evictions == 1
    pool_kv.check_integrity()
    # a's second block lost its child but is still cached and matchable.
    chain: list[bytes] = []
    h.extend(chain, seq_a)
    assert pool_kv.pool.lookup(chain[1]) is not None and pool_kv.pool.lookup(chain[2]) is None


def test_uncached_blocks_are_evicted_before_cached_ones() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    h = hasher()
    kv.allocate("a", 6)  # block 0 full, block 1 partial
    kv.cache_blocks("a", list(range(6)), 6, h)
    ids = kv.block_ids("a")
    kv.forget("a")
    order = kv.pool.eviction_order()
    assert order.index(ids[1]) < order.index(ids[0])
    kv.check_integrity()


def test_allocation_is_all_or_nothing() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    assert kv.allocate("a", 8)
    assert not kv.allocate("b", 8)  # needs 2, one free
    assert kv.num_allocated_blocks("b") == 0 and kv.pool.num_free == 1
    kv.check_integrity()


def test_integrity_check_catches_corruption() -> None:
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    b.ref_cnt = 0  # a block in use that claims to be free
    with pytest.raises(AssertionError):
        pool.check_integrity()
