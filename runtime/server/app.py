"""The Starlette app: `GET /v1/ws` (the session protocol), the sessions endpoints, models, health.

Threading: the engine, the session manager and the sessions' token state are touched only on the
engine thread (through `AsyncEngine.call`); event logs only on this event loop (through the hub)."""
from __future__ import annotations

import asyncio
import json
import logging

import msgspec
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from dataclasses import replace

from runtime.async_engine import AsyncEngine
from runtime.sampling_params import SamplingParams
from runtime.server.hooks import Hooks, ServerTools
from runtime.server.hub import SLOW_CLIENT_CLOSE, Connection, SessionHub
from runtime.server.responses import ActiveResponse, run_response
from runtime.session_engine import SessionEngine
from sessions.event_log import ResumeWindowExpired
from sessions.manager import NotFound, QuotaExceeded
from sessions.session import Session, SessionState, new_id
from tools import protocol as P
from tools.formats import call_grammar

log = logging.getLogger("ember.server")

AUTH_CLOSE, NOT_FOUND_CLOSE = 4401, 4404


@dataclass
class ServerConfig:
    model_id: str
    api_keys: dict[str, str] | None = None  # key -> tenant; None: open (one tenant)
    max_frame_bytes: int = 1 << 20
    parser_format: str = "hermes"
    default_max_output_tokens: int = 256
    send_queue_events: int = 1024  # per connection; a client that lets it fill is disconnected


