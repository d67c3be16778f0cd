"""Working-set admission: serves sessions in the order they started, as many at a time as the
device pool holds.

Agents' contexts grow turn by turn. When every session is served at once, the sessions share the
card: all of them slow down together and finish late, and once their contexts outgrow device
memory each turn copies its context back in from host RAM, or, once they outgrow host RAM too,
recomputes it (least-recently-used eviction meets its worst case: the agents take turns in a
cycle, so the context evicted is always the one whose turn comes next). Instead, sessions are
served in the order they started while their contexts fit within the capacity (a multiple of the
device pool); a session that does not fit behind the earlier ones has its turns wait (they stay
queued, while its blocks age out to the lower tiers first) until earlier sessions finish or go
quiet. The earliest sessions thus run as if the card were theirs and finish first, which lowers
the mean completion time; the engine never idles for it: with nothing running, any turn may start.

A session is live from its first admitted turn until it goes quiet: no turn of it is queued or
running, and the time it was expected back by has passed (a turn that ended without tool calls
expects nothing). Its size is the token count of its latest turn. The same order ranks turns
within a priority class (`rank`). With `keep_live` (the engine's default), only sessions not yet
live wait for room: a live session's turns start even when earlier sessions' growth has pushed it
past the capacity, since its context is already held and holding its turn back only delays it.
Likewise a session that went quiet while a tool of it ran past its expected time (it is away,
mid-task: its tokens leave the total, so others may start) resumes at its old place when the
tool returns, rather than queueing as a new session behind every live one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class _Live:
    tokens: int
    until: float  # expected back by; math.inf while a turn is in flight
    rank: int  # its place in the order (smaller: admitted earlier)
    returns: bool = False  # awaiting a tool: going quiet makes it away, not gone


class WorkingSetAdmission:
    """Invariant: live sessions are kept in the order their first turns were admitted (the
    dict's insertion order is rank order) and a session keeps its place while it stays live or
    away; the sessions that fit are the longest head of that order whose tokens sum to at most
    `capacity_tokens` (the first session always fits)."""

    MAX_AWAY = 65536  # away sessions remembered (the oldest are forgotten first: they start anew)

    def __init__(self, capacity_tokens: int, keep_live: bool = False) -> None:
        if capacity_tokens <= 0:
            raise ValueError(f"capacity_tokens must be positive, got {capacity_tokens}")
        self.capacity_tokens = capacity_tokens
        # With keep_live, the bound applies to sessions starting only: a live session's turns
        # always start, even after earlier sessions' growth pushed it out of the fitting head
        # (its turns would otherwise wait, with its context on the card, until they finish).
        self.keep_live = keep_live
        self._live: dict[str, _Live] = {}
        self._away: dict[str, int] = {}  # with keep_live: session -> rank, of sessions away mid-task
        # The fitting head and the live total, recomputed after any change (a step asks about
        # many queued turns; each answer is then O(1)).
        self._fitting: set[str] | None = None
        self._total = 0
        self._at = -math.inf
        self.num_held = 0  # times a turn was held back (once per step that considers it)
        self._next_rank = 0
        # Bumped by every change that may change an answer of `admits`, except time passing
        # (see `quiet_at`): a caller that saw every turn held may skip asking again until then.
        self.version = 0

    def admits(self, session_id: str, tokens: int, now: float) -> bool:
        """Whether a turn of `session_id` may start: a live session if it is in the fitting head
        (by the size of its last turn) or `keep_live` is set, another if `tokens` more fit after
        every live session. Counts a refusal in `num_held`."""
        self._refresh(now)
        assert self._fitting is not None
        if session_id in self._live:
            ok = self.keep_live or session_id in self._fitting
        else:  # (an away session resumes: only kept with keep_live)
            ok = session_id in self._away or self._total == 0 or self._total + tokens <= self.capacity_tokens
        self.num_held += not ok
        return ok

    def started(self, session_id: str, tokens: int) -> None:
        """A turn of the session was admitted: it is live (at the order's end if it was not),
        in flight, `tokens` long."""
        rec = self._live.get(session_id)
        if rec is None:
            rank = self._away.pop(session_id, None)
            if rank is None:
                self._live[session_id] = _Live(tokens, math.inf, self._next_rank)
                self._next_rank += 1
            else:  # back at its old place
                self._live[session_id] = _Live(tokens, math.inf, rank)
                self._live = dict(sorted(self._live.items(), key=lambda kv: kv[1].rank))
        else:
            rec.tokens, rec.until, rec.returns = tokens, math.inf, False
        self._changed()

    def queued(self, session_id: str) -> None:
        """A turn of the session was queued: a live session stays live (in its place) while it
        waits, however long the queue."""
        rec = self._live.get(session_id)
        if rec is not None:
            rec.until = math.inf
            self._changed()

    def finished(self, session_id: str, tokens: int, until: float) -> None:
        """A turn of the session ended with the session `tokens` long; it is expected back by
        `until` (a time already past: not expected)."""
        rec = self._live.get(session_id)
        if rec is not None:
            rec.tokens, rec.until = tokens, until
            self._changed()

    def expect(self, session_id: str, until: float, returns: bool = False) -> None:
        """The session's owner knows better when it returns (a tool's learned duration), or that
        it will not soon (`until` in the past). `returns`: it awaits a tool, so it will be back
        even past `until` (it is then away). No effect while a turn is in flight."""
        rec = self._live.get(session_id)
        if rec is not None and rec.until != math.inf:
            rec.until, rec.returns = until, returns
            self._changed()
        elif rec is None and not returns:
            self._away.pop(session_id, None)

    def quiet_at(self, now: float) -> float:
        """The first time after `now` at which a live session goes quiet (math.inf: none is
        expected to), when the answers of `admits` may change without any call here."""
        return min((r.until for r in self._live.values() if now < r.until), default=math.inf)

    def rank(self, session_id: str | None) -> float:
        """The session's place in the order while it is live (smaller: earlier); math.inf for
        one that is not live, or no session."""
        rec = self._live.get(session_id) if session_id is not None else None
        return rec.rank if rec is not None else math.inf

    def live_tokens(self, now: float) -> int:
        self._refresh(now)
        return self._total

    def _changed(self) -> None:
        self._fitting = None
        self.version += 1

    def _refresh(self, now: float) -> None:
        if self._fitting is not None and now == self._at:
            return
        for sid in [sid for sid, r in self._live.items() if r.until <= now]:
            rec = self._live.pop(sid)
            if rec.returns and self.keep_live:
                self._away[sid] = rec.rank
                if len(self._away) > self.MAX_AWAY:
                    del self._away[next(iter(self._away))]
            self.version += 1
        fitting: set[str] = set()
        used = 0
        for sid, rec in self._live.items():
            if fitting and used + rec.tokens > self.capacity_tokens:
                break  # strictly in order: a later, smaller session does not overtake this one
            fitting.add(sid)
            used += rec.tokens
        self._fitting, self._at = fitting, now
        self._total = sum(r.tokens for r in self._live.values())
