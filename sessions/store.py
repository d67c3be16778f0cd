"""Where sessions persist: in memory only, or in Redis (records and event logs written as they
change, so a new server against the same Redis recovers every open session)."""
from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("ember.sessions")


class SessionStore(ABC):
    """Contract: `save` writes a session record (replacing the previous one); `append_events`
    appends to its event log and trims it to `retain`; `load_all` returns every stored record with
    its retained events, oldest first; `delete` removes a session. Failures of a remote store are
    logged and counted, never raised: serving goes on from memory."""

    durable = True  # whether anything is kept beyond this process (callers skip the work if not)

    @abstractmethod
    def save(self, record: dict[str, Any]) -> None: ...

    @abstractmethod
    def append_events(self, session_id: str, events: list[dict[str, Any]], retain: int) -> None: ...

    @abstractmethod
    def load_all(self) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]: ...

    @abstractmethod
    def delete(self, session_id: str) -> None: ...


class MemoryStore(SessionStore):
    """Sessions live only in this process (they end with it)."""

    durable = False

    def save(self, record: dict[str, Any]) -> None:
        pass

    def append_events(self, session_id: str, events: list[dict[str, Any]], retain: int) -> None:
        pass

    def load_all(self) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        return []

    def delete(self, session_id: str) -> None:
        pass


class RedisSessionStore(SessionStore):
    PREFIX = "ember:session:"

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        from kvstore.redis_tier import make_client

        self.client = make_client(url, timeout_s)
        self.errors = 0
        # One worker keeps writes in order and off the engine and event-loop threads.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-session-store")

    def _key(self, session_id: str, part: str) -> str:
        # The hash tag keeps a session's record and log in one cluster slot.
        return f"{self.PREFIX}{{{session_id}}}:{part}"

    def _guard(self, what: str, fn: Any) -> Any:
        import redis

        try:
            return fn()
        except (redis.RedisError, OSError) as e:
            self.errors += 1
            log.warning("session store: %s failed: %s", what, e)
            return None

    def save(self, record: dict[str, Any]) -> None:
        data = json.dumps(record)  # serialised now: the session goes on changing
        self._writer.submit(self._guard, "save", lambda: self.client.set(self._key(record["id"], "record"), data))

    def append_events(self, session_id: str, events: list[dict[str, Any]], retain: int) -> None:
        if not events:
            return
        key = self._key(session_id, "events")

        data = [json.dumps(e) for e in events]

        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.rpush(key, *data)
            pipe.ltrim(key, -retain, -1)
            pipe.execute()

        self._writer.submit(self._guard, "append events", run)

    def load_all(self) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        def run() -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
            out = []
            for key in self.client.scan_iter(match=f"{self.PREFIX}*:record", count=1000):
                raw = self.client.get(key)
                if raw is None:
                    continue
                rec = json.loads(raw)
                events = [json.loads(e) for e in self.client.lrange(self._key(rec["id"], "events"), 0, -1)]
                out.append((rec, events))
            return out

        return self._guard("load", run) or []

    def delete(self, session_id: str) -> None:
        self._writer.submit(self._guard, "delete", lambda: [self.client.delete(self._key(session_id, p)) for p in ("record", "events")])

    def flush(self) -> None:
        """Wait for every write submitted so far."""
        self._writer.submit(lambda: None).result()
