"""Where a window of engine steps spends the GPU's time: torch.profiler over a few seconds of a
live run, summarised on the spot (a raw trace of thousands of steps is too big to bring back).

    window = StepWindow()
    window.start()
    with window.step():          # around each engine.step()
        engine.step()
    summary = window.stop(kinds)  # kinds[i]: a label for the i-th step profiled ("decode", ...)

The summary gives, per kind of step, its wall time against the time the GPU spent in kernels and
in copies inside it; over the whole window, the GPU's busy and idle time, the copies by direction
and the kernels that took the most time. Kernels replayed from CUDA graphs are traced too.
"""
from __future__ import annotations

import bisect
import contextlib
import math
from collections import defaultdict
from typing import Any, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

STEP = "ember_step"


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge overlapping (start, end) intervals; sorted, disjoint."""
    merged: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _covered(merged: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of [lo, hi) covered by disjoint sorted intervals (their ends ascend too, so the
    first one to reach past lo is found by bisection)."""
    total = 0.0
    for s, e in merged[max(0, bisect.bisect_right(merged, (lo, math.inf)) - 1):]:
        if s >= hi:
            break
        total += max(0.0, min(e, hi) - max(s, lo))
    return total


def _kind(kernel: str) -> str:
    if kernel.startswith("_decode_kernel"):
        return "decode attention"
    if kernel.startswith("_prefill_kernel"):
        return "extend attention"
    if kernel.startswith(("nvjet", "_skinny_kernel")) or "gemm" in kernel.lower():
        return "matmul"
    return "other"


class StepWindow:
    def __init__(self) -> None:
        cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
        self._prof = profile(activities=[ProfilerActivity.CPU, *cuda])
        self.active = False

    def start(self) -> None:
        self._prof.start()
        self.active = True

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if not self.active:
            yield
            return
        with record_function(STEP):
            yield

    def stop(self, kinds: list[str]) -> dict[str, Any]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._prof.stop()
        self.active = False
        events = self._prof.events()
        # A step's record_function shows twice: its host range, and an annotation on the GPU's
        # timeline (one per stream it touched). The host ranges are the steps; the annotations
        # are neither steps nor work.
        cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
        steps = sorted((e.time_range.start, e.time_range.end) for e in events
                       if e.name == STEP and e.device_type == cpu)
        gpu = [e for e in events if e.device_type == cuda and e.name != STEP]
        if len(steps) != len(kinds):
            raise ValueError(f"{len(steps)} steps profiled but {len(kinds)} kinds given")
        copies: dict[str, list[tuple[float, float]]] = defaultdict(list)
        kernels: list[tuple[float, float]] = []
        by_name: dict[str, float] = defaultdict(float)
        for e in gpu:
            span = (e.time_range.start, e.time_range.end)
            if e.name.startswith("Memcpy") or e.name.startswith("Memset"):
                direction = e.name.split()[1] if len(e.name.split()) > 1 else e.name
                copies[direction].append(span)
            else:
                kernels.append(span)
                by_name[e.name[:70]] += span[1] - span[0]
        busy = _union(kernels)
        copy_union = {k: _union(v) for k, v in copies.items()}
        lo = steps[0][0] if steps else 0.0
        hi = steps[-1][1] if steps else 0.0
        per_kind: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for (s, e), kind in zip(steps, kinds):
            k = per_kind[kind]
            k["steps"] += 1
            k["wall_ms"] += (e - s) / 1e3
            k["gpu_kernels_ms"] += _covered(busy, s, e) / 1e3
            for d, u in copy_union.items():
                k[f"copy_{d}_ms"] += _covered(u, s, e) / 1e3
        window_ms = (hi - lo) / 1e3
        return {
            "steps": len(steps), "window_ms": window_ms,
            "gpu_kernels_busy_ms": _covered(busy, lo, hi) / 1e3,
            "copies_busy_ms": {d: _covered(u, lo, hi) / 1e3 for d, u in copy_union.items()},
            "between_steps_ms": window_ms - sum((e - s) for s, e in steps) / 1e3,
            "by_step_kind": {k: dict(v) for k, v in per_kind.items()},
            "kernels_by_kind_ms": {k: sum(t for n, t in by_name.items() if _kind(n) == k) / 1e3
                                   for k in ("decode attention", "extend attention", "matmul", "other")},
            "top_kernels_ms": {n: t / 1e3 for n, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:15]},
        }
