"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of a step.

A kernel launched with PDL may be scheduled while the kernel before it in the stream is still
running, so the launch latency and the start of its programs overlap the predecessor's tail
instead of following it. A decode step at small batch is some 300 launches of a few microseconds
each, where that overlap is worth a tenth of the step. Kernels that take part follow three
rules, which keep every launch order the stream would have given:

1. `wait` first: before any load of data another kernel writes, before any store, and before any
   early return. So a kernel never reads a stale value or overwrites one its predecessor still
   reads, and since every program waits, a kernel completes only after its predecessor did: the
   chain is transitive (C reading what A wrote, with B between them, is safe).
2. `launch_dependents` only after `wait`: the next kernel's programs are scheduled once all of
   this kernel's are running, so at most one kernel waits ahead of the one that works.
3. Only data no kernel writes may be touched before `wait`: the skinny multiply
   (kernels.skinny_gemm) prefetches the start of its weight slab into L2 there, reading weights
   while the memory bus would otherwise idle behind a latency-bound predecessor.

Kernels launched without PDL (torch's, cuBLAS's) wait for their predecessor to finish as usual.
Off Hopper, and in Triton's interpreter, nothing changes: the kernels compile without the
instructions and launch normally.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import triton
import triton.language as tl


@dataclass(slots=True)
class Settings:
    enabled: bool = os.environ.get("EMBER_PDL", "1") != "0"
    # Bytes of weights a skinny multiply may prefetch into L2 before its wait, over all its
    # programs. Measured on an H200 (bench/gpu_decode.py --pdl): 8 MB is the best of 0/8/16/32,
    # by little; 16 and 32 MB are slower than none (the lines compete with the running kernel's
    # reads and are partly evicted before the loop reaches them).
    prefetch_bytes: int = int(os.environ.get("EMBER_PDL_PREFETCH_MB", "8")) << 20


settings = Settings()


@lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def active(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (a CUDA device of compute capability 9+, not
    under Triton's interpreter, and `settings.enabled`)."""
    if not settings.enabled or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch(device: torch.device) -> dict[str, Any]:
    """Keyword arguments for a participating kernel's launch: its USE_PDL constexpr, and the
    launch attribute when active."""
    return {"USE_PDL": True, "launch_pdl": True} if active(device) else {"USE_PDL": False}


@triton.jit
def wait(USE_PDL: tl.constexpr):
    """Rule 1: block until the predecessor kernel has finished and its writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def launch_dependents(USE_PDL: tl.constexpr):
    """Rule 2: let the next kernel's programs be scheduled (once every program here got here)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 to fetch the lines at `ptrs` (any shape of pointers; no result, nothing waits)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs.to(tl.int64)],
                              dtype=tl.int32, is_pure=False, pack=1)
