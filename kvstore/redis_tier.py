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
from typing import Any, Callable, Sequence, TypeVar

import torch
import xxhash

from kvstore.tiers import KVTier

log = logging.getLogger("ember.redis")
T = TypeVar("T")

MAGIC = b"EMKV"
FORMAT_VERSION = 1
# magic, version, fingerprint digest, layers, kv heads, head dim, block size, dtype, payload bytes, checksum
HEADER = struct.Struct("<4sH16sHHHHBQQ")
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
SECRET_KEY = b"ember:kv-secret"

# Decoded payloads alias the received bytes; they are only ever copied from, never written.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


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

    def encode(self, block: torch.Tensor) -> bytearray:
        """Header + payload in one buffer (the payload copied once from `block`, a CPU tensor)."""
        payload = block.contiguous().reshape(-1).view(torch.uint8).numpy()
        out = bytearray(HEADER.size + payload.nbytes)
        out[HEADER.size :] = payload.data
        checksum = xxhash.xxh3_64_intdigest(memoryview(out)[HEADER.size :])
        HEADER.pack_into(
            out, 0, MAGIC, FORMAT_VERSION, self.digest, self.num_layers, self.num_kv_heads,
            self.head_dim, self.block_size, DTYPE_CODES[self.dtype], payload.nbytes, checksum,
        )
        return out

    def decode(self, data: bytes) -> torch.Tensor:
        """The block in `data`; raises CorruptBlock saying what does not match."""
        if len(data) < HEADER.size:
            raise CorruptBlock(f"value of {len(data)} bytes is shorter than the header")
        magic, version, digest, layers, heads, hdim, bs, dtype, nbytes, checksum = HEADER.unpack_from(data)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise CorruptBlock(f"bad magic/version {magic!r}/{version}")
        if digest != self.digest:
            raise CorruptBlock("block was written for another model fingerprint")
        if (layers, heads, hdim, bs, dtype) != (self.num_layers, self.num_kv_heads, self.head_dim, self.block_size, DTYPE_CODES[self.dtype]):
            raise CorruptBlock("block geometry differs from this model's")
        if nbytes != self.payload_bytes or len(data) != HEADER.size + nbytes:
            raise CorruptBlock(f"payload is {len(data) - HEADER.size} bytes, header says {nbytes}, expected {self.payload_bytes}")
        if xxhash.xxh3_64_intdigest(memoryview(data)[HEADER.size :]) != checksum:
            raise CorruptBlock("payload checksum mismatch")
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
    name = "redis"

    def __init__(
        self, url: str, fmt: BlockFormat, ttl_s: int | None = None, timeout_s: float = 5.0, retry_interval_s: float = 1.0
    ) -> None:
        self.url = url
        self.fmt = fmt
        self.ttl_s = ttl_s
        self.retry_interval_s = retry_interval_s
        self.stats = RedisStats()
        self._prefix = b"ember:kv:" + fmt.digest.hex().encode() + b":"
        self._client = make_client(url, timeout_s)
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
        except (redis.RedisError, OSError) as e:
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

    def put_encoded(self, items: Sequence[tuple[bytes, bytes | bytearray]]) -> int:
        """Store already-encoded values (the mover encodes on its own thread)."""
        if not items:
            return 0

        def run(c: Any) -> int:
            pipe = self._pipeline(c)
            for h, value in items:
                pipe.set(self.key(h), value, ex=self.ttl_s)
            pipe.execute()
            return len(items)

        n = self._guard(run, 0)
        self.stats.writes += n
        self.stats.bytes_written += sum(len(v) for _, v in items) if n else 0
        return n

    def put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        return self.put_encoded([(h, self.fmt.encode(t)) for h, t in items])

    def get_many(self, hashes: Sequence[bytes]) -> list[torch.Tensor | None]:
        if not hashes:
            return []

        def run(c: Any) -> list[Any]:
            pipe = self._pipeline(c)
            for h in hashes:
                pipe.get(self.key(h))
            return list(pipe.execute())

        raw = self._guard(run, [None] * len(hashes))
        out: list[torch.Tensor | None] = []
        bad: list[bytes] = []
        for h, value in zip(hashes, raw):
            if value is None:
                self.stats.misses += 1
                out.append(None)
                continue
            try:
                out.append(self.fmt.decode(value))
                self.stats.hits += 1
                self.stats.bytes_read += len(value)
            except CorruptBlock as e:
                self.stats.corrupt += 1
                log.warning("discarding Redis block %s: %s", h.hex(), e)
                bad.append(h)
                out.append(None)
        if bad:
            self.delete_many(bad)
        return out

    def delete_many(self, hashes: Sequence[bytes]) -> None:
        def run(c: Any) -> None:
            pipe = self._pipeline(c)
            for h in hashes:
                pipe.delete(self.key(h))
            pipe.execute()

        self._guard(run, None)

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
        try:
            self._client.close()
        except Exception:  # closing a dead connection has nothing left to report
            pass

