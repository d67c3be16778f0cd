"""Counters for kernels whose last program reduces the other programs' partial results, so a
split computation needs no second launch.

The protocol: a program stores its partial, waits for its own threads (a barrier), then adds 1 to
its counter with acquire-release semantics at GPU scope; the program that sees the count reach
the number of parts reads every partial (bypassing its L1, which may hold stale lines), writes
the result and sets the counter back to zero. Every call therefore leaves the counters at zero for
the next one, which CUDA graphs rely on: the buffer is allocated once per device and never moved
(a graph holds its address).
"""
from __future__ import annotations

import torch

MAX_COUNTERS = 1 << 16
_counters: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device, n: int) -> torch.Tensor:
    """The device's zeroed int32 counters (at least `n`). Calls on one stream run one after
    another, so all kernels share them."""
    if n > MAX_COUNTERS:
        raise ValueError(f"{n} counters exceed the {MAX_COUNTERS} kept per device")
    c = _counters.get(device)
    if c is None:
        c = _counters[device] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return c
