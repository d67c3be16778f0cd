"""Session event fan-out. Runs on the server's event loop only: every server event of a session is
stamped with the next seq in its log, persisted, and queued to every connection attached to it.

Each connection has a bounded queue, so a slow client applies backpressure to nobody: when its
queue is full it is disconnected (close code 4408) and can resume with `after_seq`."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from sessions.session import Session, new_id

log = logging.getLogger("ember.server")

SLOW_CLIENT_CLOSE = 4408


@dataclass(eq=False)
class Connection:
    session_id: str
    queue: asyncio.Queue[dict[str, Any] | None]
    too_slow: bool = False
    # A resume's replay, snapshotted at attach time and sent before the live queue (a long
    # replay must not count against the bound meant for live events).
    backlog: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SessionHub:
    persist: Callable[[Session, list[dict[str, Any]]], None]
    send_queue_size: int = 1024
    _conns: dict[str, set[Connection]] = field(default_factory=dict)

    def attach(self, session: Session) -> Connection:
        conn = Connection(session.id, asyncio.Queue(self.send_queue_size))
        self._conns.setdefault(session.id, set()).add(conn)
        return conn

    def detach(self, conn: Connection) -> None:
        conns = self._conns.get(conn.session_id)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._conns[conn.session_id]

    def send(self, conn: Connection, event: dict[str, Any]) -> None:
        try:
            conn.queue.put_nowait(event)
        except asyncio.QueueFull:
            self._too_slow(conn)

    def emit(self, session: Session, event: dict[str, Any]) -> dict[str, Any]:
        """Log `event` in the session (stamping event_id and seq), persist it, fan it out."""
        event.setdefault("event_id", new_id("event"))
        session.log.append(event)
        self.persist(session, [event])
        for conn in list(self._conns.get(session.id, ())):
            self.send(conn, event)
        return event

    def _too_slow(self, conn: Connection) -> None:
        if not conn.too_slow:
            conn.too_slow = True
            log.warning("closing a connection of session %s: it is not reading its events", conn.session_id)
            self.detach(conn)
            # The sender sees None and closes; make room for it if needed.
            while True:
                try:
                    conn.queue.put_nowait(None)
                    return
                except asyncio.QueueFull:
                    conn.queue.get_nowait()

    def close_all(self, session_id: str) -> None:
        for conn in list(self._conns.get(session_id, ())):
            self.detach(conn)
            try:
                conn.queue.put_nowait(None)
            except asyncio.QueueFull:
                conn.too_slow = True
