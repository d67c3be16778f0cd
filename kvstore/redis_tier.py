"""The Redis tier: blocks as self-describing, checksummed values, pipelined, surviving outages.

Value layout: a fixed header (magic, format version, model fingerprint digest, layer count, KV
heads, head dim, block size, dtype, payload length, xxh3-64 of the payload) then the raw block.
Keys are namespaced by the fingerprint: ``ember:kv:<fingerprint digest>:<block hash>``. A value
whose header or checksum does not match is discarded, deleted and counted, never loaded.

Redis being unreachable is not an error for callers: operations return "missing"/"dropped", the
tier logs one warning per outage, counts it, and tries again after `retry_interval_s`.
"""
from __future__ import annotations

import logging
import struct
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence, TypeVar

import torch
import xxhash

from kvstore.resp import Connection, ConnectionPool, Endpoint, command, split
from kvstore.tiers import KVTier

log = logging.getLogger("ember.redis")
T = TypeVar("T")

MAGIC = b"EMKV"
FORMAT_VERSION = 1
# magic, version, fingerprint digest, layers, kv heads, head dim, block size, dtype, payload bytes, checksum
HEADER = struct.Struct("<4sH16sHHHHBQQ")
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
SECRET_KEY = b"ember:kv-secret"
Encoded = tuple[bytes, memoryview]  # (header, payload)
WINDOW = 2  # block commands in flight per socket

# Decoded payloads alias the received bytes; they are only ever copied from, never written.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy().data.cast("B")


class CorruptBlock(ValueError):
    pass


@dataclass(frozen=True)
class BlockFormat:
    fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def digest(self) -> bytes:
        return xxhash.xxh3_128_digest(self.fingerprint.encode())

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def payload_bytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()

    def payload_view(self, block: torch.Tensor) -> memoryview:
        """The bytes of `block` (a contiguous CPU tensor), without copying them."""
        return bytes_of(block.contiguous())

    def header(self, payload: memoryview) -> bytes:
        return HEADER.pack(
            MAGIC, FORMAT_VERSION, self.digest, self.num_layers, self.num_kv_heads, self.head_dim,
            self.block_size, DTYPE_CODES[self.dtype], len(payload), xxhash.xxh3_64_intdigest(payload),
        )

    def encode(self, block: torch.Tensor) -> bytes:
        """Header + payload as one value (the block client sends the two parts without joining)."""
        payload = self.payload_view(block)
        return self.header(payload) + payload.tobytes()

    def check(self, header: bytes | bytearray | memoryview, payload: memoryview) -> None:
        """Raises CorruptBlock saying what in (header, payload) does not match this format."""
        if len(header) < HEADER.size:
            raise CorruptBlock(f"value of {len(header)} bytes is shorter than the header")
        magic, version, digest, layers, heads, hdim, bs, dtype, nbytes, checksum = HEADER.unpack_from(header)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise CorruptBlock(f"bad magic/version {magic!r}/{version}")
        if digest != self.digest:
            raise CorruptBlock("block was written for another model fingerprint")
        if (layers, heads, hdim, bs, dtype) != (self.num_layers, self.num_kv_heads, self.head_dim, self.block_size, DTYPE_CODES[self.dtype]):
            raise CorruptBlock("block geometry differs from this model's")
        if nbytes != self.payload_bytes or len(payload) != nbytes:
            raise CorruptBlock(f"payload is {len(payload)} bytes, header says {nbytes}, expected {self.payload_bytes}")
        if xxhash.xxh3_64_intdigest(payload) != checksum:
            raise CorruptBlock("payload checksum mismatch")

    def decode(self, data: bytes) -> torch.Tensor:
        """The block in `data` (a view of it); raises CorruptBlock saying what does not match."""
        view = memoryview(data)
        self.check(view[: HEADER.size], view[HEADER.size :])
        flat = torch.frombuffer(data, dtype=torch.uint8, offset=HEADER.size)
        return flat.view(self.dtype).view(self.shape)


@dataclass
class RedisStats:
    errors: int = 0  # failed operations (connection lost, timeouts)
    outages: int = 0
    corrupt: int = 0  # values discarded for a bad header or checksum
    hits: int = 0
    misses: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


def make_client(url: str, timeout_s: float) -> Any:
    """redis:// and rediss:// give a client; redis+cluster://host:port gives a cluster client."""
    import redis
    from redis.cluster import RedisCluster

    if url.startswith("redis+cluster://"):
        return RedisCluster.from_url(
            "redis://" + url.removeprefix("redis+cluster://"),
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        )
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


