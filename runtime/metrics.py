"""Prometheus metrics (`ember_` names) for a serving engine: its own registry, so several engines
in one process never collide. Latencies are observed on the engine thread as outputs are made;
gauges are refreshed when scraped."""
from __future__ import annotations

import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge("ember_running_sequences", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("ember_waiting_sequences", "Sequences waiting to be scheduled", registry=r)
        self.loading = Gauge("ember_loading_sequences", "Sequences waiting for blocks from a lower tier", registry=r)
        self.tokens = Counter("ember_generated_tokens", "Generated tokens", registry=r)
        self.tokens_per_s = Gauge("ember_generation_tokens_per_second", "Generated tokens/s over the last 10 s", registry=r)
        self.ttft = Histogram("ember_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("ember_inter_token_seconds", "Time between a request's tokens", buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Gauge("ember_prompt_tokens", "Prompt tokens by source since start", ["tier"], registry=r)
        self.blocks = Gauge("ember_kv_blocks", "KV blocks by tier and use", ["tier", "use"], registry=r)
        self.pinned = Gauge("ember_pinned_blocks", "Device blocks pinned by sessions", registry=r)
        self.preemptions = Gauge("ember_preemptions", "Preemptions since start", registry=r)
        self.redis = Gauge("ember_redis_events", "Redis tier events since start", ["event"], registry=r)
        self.redis_up = Gauge("ember_redis_available", "1 when the Redis tier is reachable", registry=r)
        self.sessions = Gauge("ember_sessions", "Sessions by state", ["state"], registry=r)
        self._last: dict[str, float] = {}
        self._recent: deque[tuple[float, int]] = deque()

    def on_outputs(self, outputs: list[Any], arrivals: dict[str, float]) -> None:
        """Engine thread, after a step: latency observations for each request that got tokens."""
        now = time.monotonic()
        n = 0
        for out in outputs:
            k = len(out.delta_token_ids)
            if not k:
                continue
            n += k
            last = self._last.get(out.request_id)
            if last is None:
                if out.request_id in arrivals:
                    self.ttft.observe(now - arrivals[out.request_id])
            else:
                self.itl.observe(now - last)
            if out.finished:
                self._last.pop(out.request_id, None)
            else:
                self._last[out.request_id] = now
        if n:
            self.tokens.inc(n)
            self._recent.append((now, n))

    def refresh(self, engine: Any, sessions: list[Any]) -> None:
        """Engine thread, at scrape time: read the engine's state into the gauges."""
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - 10:
            self._recent.popleft()
        self.tokens_per_s.set(sum(n for _, n in self._recent) / 10.0)
        sched = engine.scheduler
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.loading.set(len(sched.loading))
        self.preemptions.set(sched.stats.num_preemptions)
        for tier, n in sched.stats.prompt_tokens_by_tier.items():
            self.prompt_tokens.labels(tier).set(n)
        kv = engine.kv_manager
        self.blocks.labels("gpu", "used").set(kv.num_in_use)
        self.blocks.labels("gpu", "free").set(kv.pool.num_free)
        self.blocks.labels("gpu", "cached").set(kv.pool.num_cached)
        self.pinned.set(kv.pinned_blocks())
        mover = engine.mover
        if mover is not None and mover.host is not None:
            self.blocks.labels("host", "used").set(len(mover.host))
            self.blocks.labels("host", "capacity").set(mover.host.num_slots)
        if mover is not None and mover.redis is not None:
            st = mover.redis.stats
            for name in ("errors", "outages", "corrupt", "hits", "misses", "writes"):
                self.redis.labels(name).set(getattr(st, name))
            self.redis_up.set(1 if mover.redis.available else 0)
        counts: dict[str, int] = {"idle": 0, "generating": 0, "awaiting_tool": 0}
        for s in sessions:
            counts[s.state.value] = counts.get(s.state.value, 0) + 1
        for state, n in counts.items():
            self.sessions.labels(state).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
