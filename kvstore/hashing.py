"""Block hashes that are stable across processes, restarts and replicas.

- Token ids are hashed as little-endian uint32 bytes.
- A full block's hash is ``xxh3_128(parent_hash (16 bytes) + token bytes)``.
- The chain's root is ``xxh3_128(model fingerprint + tenant salt)``: two servers with the same model
  and secret compute the same hashes, different models or tenants never share a block.
- A tenant's salt is an HMAC of the tenant id under a server secret, so nobody who lacks the secret
  can craft a colliding chain for another tenant.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import xxhash

HASH_BYTES = 16


def model_fingerprint(
    architecture: str, config_hash: str, weights_id: str, kv_dtype: str, block_size: int
) -> str:
    """The identity of everything that determines a block's KV values."""
    return f"ember-kv-v1|{architecture}|{config_hash}|{weights_id}|{kv_dtype}|bs{block_size}"


def tenant_salt(secret: bytes, tenant: str) -> bytes:
    """A per-tenant salt; without `secret` it cannot be predicted."""
    return hmac.new(secret, tenant.encode("utf-8"), hashlib.sha256).digest()


def token_bytes(token_ids: Sequence[int]) -> bytes:
    return np.asarray(token_ids, dtype="<u4").tobytes()


@dataclass(frozen=True, slots=True)
class BlockHasher:
    """Hashes full blocks of one (model, tenant) chain."""

    root: bytes
    block_size: int

    @classmethod
    def create(cls, fingerprint: str, salt: bytes, block_size: int) -> BlockHasher:
        root = xxhash.xxh3_128_digest(fingerprint.encode("utf-8") + salt)
        return cls(root=root, block_size=block_size)

    def hash_block(self, parent: bytes | None, token_ids: Sequence[int]) -> bytes:
        assert len(token_ids) == self.block_size, "only full blocks are hashed"
        return xxhash.xxh3_128_digest((parent or self.root) + token_bytes(token_ids))

    def extend(self, hashes: list[bytes], token_ids: Sequence[int]) -> None:
        """Append to `hashes` the hash of every full block of `token_ids` not yet hashed.

        `hashes` holds the chain for the first ``len(hashes)`` blocks of `token_ids`; after the call
        it covers every full block. Work is proportional to the blocks added, not to the sequence.
        """
        bs = self.block_size
        start = len(hashes)
        end = len(token_ids) // bs
        if end <= start:
            return
        parent = hashes[-1] if hashes else self.root
        data = np.asarray(token_ids[start * bs : end * bs], dtype="<u4")
        for i in range(end - start):
            parent = xxhash.xxh3_128_digest(parent + data[i * bs : (i + 1) * bs].tobytes())
            hashes.append(parent)
