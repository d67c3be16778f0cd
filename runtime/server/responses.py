"""One response of a session: engine outputs -> parser -> protocol events -> the session's log.

The driver is an asyncio task independent of any connection: a client that disconnects does not
cancel it, and the response completes into the log for a later `after_seq` resume."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from runtime.async_engine import AsyncEngine
from runtime.outputs import RequestOutput
from runtime.sampling_params import SamplingParams
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
) -> None:
    rid = active.response_id
    hub.emit(session, {"type": "response.created", "response": {"id": rid, "status": "in_progress"}})
    aengine.open_stream(active.request_id)
    try:
        await aengine.call(lambda: se.start_turn(session, params, request_id=active.request_id))
    except ValueError as e:
        aengine._streams.pop(active.request_id, None)
        code = "context_length_exceeded" if "context" in str(e) else "invalid_request"
        hub.emit(session, {"type": "response.done", "response": {
            "id": rid, "status": "failed", "stop_reason": "error", "output": [],
            "status_details": {"type": "failed", "error": {"code": code, "message": str(e)}},
            "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                      "input_token_details": {"cached_tokens": 0},
                      "cache": {"gpu": 0, "host": 0, "redis": 0, "recomputed": 0}}}})
        return
    parser: ToolCallParser | None = PARSERS[parser_format]() if parse_calls else None
    build = _Builder(hub, session, rid)
    final: RequestOutput | None = None
    async for out in aengine.stream(active.request_id):
        if out.delta_text:
            build.apply(parser.feed(out.delta_text) if parser else [TextDelta(out.delta_text)])
        final = out
    assert final is not None
    if parser is not None:
        build.apply(parser.finish())
    output = build.finish()
    calls = [(o["call_id"], o["name"]) for o in output if o["type"] == "function_call"]
    await aengine.call(lambda: se.finish_turn(session, final, calls, output))
    status, details, stop = {
        "stop": ("completed", None, "tool_calls" if calls else "stop"),
        "length": ("incomplete", {"type": "incomplete", "reason": "max_output_tokens"}, "length"),
        "abort": ("cancelled", {"type": "cancelled", "reason": "client_cancelled"}, "cancelled"),
    }[final.finish_reason or "stop"]
    if calls and status == "completed":
        stop = "tool_calls"
    hub.emit(session, {"type": "response.done", "response": {
        "id": rid, "status": status, "status_details": details, "stop_reason": stop,
        "output": output, "usage": usage(final)}})
