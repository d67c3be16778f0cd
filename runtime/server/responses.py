"""One response of a session: engine outputs -> parser -> protocol events -> the session's log.

The driver is an asyncio task independent of any connection: a client that disconnects does not
cancel it, and the response completes into the log for a later `after_seq` resume."""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from runtime.async_engine import AsyncEngine
from runtime.outputs import RequestOutput
from runtime.sampling_params import SamplingParams
from runtime.server.hooks import Hooks, ServerTools
from runtime.server.hub import SessionHub
from runtime.session_engine import SessionEngine
from sessions.session import Session, new_id
from tools.parsers import PARSERS, ArgsDelta, CallEnd, CallStart, TextDelta, ToolCallParser

log = logging.getLogger("ember.server")


@dataclass
class ActiveResponse:
    response_id: str
    request_id: str
    task: asyncio.Task[None] | None = None


@dataclass
class _Builder:
    """Open output items of a response and the events that build them."""

    hub: SessionHub
    session: Session
    response_id: str
    output: list[dict[str, Any]] = field(default_factory=list)
    message: dict[str, Any] | None = None
    message_text: str = ""
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)

    def _emit(self, event: dict[str, Any]) -> None:
        self.hub.emit(self.session, event)

    def text(self, delta: str) -> None:
        if self.message is None:
            self.message = {"id": new_id("item"), "type": "message", "role": "assistant", "content": []}
            self.message_text = ""
            self.output.append(self.message)
            self._emit({"type": "response.output_item.added", "response_id": self.response_id,
                        "output_index": len(self.output) - 1,
                        "item": {"id": self.message["id"], "type": "message", "role": "assistant"}})
        self.message_text += delta
        self._emit({"type": "response.output_text.delta", "response_id": self.response_id,
                    "item_id": self.message["id"], "output_index": self.output.index(self.message), "delta": delta})

    def close_message(self) -> None:
        if self.message is None:
            return
        idx = self.output.index(self.message)
        self.message["content"] = [{"type": "output_text", "text": self.message_text}]
        self._emit({"type": "response.output_text.done", "response_id": self.response_id,
                    "item_id": self.message["id"], "output_index": idx, "text": self.message_text})
        self._emit({"type": "response.output_item.done", "response_id": self.response_id,
                    "output_index": idx, "item": dict(self.message)})
        self.message = None

    def call_start(self, index: int, name: str) -> None:
        self.close_message()
        item = {"id": new_id("item"), "type": "function_call", "call_id": new_id("call"), "name": name, "arguments": ""}
        self.calls[index] = item
        self.output.append(item)
        self._emit({"type": "response.output_item.added", "response_id": self.response_id,
                    "output_index": len(self.output) - 1,
                    "item": {"id": item["id"], "type": "function_call", "call_id": item["call_id"], "name": name}})

    def call_args(self, index: int, delta: str) -> None:
        item = self.calls[index]
        self._emit({"type": "response.function_call_arguments.delta", "response_id": self.response_id,
                    "item_id": item["id"], "output_index": self.output.index(item), "call_id": item["call_id"],
                    "delta": delta})

    def call_end(self, index: int, name: str, arguments: str) -> None:
        item = self.calls[index]
        item["arguments"] = arguments
        idx = self.output.index(item)
        self._emit({"type": "response.function_call_arguments.done", "response_id": self.response_id,
                    "item_id": item["id"], "output_index": idx, "call_id": item["call_id"], "name": name,
                    "arguments": arguments})
        self._emit({"type": "response.output_item.done", "response_id": self.response_id, "output_index": idx,
                    "item": dict(item)})

    def apply(self, events: list[Any]) -> None:
        for e in events:
            if isinstance(e, TextDelta):
                self.text(e.text)
            elif isinstance(e, CallStart):
                self.call_start(e.index, e.name)
            elif isinstance(e, ArgsDelta):
                self.call_args(e.index, e.delta)
            elif isinstance(e, CallEnd):
                self.call_end(e.index, e.name, e.arguments)

    def finish(self) -> list[dict[str, Any]]:
        """Close what is open; a call that never completed is dropped from the output (its text
        already streamed as text by the parser's contract)."""
        self.close_message()
        self.output = [o for o in self.output if o["type"] != "function_call" or o["arguments"]]
        return self.output


def usage(out: RequestOutput) -> dict[str, Any]:
    n_in, n_out = len(out.prompt_token_ids), len(out.token_ids)
    return {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out,
            "input_token_details": {"cached_tokens": out.num_cached_tokens}, "cache": dict(out.cache)}


