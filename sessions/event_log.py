"""A session's event log: every server event gets the next sequence number, and a reconnecting
client replays everything after the last one it saw."""
from __future__ import annotations

from collections import deque
from typing import Any, Iterator


class ResumeWindowExpired(Exception):
    """The client asked for events older than the retained window."""


class EventLog:
    """Invariant: retained events have consecutive seqs ending at `last_seq`; seqs start at 1 and
    never repeat, across connections and (through the store) restarts."""

    def __init__(self, retain: int = 10_000, last_seq: int = 0) -> None:
        self.retain = retain
        self.last_seq = last_seq
        self._events: deque[dict[str, Any]] = deque(maxlen=retain)

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Stamp `event` with the next seq (mutating it) and retain it."""
        self.last_seq += 1
        event["seq"] = self.last_seq
        self._events.append(event)
        return event

    def restore(self, events: list[dict[str, Any]]) -> None:
        """Refill from persisted events (oldest first), e.g. after a restart."""
        self._events.clear()
        for e in events[-self.retain :]:
            self._events.append(e)
        if events:
            self.last_seq = max(self.last_seq, int(events[-1]["seq"]))

    def since(self, after_seq: int) -> Iterator[dict[str, Any]]:
        """Events with seq > after_seq. Raises ResumeWindowExpired if some were dropped."""
        first = self._events[0]["seq"] if self._events else self.last_seq + 1
        if after_seq + 1 < first:
            raise ResumeWindowExpired(f"events after seq {after_seq} are no longer retained (oldest is {first})")
        return (e for e in list(self._events) if e["seq"] > after_seq)

    def __len__(self) -> int:
        return len(self._events)
