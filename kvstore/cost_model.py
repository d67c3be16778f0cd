"""Restore or recompute: predicted load time of a span from a tier against predicted prefill time.

Bandwidths start from a start-up calibration (or a configured value, which then stays fixed) and
follow observed transfers with an exponential moving average; prefill throughput follows the
engine's own prefill steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CostModel:
    bytes_per_token: int
    prefill_tokens_per_s: float
    bandwidth: dict[str, float] = field(default_factory=dict)  # tier -> bytes/s
    latency_s: dict[str, float] = field(default_factory=dict)  # tier -> fixed cost per load
    fixed: frozenset[str] = frozenset()  # tiers whose bandwidth was configured, not learned
    alpha: float = 0.2

    def load_s(self, tier: str, tokens: int) -> float:
        bw = self.bandwidth.get(tier, 0.0)
        if bw <= 0:
            return float("inf")
        return self.latency_s.get(tier, 0.0) + tokens * self.bytes_per_token / bw

    def recompute_s(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s

    def should_load(self, tier: str, tokens: int) -> bool:
        return tokens > 0 and self.load_s(tier, tokens) < self.recompute_s(tokens)

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if tier in self.fixed or seconds <= 0 or nbytes <= 0:
            return
        bw = nbytes / seconds
        old = self.bandwidth.get(tier)
        self.bandwidth[tier] = bw if old is None else (1 - self.alpha) * old + self.alpha * bw

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if seconds > 0 and tokens > 0:
            rate = tokens / seconds
            self.prefill_tokens_per_s = (1 - self.alpha) * self.prefill_tokens_per_s + self.alpha * rate
