"""`SessionClient`: an async client of Ember's session protocol over `websockets`.

Events arrive typed (the protocol's msgspec Structs). The client tracks the last seq it delivered;
when the connection drops abnormally it reconnects by itself with `after_seq`, so its caller sees
every event exactly once, in order. Named apart from the server's `Session`."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

from tools import protocol as P

log = logging.getLogger("ember.client")


class SessionClosedError(RuntimeError):
    pass


class SessionClient:
    def __init__(self, url: str = "ws://127.0.0.1:8000/v1/ws", api_key: str | None = None,
                 session_id: str | None = None, reconnect_attempts: int = 20) -> None:
        self.url = url
        self.api_key = api_key
        self.session_id = session_id
        self.last_seq = 0
        self.reconnect_attempts = reconnect_attempts
        self.reconnects = 0
        self._ws: Any = None
        self._events: asyncio.Queue[P.ServerEvent | BaseException] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed = False

    # ---- connection ----------------------------------------------------------------------
    async def connect(self) -> P.SessionInfo:
        """Create a session (or attach to `session_id`); returns its info."""
        await self._open()
        ev = await self.next_event()
        if isinstance(ev, P.Error):
            raise SessionClosedError(f"{ev.error.type}: {ev.error.message}")
        assert isinstance(ev, (P.SessionCreated, P.SessionResumed)), ev
        self.session_id = ev.session.id
        return ev.session

    async def _open(self) -> None:
        from websockets.asyncio.client import connect

        query = ""
        if self.session_id is not None:
            query = f"?session_id={self.session_id}"
            if self.last_seq:
                query += f"&after_seq={self.last_seq}"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._ws = await connect(self.url + query, additional_headers=headers, max_size=None)
        self._connected.set()
        self._reader = asyncio.create_task(self._read(self._ws))

    async def _read(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for raw in ws:
                ev = P.decode_server_event(raw)
                if ev.seq and ev.seq <= self.last_seq:
                    continue  # already delivered before a reconnect
                if ev.seq:
                    self.last_seq = ev.seq
                await self._events.put(ev)
            code = ws.close_code
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd else None
        except OSError:
            code = None
        self._connected.clear()
        if self._closed or code in (1000, 4401, 4404):
            if not self._closed:
                await self._events.put(SessionClosedError(f"connection closed ({code})"))
            return
        await self._reconnect()

    async def _reconnect(self) -> None:
        delay = 0.05
        for _ in range(self.reconnect_attempts):
            try:
                await self._open()
                self.reconnects += 1
                log.info("reconnected to session %s after seq %d", self.session_id, self.last_seq)
                return
            except OSError:
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
        await self._events.put(SessionClosedError("could not reconnect"))

    async def next_event(self, timeout: float | None = None) -> P.ServerEvent:
        item = await asyncio.wait_for(self._events.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def _send(self, event: dict[str, Any]) -> None:
        await self._connected.wait()
        await self._ws.send(json.dumps(event))

    async def _until(self, kind: type[Any]) -> Any:
        while True:
            ev = await self.next_event()
            if isinstance(ev, kind):
                return ev
            if isinstance(ev, P.Error):
                raise ValueError(f"{ev.error.code}: {ev.error.message}")

    def drop_connection(self) -> None:
        """Cut the TCP connection without a closing handshake (what a network failure does);
        the client then reconnects and resumes by itself."""
        self._ws.transport.abort()

    # ---- the protocol --------------------------------------------------------------------
    async def update(self, **session: Any) -> P.SessionUpdated:
        await self._send({"type": "session.update", "session": session})
        ev: P.SessionUpdated = await self._until(P.SessionUpdated)
        return ev

    async def add_item(self, item: dict[str, Any]) -> dict[str, Any]:
        await self._send({"type": "conversation.item.create", "item": item})
        ev: P.ItemAdded = await self._until(P.ItemAdded)
        return ev.item

    async def send_message(self, text: str, role: str = "user") -> dict[str, Any]:
        return await self.add_item({"type": "message", "role": role, "content": text})

    async def send_tool_output(self, call_id: str, output: str) -> dict[str, Any]:
        return await self.add_item({"type": "function_call_output", "call_id": call_id, "output": output})

    async def respond(self, **response: Any) -> AsyncIterator[P.ServerEvent]:
        """Start a response and yield its events, ending with `response.done`."""
        await self._send({"type": "response.create", "response": response})
        while True:
            ev = await self.next_event()
            if isinstance(ev, P.Error) and ev.error.code == "conversation_already_has_active_response":
                raise ValueError(ev.error.message)
            yield ev
            if isinstance(ev, P.ResponseDone):
                return

    async def cancel(self) -> None:
        await self._send({"type": "response.cancel"})

    async def fork(self, metadata: dict[str, Any] | None = None) -> SessionClient:
        """Fork the session; returns a client attached to the fork."""
        await self._send({"type": "session.fork", **({"metadata": metadata} if metadata else {})})
        ev: P.SessionForked = await self._until(P.SessionForked)
        child = SessionClient(self.url, self.api_key, ev.session.id, self.reconnect_attempts)
        await child.connect()
        return child

    async def close_session(self) -> None:
        """End the session on the server."""
        await self._send({"type": "session.close"})
        await self._until(P.SessionClosed)
        await self.close()

    async def close(self) -> None:
        """Disconnect (the session lives on in the server)."""
        self._closed = True
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()

    async def __aenter__(self) -> SessionClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
