"""The device block pool: ref counts, an LRU free queue and the prefix index.

Invariants (checked by `check_integrity`):
- Every block is either in use (``ref_cnt > 0``) or in the free queue (``ref_cnt == 0``), never both.
- The prefix index maps a hash to exactly the block whose ``block_hash`` is that hash. A block in
  the free queue that still has a hash is *cached*: a later request may revive it until it is
  evicted.
- Eviction order is the free queue's order, front first. Blocks without a hash sit at the front
  (they hold nothing reusable); cached blocks are appended as they are released, and callers
  release a sequence tail first, so the tail of a chain is evicted before its ancestors and an
  evicted block never strands a cached descendant that could still be matched.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._index: dict[bytes, Block] = {}
        self.num_evictions = 0
        # Called with a cached block just before its content is given up (demotion to a lower tier).
        self.on_evict: Callable[[Block], None] | None = None

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out now (free, cached ones included)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._index)

    def lookup(self, block_hash: bytes) -> Block | None:
        return self._index.get(block_hash)

    def eviction_order(self) -> list[int]:
        """Block ids in the order `allocate` would take them."""
        return list(self._free)

    # ---- mutations -----------------------------------------------------------------------
    def allocate(self, n: int) -> list[Block]:
        """Take `n` blocks from the front of the free queue, evicting any cached content.

        Returns blocks with ``ref_cnt == 1`` and no hash. Raises ValueError when fewer than `n` are
        free; callers check `num_free` first so that a failed allocation changes nothing.
        """
        if n > len(self._free):
            raise ValueError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                if self.on_evict is not None:
                    self.on_evict(block)
                del self._index[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on blocks found by `lookup`, reviving those in the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: Iterable[Block]) -> None:
        """Drop one reference on each block, in the order given: the first to reach zero is
        evicted first among the cached ones. Callers pass a sequence's blocks tail first."""
        for block in blocks:
            assert block.ref_cnt > 0, f"block {block.block_id} released more often than taken"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def cache(self, block: Block, block_hash: bytes) -> bool:
        """Register a full, computed block under `block_hash`.

        Returns False when another block already holds that hash (two requests computed the same
        content concurrently): the index keeps the first, and `block` stays private to its owner.
        """
        assert block.ref_cnt > 0 and block.block_hash is None
        if block_hash in self._index:
            return False
        block.block_hash = block_hash
        self._index[block_hash] = block
        return True

    # ---- invariants ----------------------------------------------------------------------
    def check_integrity(self) -> None:
        for block in self.blocks:
            in_free = block.block_id in self._free
            assert block.ref_cnt >= 0, f"block {block.block_id}: negative ref count"
            assert in_free == (block.ref_cnt == 0), (
                f"block {block.block_id}: ref_cnt={block.ref_cnt} but in_free={in_free}"
            )
            if block.block_hash is not None:
                assert self._index.get(block.block_hash) is block, (
                    f"block {block.block_id}: hash not indexed to it"
                )
        for h, block in self._index.items():
            assert block.block_hash == h, f"index entry for block {block.block_id} is stale"
        seen_cached = False
        for block in self._free.values():
            # Hashless free blocks are all in front of the cached ones.
            if block.block_hash is not None:
                seen_cached = True
            else:
                assert not seen_cached, f"hashless block {block.block_id} behind cached blocks"
