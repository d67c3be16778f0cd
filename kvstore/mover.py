"""Moves blocks between the device pool and the tiers below it.

Engine-thread side (never blocks on Redis):
- `demote`: a cached block leaving the device goes to host RAM (or, with no host tier, to Redis);
- `block_cached`: with write-through, a newly computed block is snapshotted for Redis;
- `lower_match` / `load`: the prefix continues through host RAM and blocks fetched from Redis,
  which are copied into freshly allocated device blocks;
- `start_fetch` / `poll` / `cancel`: asynchronous Redis reads for a waiting request.

Two worker threads do the Redis I/O: a reader (fetches, latency-sensitive) and a writer (batched
pipelined sets from a bounded queue; when it is full, writes are dropped and counted rather than
letting memory grow or the engine wait).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from kvstore.cost_model import CostModel
from kvstore.redis_tier import RedisTier
from kvstore.tiers import HostTier

log = logging.getLogger("ember.mover")

HOST, REDIS = "host", "redis"


@dataclass
class MoverStats:
    demoted_to_host: int = 0
    loaded_blocks: dict[str, int] | None = None
    loaded_bytes: dict[str, int] | None = None
    written_to_redis: int = 0
    writes_dropped: int = 0
    fetches: int = 0
    fetch_timeouts: int = 0

    def __post_init__(self) -> None:
        self.loaded_blocks = {HOST: 0, REDIS: 0}
        self.loaded_bytes = {HOST: 0, REDIS: 0}


@dataclass(frozen=True, slots=True)
class _Fetch:
    request_id: str
    hashes: list[bytes]


class TierMover:
    def __init__(
        self,
        device_blocks: torch.Tensor,  # (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
        host: HostTier | None,
        redis: RedisTier | None,
        cost: CostModel,
        write_through: bool,
        max_pending_write_bytes: int = 256 << 20,
    ) -> None:
        self.device_blocks = device_blocks
        self.host = host
        self.redis = redis
        self.cost = cost
        self.write_through = write_through and redis is not None
        self.block_bytes = device_blocks[0].numel() * device_blocks.element_size()
        self.stats = MoverStats()
        self._staged: dict[str, dict[bytes, torch.Tensor]] = {}
        self._fetching: set[str] = set()
        self._written: OrderedDict[bytes, None] = OrderedDict()  # recently sent to Redis
        self._written_lock = threading.Lock()  # shared by the engine thread and the writer
        self._max_pending = max(1, max_pending_write_bytes // self.block_bytes)
        if host is not None and redis is not None and not self.write_through:
            host.on_evict = self._host_evicted  # write-back: host eviction demotes to Redis
        self._read_q: queue.SimpleQueue[_Fetch | None] = queue.SimpleQueue()
        self._done_q: queue.SimpleQueue[tuple[str, list[bytes], list[torch.Tensor], float, int]] = queue.SimpleQueue()
        self._write_q: queue.Queue[tuple[bytes, torch.Tensor] | None] = queue.Queue(maxsize=self._max_pending)
        self._threads: list[threading.Thread] = []
        if redis is not None:
            for target, name in ((self._reader, "ember-redis-reader"), (self._writer, "ember-redis-writer")):
                t = threading.Thread(target=target, name=name, daemon=True)
                t.start()
                self._threads.append(t)

    # ---- writes (engine thread) ----------------------------------------------------------
    def _snapshot(self, block: torch.Tensor) -> torch.Tensor:
        return block.to("cpu", copy=True)

    def _enqueue_write(self, block_hash: bytes, block: torch.Tensor) -> None:
        with self._written_lock:
            if block_hash in self._written:
                self._written.move_to_end(block_hash)
                return
            self._written[block_hash] = None
            if len(self._written) > 1 << 20:
                self._written.popitem(last=False)
        try:
            self._write_q.put_nowait((block_hash, self._snapshot(block)))
        except queue.Full:
            self.stats.writes_dropped += 1
            with self._written_lock:
                self._written.pop(block_hash, None)

    def demote(self, block_hash: bytes, block_id: int) -> None:
        """A cached device block is about to be reused: keep its content one tier down."""
        block = self.device_blocks[block_id]
        if self.host is not None and self.host.num_slots:
            self.host.put_many([(block_hash, block)])
            self.stats.demoted_to_host += 1
        elif self.redis is not None:
            self._enqueue_write(block_hash, block)

    def block_cached(self, block_hash: bytes, block_id: int) -> None:
        """A block was just computed and registered; write-through sends it to Redis."""
        if self.write_through:
            self._enqueue_write(block_hash, self.device_blocks[block_id])

    def _host_evicted(self, block_hash: bytes, block: torch.Tensor) -> None:
        self._enqueue_write(block_hash, block)

    # ---- loads (engine thread) -----------------------------------------------------------
    def lower_match(self, request_id: str, hashes: Sequence[bytes]) -> list[tuple[bytes, str]]:
        """The longest run of `hashes` found in host RAM or among this request's fetched blocks."""
        staged = self._staged.get(request_id, {})
        out: list[tuple[bytes, str]] = []
        for h in hashes:
            if self.host is not None and h in self.host:
                out.append((h, HOST))
            elif h in staged:
                out.append((h, REDIS))
            else:
                break
        return out

    def protect(self, span: Sequence[tuple[bytes, str]]) -> None:
        """Make the host blocks of `span` most recently used before device allocation may demote
        (and so evict from host) other blocks."""
        if self.host is not None:
            self.host.touch([h for h, tier in span if tier == HOST])

    def load(self, request_id: str, span: Sequence[tuple[bytes, str]], block_ids: Sequence[int]) -> int:
        """Copy `span` into device blocks `block_ids`; returns how many were loaded (a block evicted
        from host since `lower_match` ends the run, and the rest is recomputed)."""
        staged = self._staged.get(request_id, {})
        loaded = 0
        t0 = time.perf_counter()
        host_bytes = 0
        for (h, tier), bid in zip(span, block_ids):
            src = staged.get(h) if tier == REDIS else (self.host.get_many([h])[0] if self.host else None)
            if src is None:
                break
            self.device_blocks[bid].copy_(src, non_blocking=False)
            loaded += 1
            self.stats.loaded_blocks[tier] += 1  # type: ignore[index]
            self.stats.loaded_bytes[tier] += self.block_bytes  # type: ignore[index]
            host_bytes += self.block_bytes if tier == HOST else 0
        if host_bytes:
            self.cost.observe_load(HOST, host_bytes, time.perf_counter() - t0)
        self._staged.pop(request_id, None)
        return loaded

    def start_fetch(self, request_id: str, hashes: list[bytes]) -> None:
        self._fetching.add(request_id)
        self.stats.fetches += 1
        self._read_q.put(_Fetch(request_id, hashes))

    def cancel(self, request_id: str, timed_out: bool = False) -> None:
        self._fetching.discard(request_id)
        self._staged.pop(request_id, None)
        if timed_out:
            self.stats.fetch_timeouts += 1

    def poll(self) -> list[str]:
        """Requests whose fetch finished (their blocks are staged for `lower_match`)."""
        done: list[str] = []
        while True:
            try:
                rid, hashes, blocks, seconds, nbytes = self._done_q.get_nowait()
            except queue.Empty:
                return done
            if rid not in self._fetching:
                continue  # cancelled or timed out meanwhile
            self._fetching.discard(rid)
            self._staged[rid] = dict(zip(hashes, blocks))
            if nbytes:
                self.cost.observe_load(REDIS, nbytes, seconds)
            done.append(rid)

    def wait(self, timeout: float) -> None:
        """Sleep until a fetch may have finished (the engine has nothing else to do)."""
        if self._fetching:
            time.sleep(timeout)

    # ---- worker threads ------------------------------------------------------------------
    def _reader(self) -> None:
        assert self.redis is not None
        while (job := self._read_q.get()) is not None:
            t0 = time.perf_counter()
            blocks = self.redis.get_many(job.hashes)
            n = next((i for i, b in enumerate(blocks) if b is None), len(blocks))
            found = [b for b in blocks[:n] if b is not None]
            self._done_q.put((job.request_id, job.hashes[:n], found, time.perf_counter() - t0, n * self.block_bytes))

    def _writer(self) -> None:
        assert self.redis is not None
        stop = False
        while not stop:
            batch: list[tuple[bytes, torch.Tensor]] = []
            item = self._write_q.get()
            while True:
                if item is None:
                    stop = True
                else:
                    batch.append(item)
                if stop or len(batch) >= 64:
                    break
                try:
                    item = self._write_q.get_nowait()
                except queue.Empty:
                    break
            encoded = [(h, self.redis.fmt.encode(b)) for h, b in batch]
            n = self.redis.put_encoded(encoded)
            self.stats.written_to_redis += n
            if batch and n == 0:
                # Not stored (Redis down): forget them so a later demotion can try again.
                with self._written_lock:
                    for h, _ in batch:
                        self._written.pop(h, None)
            for _ in range(len(batch) + stop):
                self._write_q.task_done()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until queued writes have been sent (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while self._write_q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        if self.redis is not None:
            self._read_q.put(None)
            self._write_q.put(None)
            for t in self._threads:
                t.join(timeout=5)
            self.redis.close()