@dataclass
class ServerState:
    aengine: AsyncEngine
    se: SessionEngine
    cfg: ServerConfig
    hub: SessionHub = field(init=False)
    tools: ServerTools = field(default_factory=ServerTools)
    hooks: Hooks = field(default_factory=Hooks)
    active: dict[str, ActiveResponse] = field(default_factory=dict)  # session id -> response
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # session id -> settings

    def __post_init__(self) -> None:
        self.hub = SessionHub(persist=self.se.manager.persist_events,
                              send_queue_size=self.cfg.send_queue_events)

    def tenant_for(self, key: str | None) -> str | None:
        if self.cfg.api_keys is None:
            return "default"
        return self.cfg.api_keys.get(key or "")

    async def call(self, fn: Any) -> Any:
        return await self.aengine.call(fn)

    def new_session(self, tenant: str, metadata: dict[str, Any] | None = None) -> Session:
        """Engine thread: a session that knows the server-side tools from the start."""
        s = self.se.manager.create(tenant, metadata)
        s.tools = self.tools.specs()
        return s

    def with_server_tools(self, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        names = {t["function"]["name"] for t in tools}
        return tools + [t for t in self.tools.specs() if t["function"]["name"] not in names]


def _unlogged(event: dict[str, Any]) -> str:
    """An event sent before any session is attached (refusals): seq 0, in no session's log."""
    return json.dumps({**event, "event_id": new_id("event"), "seq": 0})


def _bearer(headers: Any) -> str | None:
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def _offered_key(ws: WebSocket) -> tuple[str | None, bool]:
    """(key, whether the client offered ember.v1) from the header or the browser subprotocols."""
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    key = _bearer(ws.headers)
    for p in offered:
        if p.startswith("ember.bearer."):
            key = key or p[len("ember.bearer."):]
    return key, "ember.v1" in offered


class SessionSocket:
    """One WebSocket connection attached to one session."""

    def __init__(self, state: ServerState, ws: WebSocket, session: Session, conn: Connection) -> None:
        self.state, self.ws, self.session, self.conn = state, ws, session, conn

    def error(self, type_: str, code: str, message: str, event_id: str | None = None) -> None:
        self.state.hub.emit(self.session, P.error_event(type_, code, message, event_id))

    async def sender(self) -> None:
        backlog, self.conn.backlog = self.conn.backlog, []
        for past in backlog:
            await self._send(past)
        while True:
            event = await self.conn.queue.get()
            if event is None:
                code = SLOW_CLIENT_CLOSE if self.conn.too_slow else 1000
                await self.ws.close(code=code, reason="too slow: resume with after_seq" if self.conn.too_slow else "")
                return
            await self._send(event)

    async def _send(self, event: dict[str, Any]) -> None:
        try:
            data = json.dumps(event)
        except (TypeError, ValueError):  # a bug, not the client's fault: keep the stream alive
            log.exception("dropping an unserialisable %s event", event.get("type"))
            return
        await self.ws.send_text(data)

    async def receiver(self) -> None:
        half = max(1, self.conn.queue.maxsize // 2)
        while True:
            # Backpressure on input: while this connection's own events back up, read no more
            # of its frames (a fast client sending bursts is not mistaken for a slow reader).
            for _ in range(1000):
                if self.conn.queue.qsize() < half or self.conn.too_slow:
                    break
                await asyncio.sleep(0.005)
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data = msg.get("text") if msg.get("text") is not None else msg.get("bytes")
            if data is None:
                continue
            if len(data) > self.state.cfg.max_frame_bytes:
                self.error("invalid_request_error", "frame_too_large",
                           f"frame of {len(data)} bytes exceeds the limit of {self.state.cfg.max_frame_bytes}")
                continue
            try:
                event = P.decode_client_event(data)
            except P.ProtocolError as e:
                self.error("invalid_request_error", "invalid_event", str(e), e.event_id)
                continue
            try:
                await self.dispatch(event)
            except (ValueError, QuotaExceeded) as e:
                code = "quota_exceeded" if isinstance(e, QuotaExceeded) else "invalid_request"
                kind = "rate_limit_error" if isinstance(e, QuotaExceeded) else "invalid_request_error"
                self.error(kind, code, str(e), event.event_id)
            if self.session.state == SessionState.CLOSED:
                return

    async def dispatch(self, ev: P.ClientEvent) -> None:
        st, s = self.state, self.session
        if isinstance(ev, P.SessionUpdate):
            await self.update(ev)
        elif isinstance(ev, P.ItemCreate):
            item = P.item_to_dict(ev.item)
            stored = await st.call(lambda: st.se.append_item(s, item))
            st.hub.emit(s, {"type": "conversation.item.added", "item": stored})
        elif isinstance(ev, P.ResponseCreate):
            if s.id in st.active:
                self.error("invalid_request_error", "conversation_already_has_active_response",
                           "the session already has an active response", ev.event_id)
                return
            self.start_response(ev)  # raises ValueError (an error event) for a bad tool_choice
        elif isinstance(ev, P.ResponseCancel):
            active = st.active.get(s.id)
            if active is None or (ev.response_id and ev.response_id != active.response_id):
                self.error("invalid_request_error", "response_not_found", "no such active response", ev.event_id)
                return
            st.aengine.abort(active.request_id)
        elif isinstance(ev, P.SessionFork):
            child = await st.call(lambda: st.se.fork(s, ev.metadata))
            st.defaults[child.id] = dict(st.defaults.get(s.id, {}))
            st.hub.emit(s, {"type": "session.forked", "session": {"id": child.id, "forked_from": s.id}})
        elif isinstance(ev, P.SessionClose):
            active = st.active.get(s.id)
            if active is not None:
                st.aengine.abort(active.request_id)
            await st.call(lambda: st.se.close(s))
            st.hub.emit(s, {"type": "session.closed", "session": {"id": s.id}})
            st.hub.close_all(s.id)

    async def update(self, ev: P.SessionUpdate) -> None:
        st, s, cfg = self.state, self.session, ev.session
        d = st.defaults.setdefault(s.id, {})
        for k in ("temperature", "top_p", "max_output_tokens", "tool_choice"):
            v = getattr(cfg, k)
            if v is not None:
                d[k] = msgspec.to_builtins(v)  # kept as plain JSON values: they go out in events

        def apply() -> None:
            if cfg.metadata is not None:
                s.metadata = dict(cfg.metadata)
            tools = st.with_server_tools([{"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters}} for t in (cfg.tools or [])])
            if not s.token_ids:
                if cfg.instructions is not None:
                    s.instructions = cfg.instructions
                if cfg.tools is not None:
                    s.tools = tools
            elif cfg.instructions is not None or cfg.tools is not None:
                # After the first item the past is never re-rendered: a change becomes a new
                # system item at the tail.
                if cfg.instructions is not None:
                    s.instructions = cfg.instructions
                if cfg.tools is not None:
                    s.tools = tools
                text = cfg.instructions if cfg.instructions is not None else s.instructions or ""
                if cfg.tools is not None:
                    text += "\nTools: " + json.dumps([t["function"] for t in tools])
                st.se.append_item(s, {"type": "message", "role": "system", "content": text})
            st.se.manager.persist(s)

        await st.call(apply)
        st.hub.emit(s, {"type": "session.updated", "session": {**s.summary(), **d, "instructions": s.instructions,
                                                               "tools": s.tools}})

    def start_response(self, ev: P.ResponseCreate) -> None:
        st, s = self.state, self.session
        d = st.defaults.get(s.id, {})
        r = ev.response
        temperature = r.temperature if r.temperature is not None else d.get("temperature", 1.0)
        params = SamplingParams(
            max_tokens=r.max_output_tokens or d.get("max_output_tokens") or st.cfg.default_max_output_tokens,
            temperature=temperature,
            top_p=r.top_p if r.top_p is not None else d.get("top_p", 1.0),
            seed=r.seed,
            stop=tuple(r.stop or ()),
        )
        tool_choice = msgspec.to_builtins(r.tool_choice) if r.tool_choice is not None else d.get("tool_choice", "auto")
        if tool_choice == "required" or isinstance(tool_choice, dict):
            if not s.tools:
                raise ValueError("tool_choice requires tools: set them with session.update")
            name = tool_choice["name"] if isinstance(tool_choice, dict) else None
            params = replace(params, grammar=call_grammar(st.cfg.parser_format, s.tools, name))
        active = ActiveResponse(new_id("resp"), new_id("req"))
        st.active[s.id] = active

        async def run() -> None:
            try:
                await run_response(st.aengine, st.se, st.hub, s, params, active, st.cfg.parser_format,
                                   parse_calls=tool_choice != "none", server_tools=st.tools, hooks=st.hooks)
            except Exception:
                log.exception("response %s failed", active.response_id)
                st.hub.emit(s, P.error_event("server_error", "response_failed", "the response failed"))
            finally:
                st.active.pop(s.id, None)

        active.task = asyncio.create_task(run())


async def ws_endpoint(ws: WebSocket) -> None:
    state: ServerState = ws.app.state.ember
    key, wants_v1 = _offered_key(ws)
    await ws.accept(subprotocol="ember.v1" if wants_v1 else None)
    tenant = state.tenant_for(key)
    if tenant is None:
        await ws.send_text(_unlogged(P.error_event("authentication_error", "invalid_api_key", "missing or wrong API key")))
        await ws.close(code=AUTH_CLOSE)
        return
    sid = ws.query_params.get("session_id")
    after = ws.query_params.get("after_seq")
    try:
        if sid is None:
            session = await state.call(lambda: state.new_session(tenant))
        else:
            session = await state.call(lambda: state.se.manager.get(sid, tenant))
    except NotFound:
        await ws.send_text(_unlogged(P.error_event("not_found", "session_not_found", f"no session {sid!r}")))
        await ws.close(code=NOT_FOUND_CLOSE)
        return
    except QuotaExceeded as e:
        await ws.send_text(_unlogged(P.error_event("rate_limit_error", "quota_exceeded", str(e))))
        await ws.close(code=1008)
        return
    conn = state.hub.attach(session)
    sock = SessionSocket(state, ws, session, conn)
    # No await between the replay and going live: nothing is missed or sent twice.
    if sid is None:
        state.hub.emit(session, {"type": "session.created", "session": session.summary()})
    else:
        if after is not None:
            try:
                conn.backlog = list(session.log.since(int(after)))
            except (ResumeWindowExpired, ValueError) as e:
                sock.error("invalid_request_error", "resume_window_expired", str(e))
        state.hub.emit(session, {"type": "session.resumed", "session": session.summary()})
    sender = asyncio.create_task(sock.sender())
    try:
        await sock.receiver()
    except WebSocketDisconnect:
        pass
    finally:
        state.hub.detach(conn)
        if not sender.done():
            conn.queue.put_nowait(None) if not conn.queue.full() else sender.cancel()
            try:
                await asyncio.wait_for(sender, timeout=5)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                sender.cancel()


def _tenant(request: Request) -> str | None:
    return request.app.state.ember.tenant_for(_bearer(request.headers))


def _auth_error() -> JSONResponse:
    return JSONResponse(P.error_event("authentication_error", "invalid_api_key", "missing or wrong API key"), status_code=401)


def _not_found(sid: str) -> JSONResponse:
    return JSONResponse(P.error_event("not_found", "session_not_found", f"no session {sid!r}"), status_code=404)


async def create_session(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.ember
    tenant = _tenant(request)
    if tenant is None:
        return _auth_error()
    if request.method == "GET":  # the caller's sessions
        sessions = await state.call(lambda: [x.summary() for x in state.se.manager.sessions(tenant)])
        return JSONResponse({"object": "list", "data": sessions})
    body = await request.json() if await request.body() else {}
    try:
        s = await state.call(lambda: state.new_session(tenant, body.get("metadata")))
    except QuotaExceeded as e:
        return JSONResponse(P.error_event("rate_limit_error", "quota_exceeded", str(e)), status_code=429)
    state.hub.emit(s, {"type": "session.created", "session": s.summary()})
    return JSONResponse(s.summary())


async def _caller_session(request: Request) -> Session | JSONResponse:
    """The path's session if the caller's tenant owns it, else the 401/404 response to send."""
    state: ServerState = request.app.state.ember
    tenant = _tenant(request)
    if tenant is None:
        return _auth_error()
    sid = request.path_params["sid"]
    try:
        session: Session = await state.call(lambda: state.se.manager.get(sid, tenant))
        return session
    except NotFound:
        return _not_found(sid)


async def session_endpoint(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.ember
    s = await _caller_session(request)
    if isinstance(s, JSONResponse):
        return s
    if request.method == "DELETE":
        await state.call(lambda: state.se.close(s))
        state.hub.emit(s, {"type": "session.closed", "session": {"id": s.id}})
        state.hub.close_all(s.id)
        return JSONResponse({"id": s.id, "deleted": True})
    return JSONResponse({**s.summary(), "items": s.items, "num_tokens": len(s.token_ids)})


async def fork_session(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.ember
    s = await _caller_session(request)
    if isinstance(s, JSONResponse):
        return s
    try:
        child = await state.call(lambda: state.se.fork(s))
    except QuotaExceeded as e:
        return JSONResponse(P.error_event("rate_limit_error", "quota_exceeded", str(e)), status_code=429)
    state.hub.emit(s, {"type": "session.forked", "session": {"id": child.id, "forked_from": s.id}})
    return JSONResponse({**child.summary(), "forked_from": s.id})


async def models(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.ember
    return JSONResponse({"object": "list", "data": [{"id": state.cfg.model_id, "object": "model", "owned_by": "ember"}]})


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.ember
    m = state.aengine.engine.metrics
    if m is None:
        return Response("metrics are off\n", status_code=404)
    await state.call(lambda: m.refresh(state.aengine.engine, state.se.manager.sessions()))
    return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def create_app(state: ServerState) -> Starlette:
    from runtime.server.openai_api import chat_completions

    app = Starlette(routes=[
        WebSocketRoute("/v1/ws", ws_endpoint),
        Route("/v1/sessions", create_session, methods=["GET", "POST"]),
        Route("/v1/sessions/{sid}", session_endpoint, methods=["GET", "DELETE"]),
        Route("/v1/sessions/{sid}/fork", fork_session, methods=["POST"]),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health),
        Route("/metrics", metrics),
    ])
    app.state.ember = state
    if state.aengine.engine.metrics is None:
        from runtime.metrics import Metrics

        state.aengine.engine.metrics = Metrics()
    return app
