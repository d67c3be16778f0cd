"""Working-set admission: keeps the sessions being served within what the KV tiers can hold.

Agents' contexts grow turn by turn. Once the sessions in flight hold more KV than device memory
and host RAM together, least-recently-used eviction meets the worst access pattern there is: the
agents take turns in a cycle, so the context evicted is always the one whose turn comes next, and
nearly every turn recomputes its whole prompt. Instead, sessions are served in the order they
started; a session whose working set does not fit behind the earlier ones has its turns wait
(they stay queued, while its blocks age out of the tiers first) until earlier sessions finish or
go quiet. The engine never idles for it: with nothing running, any turn may start.

A session is live from its first admitted turn until it goes quiet: its last turn ended and the
time it was expected back by has passed (a turn that ended without tool calls expects nothing).
Its size is the token count of its latest turn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class _Live:
    since: float  # when its first turn was admitted (the serving order)
    tokens: int
    until: float  # expected back by; math.inf while a turn is in flight


class WorkingSetAdmission:
    """Invariant: a live session's position in the serving order never changes while it stays
    live; `admits` is True for every session within `capacity_tokens` of the order's head."""

    def __init__(self, capacity_tokens: int) -> None:
        if capacity_tokens <= 0:
            raise ValueError(f"capacity_tokens must be positive, got {capacity_tokens}")
        self.capacity_tokens = capacity_tokens
        self._live: dict[str, _Live] = {}
        self.num_held = 0  # times a turn was held back

    def admits(self, session_id: str, tokens: int, now: float) -> bool:
        """Whether a turn of `session_id` needing `tokens` fits behind the sessions served before
        it (a session not live joins the order's end). Counts a refusal in `num_held`."""
        self._expire(now)
        mine = self._live.get(session_id)
        used = 0
        for sid, rec in sorted(self._live.items(), key=lambda kv: kv[1].since):
            if sid == session_id:
                break
            used += rec.tokens
        need = max(tokens, mine.tokens if mine else 0)
        ok = used == 0 or used + need <= self.capacity_tokens
        self.num_held += not ok
        return ok

    def started(self, session_id: str, tokens: int, now: float) -> None:
        """A turn of the session was admitted: it is live, in flight, `tokens` long."""
        rec = self._live.get(session_id)
        if rec is None:
            self._live[session_id] = _Live(now, tokens, math.inf)
        else:
            rec.tokens, rec.until = tokens, math.inf

    def finished(self, session_id: str, tokens: int, until: float) -> None:
        """A turn of the session ended with the session `tokens` long; it is expected back by
        `until` (a time already past: not expected)."""
        rec = self._live.get(session_id)
        if rec is not None:
            rec.tokens, rec.until = tokens, until

    def expect(self, session_id: str, until: float) -> None:
        """The session's owner knows better when it returns (a tool's learned duration), or that
        it will not soon (`until` in the past)."""
        rec = self._live.get(session_id)
        if rec is not None and rec.until != math.inf:
            rec.until = until

    def live_tokens(self, now: float) -> int:
        self._expire(now)
        return sum(r.tokens for r in self._live.values())

    def _expire(self, now: float) -> None:
        for sid in [sid for sid, r in self._live.items() if r.until <= now]:
            del self._live[sid]
