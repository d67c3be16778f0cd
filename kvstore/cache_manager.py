"""Per-request block tables over the block pool, with prefix matching and block caching.

The manager is keyed by request id and sees requests only as token lists: it never imports the
runtime. For each request it holds the block table (logical block i -> physical block) and the
chain of hashes of the request's full blocks, which survives preemption (the tokens do not change)
and is dropped by `forget`.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Sequence

from kvstore.block_pool import Block, BlockPool
from kvstore.hashing import BlockHasher
from kvstore.mover import REDIS, TierMover


@dataclass(slots=True)
class _Entry:
    blocks: list[Block] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # the blocks' ids, kept in step (read every step)
    hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0  # blocks[:num_cached_blocks] are registered in the prefix index
    # Loaded blocks whose copies are still in flight: (hash, block), registered once they land
    # (until then no other request may find them, so none computes on them early).
    restoring: list[tuple[bytes, Block]] = field(default_factory=list)


@dataclass(slots=True)
class PrefixMatch:
    """The cached start of a sequence: blocks on the device, then blocks one or two tiers down."""

    device: list[Block] = field(default_factory=list)
    lower: list[tuple[bytes, str]] = field(default_factory=list)  # (hash, "host" | "redis")
    block_size: int = 16

    @property
    def num_blocks(self) -> int:
        return len(self.device) + len(self.lower)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def tokens_by_tier(self) -> dict[str, int]:
        out = {"gpu": len(self.device) * self.block_size, "host": 0, "redis": 0}
        for _, tier in self.lower:
            out[tier] += self.block_size
        return out


@dataclass(slots=True)
class _Pin:
    blocks: list[Block]
    hashes: list[bytes]
    deadline: float
    version: int


@dataclass(slots=True)
class PrefixStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found cached


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, mover: TierMover | None = None
    ) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.mover = mover if enable_prefix_caching else None
        if self.mover is not None:
            mv = self.mover
            self.pool.on_evict = lambda b: mv.evicted(b.block_hash, b.block_id)  # type: ignore[arg-type]
        self._entries: dict[str, _Entry] = {}
        self.stats = PrefixStats()
        # Session pins: an owner (a session) keeps references on its computed blocks between
        # turns, until its deadline; the heap holds (deadline, version, owner) for expiry in
        # O(expired) per step (stale versions are skipped).
        self._pins: dict[str, _Pin] = {}
        # block id -> pins holding it: the distinct pinned blocks, kept as pins come and go
        # (the scheduler asks every step; a sum over every pin's blocks took milliseconds)
        self._pin_refs: dict[int, int] = {}
        self._pin_heap: list[tuple[float, int, str]] = []
        self._pin_version = 0
        self.num_pin_expiries = 0
        self.num_pin_reclaims = 0

    def _entry(self, request_id: str) -> _Entry:
        entry = self._entries.get(request_id)
        if entry is None:
            entry = self._entries[request_id] = _Entry()
        return entry

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix(self, request_id: str, token_ids: Sequence[int], hasher: BlockHasher) -> PrefixMatch:
        """The longest cached start of the sequence: device blocks, then host or fetched blocks
        where the cost model says loading beats recomputing.

        The last token is never covered: its logits are needed, so it is always recomputed.
        Takes no references and moves nothing; pass the match to `allocate`.
        """
        match = PrefixMatch(block_size=self.block_size)
        if not self.enable_prefix_caching:
            return match
        entry = self._entry(request_id)
        hasher.extend(entry.hashes, token_ids)
        max_blocks = (len(token_ids) - 1) // self.block_size
        for h in entry.hashes[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            match.device.append(block)
        if self.mover is not None:
            lower = self.mover.lower_match(request_id, entry.hashes[len(match.device) : max_blocks])
            # Keep the longest run whose every tier's share is worth loading.
            for tier in ("host", REDIS):
                n = sum(1 for _, t in lower if t == tier)
                if n and not self.mover.cost.should_load(tier, n * self.block_size):
                    lower = lower[: next(i for i, (_, t) in enumerate(lower) if t == tier)]
            match.lower = lower
        self.stats.queries += len(token_ids)
        self.stats.hits += match.num_tokens
        return match

    def plan_fetch(self, request_id: str, token_ids: Sequence[int], match: PrefixMatch) -> list[bytes]:
        """Hashes past `match` worth asking Redis for (empty when there is no reachable Redis tier
        or the cost model prefers recomputing them)."""
        mv = self.mover
        if mv is None or mv.redis is None or not mv.redis.available:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        rest = self._entries[request_id].hashes[match.num_blocks : max_blocks]
        if not rest or not mv.cost.should_load(REDIS, len(rest) * self.block_size):
            return []
        return list(rest)

    def allocate(self, request_id: str, num_tokens: int, match: PrefixMatch | None = None) -> bool:
        """Grow the request's table to hold `num_tokens` tokens, first adopting `match`.

        Device blocks of the match are shared (ref counts up); its lower blocks are copied into new
        device blocks and registered as cached once the copies land (see `restore_ready`). If a
        lower block vanished meanwhile, the match is cut there (`match.lower` shrinks) and the rest
        is left to recompute. All or nothing: returns False and changes nothing when the pool
        cannot supply the blocks.
        """
        entry = self._entry(request_id)
        prefix = match.device if match else []
        lower = match.lower if match else []
        assert not (prefix or lower) or not entry.blocks, "a prefix is adopted only by an empty table"
        need = self.num_blocks_for(num_tokens) - len(entry.blocks) - len(prefix)
        revived = sum(1 for b in prefix if b.ref_cnt == 0)  # they leave the free queue
        if max(need, 0) + revived > self.pool.num_free:
            return False
        if prefix:
            self.pool.touch(prefix)
            entry.blocks.extend(prefix)
            entry.ids.extend(b.block_id for b in prefix)
            entry.num_cached_blocks = len(prefix)
        if lower:
            assert self.mover is not None
            self.mover.protect(lower)
        if need > 0:
            new = self.pool.allocate(need)
            entry.blocks.extend(new)
            entry.ids.extend(b.block_id for b in new)
        if lower and match is not None:
            assert self.mover is not None
            targets = entry.blocks[len(prefix) : len(prefix) + len(lower)]
            n = self.mover.load(request_id, lower, [b.block_id for b in targets])
            match.lower = lower[:n]
            entry.restoring = [(h, block) for (h, _), block in zip(lower[:n], targets)]
            self.restore_ready(request_id)
        return True

    def restore_ready(self, request_id: str) -> bool:
        """Whether the request's loaded blocks have landed on the device (they are then cached)."""
        entry = self._entries.get(request_id)
        if entry is None or not entry.restoring:
            return True
        assert self.mover is not None
        if not self.mover.restore_ready(request_id):
            return False
        for h, block in entry.restoring:
            self.pool.cache(block, h)
        entry.num_cached_blocks += len(entry.restoring)
        entry.restoring = []
        return True

    def cache_blocks(
        self, request_id: str, token_ids: Sequence[int], num_computed: int, hasher: BlockHasher
    ) -> None:
        """Register every block whose tokens are all computed in the prefix index."""
        if not self.enable_prefix_caching:
            return
        entry = self._entries[request_id]
        num_full = num_computed // self.block_size
        if num_full <= entry.num_cached_blocks:
            return
        hasher.extend(entry.hashes, token_ids[: num_full * self.block_size])
        for i in range(entry.num_cached_blocks, num_full):
            block = entry.blocks[i]
            if block.block_hash is None and self.pool.cache(block, entry.hashes[i]) and self.mover:
                self.mover.block_cached(entry.hashes[i], block.block_id)
        entry.num_cached_blocks = num_full

    def block_ids(self, request_id: str) -> list[int]:
        return list(self._entries[request_id].ids)

    def num_allocated_blocks(self, request_id: str) -> int:
        entry = self._entries.get(request_id)
        return len(entry.blocks) if entry else 0

    def free(self, request_id: str) -> None:
        """Release the request's blocks, tail first; keeps its hash chain (see `forget`)."""
        entry = self._entries.get(request_id)
        if entry is None:
            return
        if entry.restoring:
            assert self.mover is not None
            self.mover.drop_restore(request_id)
            entry.restoring = []
        self.pool.release(reversed(entry.blocks))
        entry.blocks = []
        entry.ids = []
        entry.num_cached_blocks = 0

    def forget(self, request_id: str) -> None:
        """Free the request's blocks and drop everything the manager knows of it."""
        self.free(request_id)
        self._entries.pop(request_id, None)

    # ---- session pins ----------------------------------------------------------------------
    def pin(self, owner: str, request_id: str, deadline: float) -> int:
        """Make `owner` hold the request's computed, cached blocks until `deadline` (replacing
        what it held before). Call before the request is forgotten. Returns the blocks pinned."""
        entry = self._entries.get(request_id)
        blocks = list(entry.blocks[: entry.num_cached_blocks]) if entry else []
        hashes = list(entry.hashes[: len(blocks)]) if entry else []
        self.pool.touch(blocks)
        self.unpin(owner, demote=False)
        self._hold(blocks, 1)
        self._set_pin(owner, _Pin(blocks, hashes, deadline, 0))
        return len(blocks)

    def _hold(self, blocks: Sequence[Block], delta: int) -> None:
        refs = self._pin_refs
        for b in blocks:
            n = refs.get(b.block_id, 0) + delta
            if n:
                refs[b.block_id] = n
            else:
                del refs[b.block_id]

    def copy_pins(self, src: str, dst: str) -> None:
        """A fork holds its parent's blocks too (shared, ref-counted: the prefix is held once)."""
        pin = self._pins.get(src)
        if pin is not None:
            self.pool.touch(pin.blocks)
            self.unpin(dst, demote=False)
            self._hold(pin.blocks, 1)
            self._set_pin(dst, _Pin(list(pin.blocks), list(pin.hashes), pin.deadline, 0))

    def _set_pin(self, owner: str, pin: _Pin) -> None:
        self._pin_version += 1
        pin.version = self._pin_version
        self._pins[owner] = pin
        heapq.heappush(self._pin_heap, (pin.deadline, pin.version, owner))

    def set_pin_deadline(self, owner: str, deadline: float) -> None:
        pin = self._pins.get(owner)
        if pin is not None:
            pin.deadline = deadline
            self._set_pin(owner, pin)

    def unpin(self, owner: str, demote: bool = True) -> int:
        """Release `owner`'s blocks (tail first). With `demote`, their content is first copied one
        tier down, so a lapsed pin moves the session's KV down a tier rather than away."""
        pin = self._pins.pop(owner, None)
        if pin is None:
            return 0
        if demote and self.mover is not None:
            # only the pin holds these: they may be evicted from here on
            self.mover.demote_many([(h, b.block_id) for h, b in zip(pin.hashes, pin.blocks) if b.ref_cnt == 1])
        self._hold(pin.blocks, -1)
        self.pool.release(reversed(pin.blocks))
        return len(pin.blocks)

    def expire_pins(self, now: float) -> list[str]:
        out = []
        while self._pin_heap and self._pin_heap[0][0] <= now:
            _, version, owner = heapq.heappop(self._pin_heap)
            pin = self._pins.get(owner)
            if pin is not None and pin.version == version:
                self.unpin(owner)
                self.num_pin_expiries += 1
                out.append(owner)
        return out

    def pins_by_expected_wait(self) -> list[str]:
        """Owners ordered for reclaiming under pressure: the one expected back last first."""
        return sorted(self._pins, key=lambda o: self._pins[o].deadline, reverse=True)

    def pin_backed(self, owner: str) -> bool:
        """Whether every block `owner` pins has a copy in host RAM."""
        pin = self._pins.get(owner)
        host = self.mover.host if self.mover is not None else None
        return pin is not None and host is not None and all(h in host for h in pin.hashes)

    def pinned_blocks(self, owner: str | None = None) -> int:
        if owner is not None:
            pin = self._pins.get(owner)
            return len(pin.blocks) if pin else 0
        return len(self._pin_refs)

    @property
    def num_pins(self) -> int:
        return len(self._pins)

    @property
    def num_in_use(self) -> int:
        return self.pool.num_blocks - self.pool.num_free

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        if self.mover is not None and self.mover.host is not None:
            self.mover.host.check_integrity()
        refs: dict[int, int] = {}
        for pin in self._pins.values():
            for b in pin.blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        assert refs == self._pin_refs, "pinned block counts out of step with the pins"
        for rid, entry in self._entries.items():
            assert len(set(map(id, entry.blocks))) == len(entry.blocks), f"{rid}: block twice"
            assert entry.ids == [b.block_id for b in entry.blocks], f"{rid}: block ids out of step"
            for b in entry.blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
            for i in range(entry.num_cached_blocks):
                h = entry.blocks[i].block_hash
                assert h is None or h == entry.hashes[i], f"{rid}: block {i} cached under another hash"
        for block in self.pool.blocks:
            assert block.ref_cnt == refs.get(block.block_id, 0), (
                f"block {block.block_id}: ref_cnt {block.ref_cnt} but {refs.get(block.block_id, 0)} tables and pins hold it"
            )
