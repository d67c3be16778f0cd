"""Moves blocks between the device pool and the tiers below it.

Engine-thread side (never blocks on Redis, and on CUDA never waits for a copy):
- `block_cached`: a newly computed block is offloaded to host RAM at once when
  `offload_on_compute` (the CUDA default: the copy rides a side stream, so eviction later costs
  nothing), and snapshotted for Redis with write-through;
- `evicted` / `demote`: a cached block leaving the device (or a lapsed pin) goes to host RAM unless
  it is there already (or, with no host tier, to Redis);
- `lower_match` / `load`: the prefix continues through host RAM and blocks fetched from Redis,
  which are copied into freshly allocated device blocks; `restore_ready` says when they are there;
- `start_fetch` / `poll` / `cancel`: asynchronous Redis reads for a waiting request;
- `end_step`: issues the step's offloads and retires finished copies.

On CUDA every copy between host and device runs on one copy stream, ordered against the compute
stream by events:
- a copy out of a device block waits for the compute work queued before it (the block's data);
- a copy into a device block waits for the compute work queued before it (in-flight steps may
  still touch a block that was just freed), and the request it restores is not scheduled before
  its event completes; if such a request is dropped meanwhile, compute waits for the copy before
  its blocks can be reused;
- a device block evicted while its offload is in flight makes compute wait for that offload;
- host slots are written and read by copies on the copy stream, and by the Redis threads only
  while lent to them: a fetch writes into its reserved slots after the copies queued before the
  reservation, and write-back sends an evicted slot in place after that slot's own copy.
Off CUDA every copy is synchronous and all of this is moot.

Two worker threads do the Redis I/O: a reader (fetches, latency-sensitive) and a writer (batched
pipelined sets from a bounded queue; when it is full, writes are dropped and counted rather than
letting memory grow or the engine wait).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Sequence

import torch

from kvstore.cost_model import CostModel
from kvstore.redis_tier import RedisTier
from kvstore.tiers import HostTier

log = logging.getLogger("ember.mover")

HOST, REDIS = "host", "redis"


@dataclass
class MoverStats:
    demoted_to_host: int = 0  # copied down on eviction or pin lapse
    offloaded_to_host: int = 0  # copied down when computed
    loaded_blocks: dict[str, int] | None = None
    loaded_bytes: dict[str, int] | None = None
    load_seconds: dict[str, float] | None = None  # copy time of the loads (device-timed on CUDA)
    restore_waits: int = 0  # times a restored request was not ready yet (its copies in flight)
    written_to_redis: int = 0
    writes_dropped: int = 0
    fetches: int = 0
    fetch_timeouts: int = 0

    def __post_init__(self) -> None:
        self.loaded_blocks = {HOST: 0, REDIS: 0}
        self.loaded_bytes = {HOST: 0, REDIS: 0}
        self.load_seconds = {HOST: 0.0, REDIS: 0.0}


@dataclass(frozen=True, slots=True)
class _Fetch:
    request_id: str
    hashes: list[bytes]
    slots: list[int]  # host slots lent to receive the blocks in place (empty: no host tier)
    ready: torch.cuda.Event | None  # the slots' earlier copies are done once this completes


@dataclass(frozen=True, slots=True)
class _Fetched:
    request_id: str
    hashes: list[bytes]  # the run found, from the start
    blocks: list[torch.Tensor]  # staged copies (no host tier), else empty
    slots: list[int]  # the fetch's slots: the first len(hashes) filled
    seconds: float


@dataclass(slots=True)
class _Restore:
    """Copies into a request's new device blocks, in flight on the copy stream."""
    start: torch.cuda.Event
    done: torch.cuda.Event
    bytes_by_tier: dict[str, int]


@dataclass(slots=True)
class _Write:
    """A block on its way to Redis."""
    block_hash: bytes
    block: torch.Tensor  # on the CPU
    ready: torch.cuda.Event | None  # its copy to the CPU is done when this completes
    release: Callable[[], None] | None  # gives a lent host slot back once sent


