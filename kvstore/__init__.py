"""Ember's KV store: block hashing, the device block pool and the per-request block tables.

Imports nothing from the other Ember packages but `kernels`; holds no model code.
"""
from __future__ import annotations

from kvstore.block_pool import Block, BlockPool
from kvstore.cache_manager import KVCacheManager
from kvstore.hashing import BlockHasher, model_fingerprint, tenant_salt

__all__ = ["Block", "BlockHasher", "BlockPool", "KVCacheManager", "model_fingerprint", "tenant_salt"]
