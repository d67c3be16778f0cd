"""The session manager: create, get, fork, close, expire; per-tenant quotas; persistence."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

from sessions.session import Session, SessionState, new_id
from sessions.store import MemoryStore, SessionStore


class NotFound(KeyError):
    """No such session for this tenant (a foreign id is indistinguishable from a missing one)."""


class QuotaExceeded(Exception):
    pass


@dataclass(frozen=True)
class SessionLimits:
    max_sessions_per_tenant: int = 1000
    max_tokens_per_tenant: int = 50_000_000
    idle_ttl_s: float = 24 * 3600.0
    log_retain: int = 10_000


class SessionManager:
    def __init__(self, limits: SessionLimits = SessionLimits(), store: SessionStore | None = None) -> None:
        self.limits = limits
        self.store = store or MemoryStore()
        self._sessions: dict[str, Session] = {}

    # ---- lifecycle -----------------------------------------------------------------------
    def _check_quota(self, tenant: str, extra_tokens: int = 0) -> None:
        mine = [s for s in self._sessions.values() if s.tenant == tenant]
        if len(mine) >= self.limits.max_sessions_per_tenant:
            raise QuotaExceeded(f"tenant has {len(mine)} sessions, the limit is {self.limits.max_sessions_per_tenant}")
        self.check_tokens(tenant, extra_tokens)

    def check_tokens(self, tenant: str, extra_tokens: int) -> None:
        used = sum(len(s.token_ids) for s in self._sessions.values() if s.tenant == tenant)
        if used + extra_tokens > self.limits.max_tokens_per_tenant:
            raise QuotaExceeded(f"tenant would hold {used + extra_tokens} tokens, the limit is {self.limits.max_tokens_per_tenant}")

    def create(self, tenant: str, metadata: dict[str, Any] | None = None) -> Session:
        self._check_quota(tenant)
        s = Session(id=new_id("sess"), tenant=tenant, metadata=dict(metadata or {}))
        s.log.retain = self.limits.log_retain
        self._sessions[s.id] = s
        self.persist(s)
        return s

    def get(self, session_id: str, tenant: str) -> Session:
        s = self._sessions.get(session_id)
        if s is None or s.tenant != tenant or s.state == SessionState.CLOSED:
            raise NotFound(session_id)
        return s

    def fork(self, parent: Session, metadata: dict[str, Any] | None = None) -> Session:
        """A new session with the parent's history (its KV blocks are shared by hash; the engine
        side copies the parent's pins). The fork's log starts at seq 1."""
        self._check_quota(parent.tenant, len(parent.token_ids))
        child = Session(
            id=new_id("sess"), tenant=parent.tenant, metadata=dict(metadata if metadata is not None else parent.metadata),
            instructions=parent.instructions, tools=copy.deepcopy(parent.tools), items=copy.deepcopy(parent.items),
            token_ids=list(parent.token_ids), forked_from=parent.id,
            state=SessionState.IDLE,
        )
        child.log.retain = self.limits.log_retain
        self._sessions[child.id] = child
        self.persist(child)
        return child

    def close(self, session: Session) -> None:
        session.transition(SessionState.CLOSED)
        self._sessions.pop(session.id, None)
        self.store.delete(session.id)

    def expire(self, now: float | None = None) -> list[Session]:
        """Close sessions idle for longer than the TTL (never one that is generating)."""
        now = time.monotonic() if now is None else now
        gone = [s for s in self._sessions.values()
                if s.state != SessionState.GENERATING and now - s.last_active > self.limits.idle_ttl_s]
        for s in gone:
            self.close(s)
        return gone

    def sessions(self, tenant: str | None = None) -> list[Session]:
        return [s for s in self._sessions.values() if tenant is None or s.tenant == tenant]

    # ---- persistence ---------------------------------------------------------------------
    def persist(self, session: Session, new_events: list[dict[str, Any]] | None = None) -> None:
        """Save the session's record (its items and tokens changed), and any new events."""
        if self.store.durable:
            self.store.save(session.to_record())
        if new_events:
            self.persist_events(session, new_events)

    def persist_events(self, session: Session, events: list[dict[str, Any]]) -> None:
        """Append events to the stored log: O(events), never the whole record (this runs for
        every event, token deltas included). Recovery takes last_seq from the log."""
        if self.store.durable:
            self.store.append_events(session.id, events, self.limits.log_retain)

    def recover(self) -> list[Session]:
        """Rebuild every stored session (history, token ids, last seq, retained events)."""
        out = []
        for rec, events in self.store.load_all():
            s = Session.from_record(rec, retain=self.limits.log_retain)
            s.log.restore(events)
            self._sessions[s.id] = s
            out.append(s)
        return out