class RedisTier(KVTier):
    """Blocks in Redis. Payloads of plain redis:// and unix:// servers travel over the block
    client (kvstore/resp.py: `connections` sockets in parallel, values read straight into a pinned
    staging buffer); cluster and TLS servers use redis-py pipelines. Control operations (ping,
    exists, delete, the shared secret) always use redis-py."""

    name = "redis"

    def __init__(
        self, url: str, fmt: BlockFormat, ttl_s: int | None = None, timeout_s: float = 5.0,
        retry_interval_s: float = 1.0, connections: int = 4, pin: bool = False,
    ) -> None:
        self.url = url
        self.fmt = fmt
        self.ttl_s = ttl_s
        self.retry_interval_s = retry_interval_s
        self.pin = pin  # staging buffers in page-locked memory (for asynchronous device copies)
        self.stats = RedisStats()
        self._prefix = b"ember:kv:" + fmt.digest.hex().encode() + b":"
        self._client = make_client(url, timeout_s)
        self._fast = url.startswith(("redis://", "unix://"))
        if self._fast:
            ep = Endpoint.from_url(url)
            self._readers = ConnectionPool(ep, connections, timeout_s)
            self._writers = ConnectionPool(ep, connections, timeout_s)
        self._down = False
        self._next_try = 0.0
        self._secret: bytes | None = None  # re-published when Redis comes back empty
        self._guard(lambda c: c.ping(), None)

    @property
    def available(self) -> bool:
        return not self._down

    def key(self, block_hash: bytes) -> bytes:
        return self._prefix + block_hash.hex().encode()

    def _guard(self, fn: Callable[[Any], T], fallback: T) -> T:
        import redis

        now = time.monotonic()
        if self._down and now < self._next_try:
            return fallback
        try:
            result = fn(self._client)
        except (redis.RedisError, OSError) as e:  # (RespError is an OSError too)
            self.stats.errors += 1
            if not self._down:
                self._down = True
                self.stats.outages += 1
                log.warning("Redis tier at %s unavailable (%s): falling back to recompute", self.url, e)
            self._next_try = now + self.retry_interval_s
            return fallback
        if self._down:
            self._down = False
            log.warning("Redis tier at %s is back", self.url)
            if self._secret is not None:
                # A restarted store may have lost the secret; keep serving under ours so that
                # later servers agree with this one (a secret another server set meanwhile wins
                # for them, and hashes then differ only until the next restart).
                secret = self._secret
                self._guard(lambda c: c.set(SECRET_KEY, secret, nx=True), None)
        return result

    def _pipeline(self, client: Any) -> Any:
        return client.pipeline(transaction=False)

    def encode(self, block: torch.Tensor) -> Encoded:
        """(header, payload view) of a CPU block: the payload is not copied, so `block` must stay
        unchanged until `put_encoded` returns."""
        payload = self.fmt.payload_view(block)
        return self.fmt.header(payload), payload

    def put_encoded(self, items: Sequence[tuple[bytes, Encoded]]) -> int:
        """Store encoded blocks (the mover encodes on its own thread); returns how many."""
        if not items:
            return 0
        ex = [b"EX", str(self.ttl_s).encode()] if self.ttl_s else []

        def send(conn: Connection, *, part: Sequence[tuple[bytes, Encoded]]) -> None:
            for j, (h, (head, payload)) in enumerate(part):
                n = len(head) + len(payload)
                key = self.key(h)
                pre = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (3 + len(ex), len(key), key, n)
                tail = b"\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(x), x) for x in ex)
                conn.send([pre, head, payload, tail])
                if j >= WINDOW:
                    conn.read_simple()  # keep at most WINDOW + 1 writes in flight
            for _ in part[-WINDOW:]:  # the replies not read above
                conn.read_simple()

        def run(c: Any) -> int:
            if self._fast:
                parts = split(len(items), len(self._writers.conns))
                self._writers.map([partial(send, part=items[r.start : r.stop]) for r in parts])
            else:
                pipe = self._pipeline(c)
                for h, (head, payload) in items:
                    pipe.set(self.key(h), head + bytes(payload), ex=self.ttl_s)
                pipe.execute()
            return len(items)

        n = self._guard(run, 0)
        self.stats.writes += n
        self.stats.bytes_written += sum(len(head) + len(p) for _, (head, p) in items) if n else 0
        return n

    def put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        return self.put_encoded([(h, self.encode(t)) for h, t in items])

    def _read(self, hashes: Sequence[bytes], rows: Sequence[memoryview]) -> tuple[list[int], list[bytearray]]:
        """Each value's payload into `rows[i]`; returns each value's length (-1: missing) and
        header. A value of the wrong length is skipped and reported by its length."""
        heads = [bytearray(HEADER.size) for _ in hashes]
        lengths = [-1] * len(hashes)
        expect = HEADER.size + self.fmt.payload_bytes

        def fetch(conn: Connection, *, r: range) -> None:
            # A shallow pipeline: Redis serves a few large values in flight far faster than a
            # deep queue of them (it buffers every queued reply before writing it out).
            conn.send([b"".join(command(b"GET", self.key(hashes[i])) for i in r[:WINDOW])])
            for j, i in enumerate(r):
                def sink(n: int, i: int = i) -> tuple[memoryview, memoryview] | None:
                    return (memoryview(heads[i]), rows[i]) if n == expect else None
                lengths[i] = conn.read_bulk(sink)
                if j + WINDOW < len(r):
                    conn.send([command(b"GET", self.key(hashes[r[j + WINDOW]]))])

        if self._fast:
            parts = split(len(hashes), len(self._readers.conns))
            self._readers.map([partial(fetch, r=r) for r in parts])
            return lengths, heads
        pipe = self._pipeline(self._client)
        for h in hashes:
            pipe.get(self.key(h))
        for i, value in enumerate(pipe.execute()):
            if value is None:
                continue
            lengths[i] = len(value)
            if len(value) == expect:
                heads[i][:] = value[: HEADER.size]
                rows[i][:] = memoryview(value)[HEADER.size :]
        return lengths, heads

    def get_into(self, hashes: Sequence[bytes], rows: Sequence[torch.Tensor]) -> list[bool]:
        """Read each block straight into `rows[i]` (a contiguous CPU tensor of one block, such as
        a host-tier slot); returns which were found and intact (the others' rows hold garbage)."""
        if not hashes:
            return []
        views = [bytes_of(r) for r in rows]
        assert all(len(v) == self.fmt.payload_bytes for v in views), "a row is not one block"
        none: tuple[list[int], list[bytearray]] = ([-1] * len(hashes), [])
        lengths, heads = self._guard(lambda c: self._read(hashes, views), none)
        found: list[bool] = []
        bad: list[bytes] = []
        for i, (h, n) in enumerate(zip(hashes, lengths)):
            if n < 0:
                self.stats.misses += 1
                found.append(False)
                continue
            try:
                if n != HEADER.size + self.fmt.payload_bytes:
                    raise CorruptBlock(f"value is {n} bytes, expected {HEADER.size + self.fmt.payload_bytes}")
                self.fmt.check(heads[i], views[i])
                found.append(True)
                self.stats.hits += 1
                self.stats.bytes_read += n
            except CorruptBlock as e:
                self.stats.corrupt += 1
                log.warning("discarding Redis block %s: %s", h.hex(), e)
                bad.append(h)
                found.append(False)
        if bad:
            self.delete_many(bad)
        return found

    def get_many(self, hashes: Sequence[bytes]) -> list[torch.Tensor | None]:
        """Blocks as views of one freshly allocated staging tensor (pinned when `pin`)."""
        # (n, payload bytes) in uint8; viewed as blocks once checked
        out = torch.empty((len(hashes), self.fmt.payload_bytes), dtype=torch.uint8, pin_memory=self.pin)
        found = self.get_into(hashes, list(out))
        return [out[i].view(self.fmt.dtype).view(self.fmt.shape) if ok else None for i, ok in enumerate(found)]

    def delete_many(self, hashes: Sequence[bytes]) -> None:
        def run(c: Any) -> None:
            pipe = self._pipeline(c)
            for h in hashes:
                pipe.delete(self.key(h))
            pipe.execute()

        self._guard(run, None)

    def flushdb(self) -> None:
        """Empty the whole database, not only this model's blocks (benchmarks between runs)."""
        self._guard(lambda c: c.flushdb(), None)

    def contains_many(self, hashes: Sequence[bytes]) -> list[bool]:
        if not hashes:
            return []

        def run(c: Any) -> list[bool]:
            pipe = self._pipeline(c)
            for h in hashes:
                pipe.exists(self.key(h))
            return [bool(x) for x in pipe.execute()]

        return self._guard(run, [False] * len(hashes))

    def shared_secret(self, candidate: bytes) -> bytes | None:
        """The secret kept in Redis (set to `candidate` if there is none yet); None when down."""

        def run(c: Any) -> bytes:
            c.set(SECRET_KEY, candidate, nx=True)
            return bytes(c.get(SECRET_KEY))

        secret = self._guard(run, None)
        self._secret = secret or candidate
        return secret

    def close(self) -> None:
        if self._fast:
            self._readers.close()
            self._writers.close()
        try:
            self._client.close()
        except Exception:  # closing a dead connection has nothing left to report
            pass