@dataclass(slots=True)
class _Batch:
    """Copies out of device blocks into host slots, in flight on the copy stream."""
    done: torch.cuda.Event
    block_ids: list[int]
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
        offload_on_compute: bool | None = None,
    ) -> None:
        self.device_blocks = device_blocks
        self.host = host
        self.redis = redis
        self.cost = cost
        self.write_through = write_through and redis is not None
        cuda = device_blocks.is_cuda
        self.offload_on_compute = (cuda if offload_on_compute is None else offload_on_compute) and host is not None
        self.block_bytes = device_blocks[0].numel() * device_blocks.element_size()
        self.stats = MoverStats()
        self._stream = torch.cuda.Stream(device_blocks.device) if cuda else None
        self._to_offload: list[tuple[bytes, int]] = []
        self._inflight: deque[_Batch] = deque()  # offloads, oldest first
        self._inflight_blocks: dict[int, torch.cuda.Event] = {}
        self._inflight_hashes: dict[bytes, torch.cuda.Event] = {}
        self._restores: dict[str, _Restore] = {}
        # Blocks a fetch brought from Redis, per request: into host slots (`_fetched`, labelled
        # so the request's cache accounting says Redis) or, with no host tier, staged copies.
        self._fetched: dict[str, set[bytes]] = {}
        self._staged: dict[str, dict[bytes, torch.Tensor]] = {}
        self._fetching: set[str] = set()
        self._written: OrderedDict[bytes, None] = OrderedDict()  # recently sent to Redis
        self._written_lock = threading.Lock()  # shared by the engine thread and the writer
        self.max_pending_write_bytes = max_pending_write_bytes
        self._max_pending = max(1, max_pending_write_bytes // self.block_bytes)
        if host is not None:  # (a host slab outlives a mover: see LLMEngine.reset)
            write_back = redis is not None and not self.write_through
            host.on_evict = self._host_evicted if write_back else None  # host eviction demotes to Redis
        self._read_q: queue.SimpleQueue[_Fetch | None] = queue.SimpleQueue()
        self._done_q: queue.SimpleQueue[_Fetched] = queue.SimpleQueue()
        self._write_q: queue.Queue[_Write | None] = queue.Queue(maxsize=self._max_pending)
        self._threads: list[threading.Thread] = []
        if redis is not None:
            for target, name in ((self._reader, "ember-redis-reader"), (self._writer, "ember-redis-writer")):
                t = threading.Thread(target=target, name=name, daemon=True)
                t.start()
                self._threads.append(t)

    # ---- the copy stream -----------------------------------------------------------------
    @contextmanager
    def _copying(self) -> Iterator[None]:
        """Run the enclosed copies on the copy stream, after the compute work queued so far."""
        if self._stream is None:
            yield
            return
        self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        with torch.cuda.stream(self._stream):
            yield

    def _event(self, timing: bool = False) -> torch.cuda.Event:
        ev = torch.cuda.Event(enable_timing=timing)
        ev.record(self._stream)
        return ev

    def _to_host(self, items: list[tuple[bytes, int]]) -> int:
        """Copy device blocks into host slots (asynchronously on CUDA); returns how many."""
        assert self.host is not None
        with self._copying():
            n = self.host.put_many([(h, self.device_blocks[bid]) for h, bid in items])
        if self._stream is not None and n:
            batch = _Batch(self._event(), [bid for _, bid in items], [h for h, _ in items])
            self._inflight.append(batch)
            for h, bid in items:
                self._inflight_blocks[bid] = batch.done
                self._inflight_hashes[h] = batch.done
        return n

    def end_step(self) -> None:
        """Issue the offloads of the blocks computed this step; forget copies that finished."""
        if self._to_offload:
            self.stats.offloaded_to_host += self._to_host(self._to_offload)
            self._to_offload = []
        while self._inflight and self._inflight[0].done.query():
            batch = self._inflight.popleft()
            for bid in batch.block_ids:
                if self._inflight_blocks.get(bid) is batch.done:
                    del self._inflight_blocks[bid]
            for h in batch.hashes:
                if self._inflight_hashes.get(h) is batch.done:
                    del self._inflight_hashes[h]

    def synchronize(self) -> None:
        """Wait for every copy in flight (benchmarks and tests)."""
        if self._stream is not None:
            self._stream.synchronize()
        self.end_step()

    # ---- writes (engine thread) ----------------------------------------------------------
    def _enqueue_write(self, block_hash: bytes, block: torch.Tensor, release: Callable[[], None] | None = None,
                       block_id: int | None = None) -> bool:
        """Queue a block for Redis; returns whether it was queued. The writer reads a device block
        (`block_id` of the pool) from a pinned snapshot copied on the copy stream, a CPU block
        from a copy made now, and a block handed over with `release` in place, calling `release`
        once it is sent."""
        with self._written_lock:
            if block_hash in self._written:
                self._written.move_to_end(block_hash)
                return False
            self._written[block_hash] = None
            if len(self._written) > 1 << 20:
                self._written.popitem(last=False)
        event = None
        if block.is_cuda:
            with self._copying():
                snap = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
                snap.copy_(block, non_blocking=True)
            event = self._event()
            if block_id is not None:  # the block is not reused before its snapshot is taken
                self._inflight.append(_Batch(event, [block_id], []))
                self._inflight_blocks[block_id] = event
        else:
            snap = block if release is not None else block.clone()
        try:
            self._write_q.put_nowait(_Write(block_hash, snap, event, release))
            return True
        except queue.Full:
            self.stats.writes_dropped += 1
            with self._written_lock:
                self._written.pop(block_hash, None)
            return False

    def demote(self, block_hash: bytes, block_id: int) -> None:
        """Keep a cached device block's content one tier down (a lapsed pin, or an eviction)."""
        self.demote_many([(block_hash, block_id)])

    def demote_many(self, items: Sequence[tuple[bytes, int]]) -> None:
        """`demote` for several (hash, block id) pairs, copied to host in one batch."""
        if self.host is not None and self.host.num_slots:
            host = self.host
            host.touch([h for h, _ in items if h in host])  # offloaded when computed
            todo = [(h, bid) for h, bid in items if h not in host]
            if todo:
                self.stats.demoted_to_host += self._to_host(todo)
        elif self.redis is not None:
            for h, bid in items:
                self._enqueue_write(h, self.device_blocks[bid], block_id=bid)

    def evicted(self, block_hash: bytes, block_id: int) -> None:
        """A cached device block is about to be reused: demote it, and make the compute that
        overwrites it wait for any copy still reading it."""
        self.demote(block_hash, block_id)
        ev = self._inflight_blocks.get(block_id)
        if ev is not None and not ev.query():
            torch.cuda.current_stream(self.device_blocks.device).wait_event(ev)

    def block_cached(self, block_hash: bytes, block_id: int) -> None:
        """A block was just computed and registered: offload it to host (when configured; issued
        by `end_step`) and, with write-through, snapshot it for Redis."""
        if self.offload_on_compute:
            self._to_offload.append((block_hash, block_id))
        if self.write_through:
            self._enqueue_write(block_hash, self.device_blocks[block_id], block_id=block_id)

    def _host_evicted(self, block_hash: bytes, block: torch.Tensor, slot: int) -> bool:
        """Write-back: the evicted host slot is lent to the writer, which sends it in place."""
        ev = self._inflight_hashes.get(block_hash)
        if ev is not None:
            ev.synchronize()  # the slot's own copy (old: it is the least recently used)
        assert self.host is not None
        return self._enqueue_write(block_hash, block, partial(self.host.give_back, slot))

    # ---- loads (engine thread) -----------------------------------------------------------
    def lower_match(self, request_id: str, hashes: Sequence[bytes]) -> list[tuple[bytes, str]]:
        """The longest run of `hashes` found in host RAM or among this request's fetched blocks."""
        staged = self._staged.get(request_id, {})
        fetched = self._fetched.get(request_id, ())
        out: list[tuple[bytes, str]] = []
        for h in hashes:
            if self.host is not None and h in self.host:
                out.append((h, REDIS if h in fetched else HOST))
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
        from host since `lower_match` ends the run, and the rest is recomputed). On CUDA the
        copies are in flight on return: see `restore_ready`."""
        staged = self._staged.pop(request_id, {})
        self._fetched.pop(request_id, None)
        by_tier = {HOST: 0, REDIS: 0}
        loaded = 0
        t0 = time.perf_counter()
        with self._copying():
            start = self._event(timing=True) if self._stream is not None else None
            for (h, tier), bid in zip(span, block_ids):
                src = self.host.get_many([h])[0] if self.host is not None and h in self.host else staged.get(h)
                if src is None:
                    break
                self.device_blocks[bid].copy_(src, non_blocking=self._stream is not None)
                loaded += 1
                by_tier[tier] += self.block_bytes
        for tier, nbytes in by_tier.items():
            self.stats.loaded_blocks[tier] += nbytes // self.block_bytes  # type: ignore[index]
            self.stats.loaded_bytes[tier] += nbytes  # type: ignore[index]
        if start is not None:
            if loaded:
                self._restores[request_id] = _Restore(start, self._event(timing=True), by_tier)
        elif by_tier[HOST]:
            seconds = time.perf_counter() - t0
            self.stats.load_seconds[HOST] += seconds  # type: ignore[index]
            self.cost.observe_load(HOST, by_tier[HOST], seconds)
        return loaded

    def restore_ready(self, request_id: str) -> bool:
        """Whether the request's loaded blocks are on the device (always, off CUDA)."""
        r = self._restores.get(request_id)
        if r is None:
            return True
        if not r.done.query():
            self.stats.restore_waits += 1
            return False
        del self._restores[request_id]
        seconds = r.start.elapsed_time(r.done) / 1e3
        total = sum(r.bytes_by_tier.values())
        for tier, nbytes in r.bytes_by_tier.items():
            if nbytes:
                self.stats.load_seconds[tier] += seconds * nbytes / total  # type: ignore[index]
        if r.bytes_by_tier[HOST] and not r.bytes_by_tier[REDIS]:
            self.cost.observe_load(HOST, total, seconds)
        return True

    def drop_restore(self, request_id: str) -> None:
        """The request lets go of its blocks before its restore finished: compute that reuses
        them must come after the copy."""
        r = self._restores.pop(request_id, None)
        if r is not None:
            torch.cuda.current_stream(self.device_blocks.device).wait_event(r.done)

    def start_fetch(self, request_id: str, hashes: list[bytes]) -> None:
        """Fetch `hashes` from Redis off this thread; with a host tier, straight into host slots
        lent for it (pinned memory: the restore is then an ordinary host restore)."""
        self._fetching.add(request_id)
        self.stats.fetches += 1
        slots: list[int] = []
        ready = None
        if self.host is not None and self.host.num_slots:
            slots = self.host.reserve(len(hashes))
            hashes = hashes[: len(slots)]
            if self._stream is not None:
                ready = self._event()  # copies still reading these slots' old blocks
        self._read_q.put(_Fetch(request_id, hashes, slots, ready))

    def cancel(self, request_id: str, timed_out: bool = False) -> None:
        self._fetching.discard(request_id)
        self._staged.pop(request_id, None)
        self._fetched.pop(request_id, None)
        if timed_out:
            self.stats.fetch_timeouts += 1

    def poll(self) -> list[str]:
        """Requests whose fetch finished (their blocks are staged for `lower_match`)."""
        done: list[str] = []
        while True:
            try:
                f = self._done_q.get_nowait()
            except queue.Empty:
                return done
            live = f.request_id in self._fetching  # else cancelled or timed out meanwhile
            n = len(f.hashes) if live else 0
            if self.host is not None:
                for h, slot in zip(f.hashes[:n], f.slots):
                    self.host.adopt(h, slot)
                for slot in f.slots[n:]:
                    self.host.give_back(slot)
            if not live:
                continue
            self._fetching.discard(f.request_id)
            if f.slots:
                self._fetched[f.request_id] = set(f.hashes)
            else:
                self._staged[f.request_id] = dict(zip(f.hashes, f.blocks))
            if n:
                self.stats.load_seconds[REDIS] += f.seconds  # type: ignore[index]
                self.cost.observe_load(REDIS, n * self.block_bytes, f.seconds)
            done.append(f.request_id)

    def wait(self, timeout: float) -> None:
        """Sleep until a fetch may have finished (the engine has nothing else to do)."""
        if self._fetching:
            time.sleep(timeout)

    # ---- worker threads ------------------------------------------------------------------
    def _reader(self) -> None:
        assert self.redis is not None
        while (job := self._read_q.get()) is not None:
            t0 = time.perf_counter()
            if job.slots:
                assert self.host is not None
                if job.ready is not None:
                    job.ready.synchronize()
                ok = self.redis.get_into(job.hashes, [self.host.slab[s] for s in job.slots])
                blocks: list[torch.Tensor] = []
            else:
                got = self.redis.get_many(job.hashes)
                ok = [b is not None for b in got]
                blocks = [b for b in got if b is not None]
            n = next((i for i, found in enumerate(ok) if not found), len(ok))
            self._done_q.put(_Fetched(job.request_id, job.hashes[:n], blocks[:n], job.slots, time.perf_counter() - t0))

    def _writer(self) -> None:
        assert self.redis is not None
        stop = False
        while not stop:
            batch: list[_Write] = []
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
            for w in batch:
                if w.ready is not None:
                    w.ready.synchronize()
            n = self.redis.put_encoded([(w.block_hash, self.redis.encode(w.block)) for w in batch])
            self.stats.written_to_redis += n
            for w in batch:
                if w.release is not None:
                    w.release()
            if batch and n == 0:
                # Not stored (Redis down): forget them so a later demotion can try again.
                with self._written_lock:
                    for w in batch:
                        self._written.pop(w.block_hash, None)
            for _ in range(len(batch) + stop):
                self._write_q.task_done()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until queued writes have been sent (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while self._write_q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self, close_store: bool = True) -> None:
        """Stop the worker threads (after the writes queued so far) and, with `close_store`, the
        Redis connections."""
        if self.redis is not None:
            self._read_q.put(None)
            self._write_q.put(None)
            for t in self._threads:
                t.join(timeout=5)
            if close_store:
                self.redis.close()
