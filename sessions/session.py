"""A session: one agent's conversation, kept on the server between turns."""
from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sessions.event_log import EventLog


class SessionState(enum.Enum):
    IDLE = "idle"
    GENERATING = "generating"
    AWAITING_TOOL = "awaiting_tool"
    CLOSED = "closed"


class TransitionError(Exception):
    """A state change the session's state machine does not allow."""


_ALLOWED = {
    SessionState.IDLE: {SessionState.GENERATING, SessionState.CLOSED},
    SessionState.GENERATING: {SessionState.IDLE, SessionState.AWAITING_TOOL, SessionState.CLOSED},
    SessionState.AWAITING_TOOL: {SessionState.GENERATING, SessionState.IDLE, SessionState.CLOSED},
    SessionState.CLOSED: set(),
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


@dataclass(eq=False)
class Session:
    """Holds no tensors. `token_ids` is append-only and is the source of truth for the prompt:
    items are rendered as deltas onto it, never re-rendered."""

    id: str
    tenant: str
    created_at: float = field(default_factory=time.time)
    metadata: dict[str, Any] = field(default_factory=dict)
    instructions: str | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    state: SessionState = SessionState.IDLE
    forked_from: str | None = None
    last_active: float = field(default_factory=time.monotonic)
    # call_id -> (tool name, time the call was emitted): the tools the session is waiting on.
    pending_calls: dict[str, tuple[str, float]] = field(default_factory=dict)
    # Whether the next turn returns from a tool call (the scheduler's highest class).
    returning_from_tool: bool = False
    log: EventLog = field(default_factory=EventLog)

    def transition(self, new: SessionState) -> None:
        if new not in _ALLOWED[self.state]:
            raise TransitionError(f"session {self.id}: {self.state.value} -> {new.value} is not allowed")
        self.state = new
        self.last_active = time.monotonic()

    def append_tokens(self, ids: list[int]) -> None:
        self.token_ids.extend(ids)
        self.last_active = time.monotonic()

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "created_at": int(self.created_at), "last_seq": self.log.last_seq,
                "state": self.state.value, "metadata": self.metadata}

    def to_record(self) -> dict[str, Any]:
        """Everything needed to rebuild the session in another process (the event log apart)."""
        return {
            "id": self.id, "tenant": self.tenant, "created_at": self.created_at, "metadata": self.metadata,
            "instructions": self.instructions, "tools": self.tools, "items": self.items,
            "token_ids": self.token_ids, "state": self.state.value, "forked_from": self.forked_from,
            "pending_calls": {k: [n, 0.0] for k, (n, _) in self.pending_calls.items()},
            "returning_from_tool": self.returning_from_tool, "last_seq": self.log.last_seq,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any], retain: int = 10_000) -> Session:
        state = SessionState(rec["state"])
        if state == SessionState.GENERATING:
            state = SessionState.IDLE  # the response in flight died with the old process
        s = cls(
            id=rec["id"], tenant=rec["tenant"], created_at=rec["created_at"], metadata=rec["metadata"],
            instructions=rec["instructions"], tools=rec["tools"], items=rec["items"],
            token_ids=list(rec["token_ids"]), state=state, forked_from=rec.get("forked_from"),
            pending_calls={k: (v[0], time.monotonic()) for k, v in rec.get("pending_calls", {}).items()},
            returning_from_tool=rec.get("returning_from_tool", False),
            log=EventLog(retain=retain, last_seq=int(rec["last_seq"])),
        )
        return s
