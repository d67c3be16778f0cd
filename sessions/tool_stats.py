"""How long a session's KV stays pinned while it waits on a tool: learned from that tool's recent
durations (a high percentile with a margin), floored and capped."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class ToolStats:
    window: int = 64  # recent durations kept per tool
    quantile: float = 0.9
    margin: float = 1.25
    floor_s: float = 0.05
    cap_s: float = 30.0
    default_s: float = 5.0  # a tool never seen yet
    _durations: dict[str, deque[float]] = field(default_factory=dict)

    def observe(self, tool: str, seconds: float) -> None:
        self._durations.setdefault(tool, deque(maxlen=self.window)).append(max(0.0, seconds))

    def ttl(self, tool: str) -> float:
        d = self._durations.get(tool)
        if not d:
            return min(self.default_s, self.cap_s)
        ordered = sorted(d)
        q = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
        return min(self.cap_s, max(self.floor_s, q * self.margin))
