"""KV tiers below the device pool: a store of whole blocks keyed by block hash.

A block travels as one tensor ``(num_layers, 2, block_size, num_kv_heads, head_dim)``: the
device cache is block-major, so this is a single contiguous copy in either direction.
"""
from __future__ import annotations

import queue
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Callable, Sequence

import torch


class KVTier(ABC):
    """Contract for a tier.

    - `put_many` stores copies of the given blocks (the caller may reuse its tensors at once) and
      returns how many were stored; a block already present is refreshed, not duplicated. It may
      evict other blocks to stay within capacity. It never raises for a store that is down: the
      write is dropped and counted.
    - `get_many` returns, per hash, the block or None (missing, corrupt, or the store is down).
      Returned tensors are valid until the next `put_many` on the same tier; copy them before that.
    - `contains_many` answers presence without moving payloads.
    """

    name: str

    @abstractmethod
    def put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int: ...

    @abstractmethod
    def get_many(self, hashes: Sequence[bytes]) -> list[torch.Tensor | None]: ...

    @abstractmethod
    def contains_many(self, hashes: Sequence[bytes]) -> list[bool]: ...


class HostTier(KVTier):
    """Host RAM: one preallocated slab of block slots (pinned when the device is CUDA), LRU.

    Invariants: every slot is free, holds exactly one hash, or is lent; ``len(index) + len(free)
    + lent`` equals the slot count, so the slab never grows past its capacity. When a put needs a
    slot and none is free, the least recently used block is evicted and handed to
    `on_evict(hash, block, slot)` (write-back to the tier below). If that returns True, the slot
    is lent to it: its bytes are read in place (no copy) and the slot is reused only after
    `give_back(slot)`, which any thread may call.
    """

    name = "host"

    def __init__(
        self,
        capacity_bytes: int,
        block_shape: tuple[int, ...],
        dtype: torch.dtype,
        pin: bool = False,
        on_evict: Callable[[bytes, torch.Tensor, int], bool] | None = None,
    ) -> None:
        block_bytes = torch.Size(block_shape).numel() * torch.empty((), dtype=dtype).element_size()
        self.num_slots = max(0, capacity_bytes // block_bytes)
        self.block_bytes = block_bytes
        # (num_slots, num_layers, 2, block_size, num_kv_heads, head_dim)
        self.slab = torch.empty((self.num_slots, *block_shape), dtype=dtype, pin_memory=pin)
        self._index: OrderedDict[bytes, int] = OrderedDict()  # most recently used last
        self._free = list(range(self.num_slots - 1, -1, -1))
        self.on_evict = on_evict
        self.num_evictions = 0
        self.num_lent = 0
        self._returned: queue.SimpleQueue[int] = queue.SimpleQueue()  # given back, not yet free

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._index

    def put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        stored = 0
        for h, block in items:
            if self.num_slots == 0:
                break
            slot = self._index.get(h)
            if slot is not None:
                self._index.move_to_end(h)
                stored += 1
                continue
            slot = self._take_slot()
            if slot is None:
                break  # every slot is lent out
            # Asynchronous from a device block into a pinned slot: the caller orders it by stream.
            self.slab[slot].copy_(block, non_blocking=block.is_cuda)
            self._index[h] = slot
            stored += 1
        return stored

    def _take_slot(self) -> int | None:
        while True:
            while not self._returned.empty():
                self._free.append(self._returned.get_nowait())
                self.num_lent -= 1
            if self._free:
                return self._free.pop()
            if not self._index:
                return None
            old, slot = self._index.popitem(last=False)
            self.num_evictions += 1
            if self.on_evict is not None and self.on_evict(old, self.slab[slot], slot):
                self.num_lent += 1
                continue
            return slot

    def reserve(self, n: int) -> list[int]:
        """Lend up to `n` slots (evicting as needed) for blocks to be written into them in place,
        from any thread; each is then `adopt`ed or given back."""
        out = []
        for _ in range(n):
            slot = self._take_slot()
            if slot is None:
                break
            self.num_lent += 1
            out.append(slot)
        return out

    def adopt(self, block_hash: bytes, slot: int) -> None:
        """A reserved slot now holds `block_hash` (most recently used)."""
        self.num_lent -= 1
        if block_hash in self._index:
            self._free.append(slot)  # (it arrived meanwhile by another way)
            return
        self._index[block_hash] = slot

    def give_back(self, slot: int) -> None:
        """A lent slot may be reused (thread-safe)."""
        self._returned.put(slot)

    def get_many(self, hashes: Sequence[bytes]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for h in hashes:
            slot = self._index.get(h)
            if slot is None:
                out.append(None)
            else:
                self._index.move_to_end(h)
                out.append(self.slab[slot])
        return out

    def contains_many(self, hashes: Sequence[bytes]) -> list[bool]:
        return [h in self._index for h in hashes]

    def clear(self) -> None:
        """Forget every block (the slab is kept; call when no slot is lent)."""
        assert self.num_lent == self._returned.qsize(), "clearing while slots are lent"
        self._returned = queue.SimpleQueue()
        self.num_lent = 0
        self._index.clear()
        self._free = list(range(self.num_slots - 1, -1, -1))

    def touch(self, hashes: Sequence[bytes]) -> None:
        """Mark blocks most recently used, so that imminent evictions take others first."""
        for h in hashes:
            if h in self._index:
                self._index.move_to_end(h)

    def check_integrity(self) -> None:
        slots = list(self._index.values())
        assert len(set(slots)) == len(slots), "two hashes share a host slot"
        assert not set(slots) & set(self._free), "a host slot is both used and free"
        returned = self._returned.qsize()
        assert len(slots) + len(self._free) + self.num_lent == self.num_slots, "host slots leaked"
        assert returned <= self.num_lent, "more slots given back than lent"