async def run_response(
    aengine: AsyncEngine,
    se: SessionEngine,
    hub: SessionHub,
    session: Session,
    params: SamplingParams,
    active: ActiveResponse,
    parser_format: str,
    parse_calls: bool = True,
    server_tools: ServerTools | None = None,
    hooks: Hooks | None = None,
) -> None:
    """One response: a model turn, then, while it ends in calls that are all server-side tools,
    their execution and another turn, up to the tools' round limit. A forced tool choice (a
    grammar) applies to the first turn only."""
    rid = active.response_id
    hub.emit(session, {"type": "response.created", "response": {"id": rid, "status": "in_progress"}})
    build = _Builder(hub, session, rid)
    totals = {"input_tokens": 0, "output_tokens": 0, "cached_tokens": 0}
    cache = {"gpu": 0, "host": 0, "redis": 0, "recomputed": 0}
    max_rounds = server_tools.max_rounds if server_tools else 0
    final: RequestOutput | None = None
    calls: list[tuple[str, str]] = []
    for round_ in range(max_rounds + 1):
        if round_:
            active.request_id = new_id("req")
            params = replace(params, grammar=None)
        request_id = active.request_id
        aengine.open_stream(request_id)
        try:
            await aengine.call(lambda: se.start_turn(session, params, request_id=request_id))
        except ValueError as e:
            aengine._streams.pop(request_id, None)
            if final is not None:
                break  # a later round could not start: end with what the last round produced
            code = "context_length_exceeded" if "context" in str(e) else "invalid_request"
            hub.emit(session, {"type": "response.done", "response": {
                "id": rid, "status": "failed", "stop_reason": "error", "output": [],
                "status_details": {"type": "failed", "error": {"code": code, "message": str(e)}},
                "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                          "input_token_details": {"cached_tokens": 0}, "cache": cache}}})
            return
        parser: ToolCallParser | None = PARSERS[parser_format]() if parse_calls else None
        first_item = len(build.output)
        async for out in aengine.stream(request_id):
            if out.delta_text:
                if hooks and hooks.on_token:
                    _safe(hooks.on_token, session.id, out.delta_text)
                build.apply(parser.feed(out.delta_text) if parser else [TextDelta(out.delta_text)])
            final = out
        assert final is not None
        if parser is not None:
            build.apply(parser.finish())
        build.close_message()
        items = [o for o in build.output[first_item:] if o["type"] != "function_call" or o["arguments"]]
        calls = [(o["call_id"], o["name"]) for o in items if o["type"] == "function_call"]
        done = final
        await aengine.call(lambda: se.finish_turn(session, done, calls, items))
        totals["input_tokens"] += len(final.prompt_token_ids)
        totals["output_tokens"] += len(final.token_ids)
        totals["cached_tokens"] += final.num_cached_tokens
        for k, v in final.cache.items():
            cache[k] += v
        if (not calls or final.finish_reason != "stop" or server_tools is None or round_ == max_rounds
                or not all(name in server_tools for _, name in calls)):
            break
        for item in items:
            if item["type"] == "function_call":
                await _run_server_tool(aengine, se, hub, session, rid, item, server_tools, hooks)
    assert final is not None
    output = build.finish()
    status, details, stop = {
        "stop": ("completed", None, "stop"),
        "length": ("incomplete", {"type": "incomplete", "reason": "max_output_tokens"}, "length"),
        "abort": ("cancelled", {"type": "cancelled", "reason": "client_cancelled"}, "cancelled"),
    }[final.finish_reason or "stop"]
    if calls and status == "completed":
        stop = "tool_calls"
    hub.emit(session, {"type": "response.done", "response": {
        "id": rid, "status": status, "status_details": details, "stop_reason": stop, "output": output,
        "usage": {"input_tokens": totals["input_tokens"], "output_tokens": totals["output_tokens"],
                  "total_tokens": totals["input_tokens"] + totals["output_tokens"],
                  "input_token_details": {"cached_tokens": totals["cached_tokens"]}, "cache": cache}}})


async def _run_server_tool(aengine: AsyncEngine, se: SessionEngine, hub: SessionHub, session: Session, rid: str,
                           item: dict[str, Any], tools: ServerTools, hooks: Hooks | None) -> None:
    name, call_id, arguments = item["name"], item["call_id"], item["arguments"]
    if hooks and hooks.before_tool_call:
        replaced = _safe(hooks.before_tool_call, session.id, name, json.loads(arguments or "{}"))
        if isinstance(replaced, dict):
            arguments = json.dumps(replaced)
    hub.emit(session, {"type": "tool.execution.started", "response_id": rid, "call_id": call_id, "name": name})
    result = await tools.run(name, arguments)
    if hooks and hooks.after_tool_result:
        _safe(hooks.after_tool_result, session.id, name, result.output, result.is_error)
    hub.emit(session, {"type": "tool.execution.done", "response_id": rid, "call_id": call_id, "name": name,
                       "output": result.output, "is_error": result.is_error, "duration_ms": result.duration_ms})
    stored = await aengine.call(lambda: se.append_item(
        session, {"type": "function_call_output", "call_id": call_id, "output": result.output}))
    hub.emit(session, {"type": "conversation.item.added", "item": stored})


def _safe(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:
        log.exception("a hook raised")
        return None
