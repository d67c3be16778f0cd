"""Agent sessions on the engine: items are rendered incrementally onto the session's tokens, each
turn is a request of the right priority class, and between turns the session's blocks stay pinned
for a time-to-live learned from the tool it waits on.

Synchronous and single-threaded like the engine it drives: the server calls it on the engine
thread. It appends no protocol events (the server owns the event logs, on its own thread); turning
tokens into text and tool calls is the caller's too (it passes the calls a turn ended with to
`finish_turn`).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from runtime.engine import LLMEngine
from runtime.outputs import RequestOutput
from runtime.request import Request
from runtime.sampling_params import SamplingParams
from sessions.manager import SessionManager
from sessions.render import IncrementalRenderer
from sessions.session import Session, SessionState, new_id
from sessions.tool_stats import ToolStats
from tools.formats import tool_system_prompt

TOOL_RETURN, CONTINUING, FIRST_TURN = 0, 1, 2


def item_to_message(item: dict[str, Any]) -> dict[str, Any]:
    """The chat-template message for a conversation item."""
    if item["type"] == "function_call_output":
        return {"role": "tool", "content": str(item["output"])}
    content = item["content"]
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content)
    return {"role": item["role"], "content": content}


class SessionEngine:
    def __init__(
        self,
        engine: LLMEngine,
        manager: SessionManager | None = None,
        tool_stats: ToolStats | None = None,
        use_priorities: bool = True,
        tool_format: str = "hermes",
        max_item_tokens: int = 32_768,
    ) -> None:
        if engine.tokenizer is None:
            raise ValueError("sessions need a model with a tokenizer and chat template")
        self.engine = engine
        self.manager = manager or SessionManager()
        self.tool_stats = tool_stats or ToolStats()
        self.renderer = IncrementalRenderer(engine.tokenizer)
        self.eos_ids = frozenset(engine.model_config.eos_token_ids)
        self.use_priorities = use_priorities  # off: every turn is CONTINUING (an ablation)
        self.tool_format = tool_format
        self.max_item_tokens = max_item_tokens
        # Templates that do not take `tools` get them through the format's system prompt.
        self.native_tools = "tools" in (getattr(engine.tokenizer, "chat_template", None) or "")
        self._turns: dict[str, tuple[Session, Request]] = {}

    # ---- items ---------------------------------------------------------------------------
    def append_item(self, session: Session, item: dict[str, Any]) -> dict[str, Any]:
        """Append a message or a tool's output; returns the item as stored (with its id).

        Raises ValueError for an unknown call_id or an item that cannot be rendered."""
        if session.state == SessionState.GENERATING:
            raise ValueError("the session has an active response")
        item = dict(item, id=item.get("id") or new_id("item"))
        if item["type"] == "function_call_output":
            call = session.pending_calls.pop(item["call_id"], None)
            if call is None:
                raise ValueError(f"unknown call_id {item['call_id']!r}")
            name, started = call
            self.tool_stats.observe(name, time.monotonic() - started)
            session.returning_from_tool = True
        elif item["type"] != "message":
            raise ValueError(f"unknown item type {item['type']!r}")
        msg = item_to_message(item)
        if not session.token_ids:
            system = session.instructions or ""
            if session.tools and not self.native_tools:
                system = (system + "\n\n" if system else "") + tool_system_prompt(self.tool_format, session.tools)
            head = [{"role": "system", "content": system}] if system else []
            tokens = self.renderer.first(head + [msg], tools=(session.tools or None) if self.native_tools else None)
        else:
            tokens = self.renderer.delta(msg)
        if len(tokens) > self.max_item_tokens:
            raise ValueError(f"the item is {len(tokens)} tokens; the limit is {self.max_item_tokens}")
        self.manager.check_tokens(session.tenant, len(tokens))
        session.items.append(item)
        session.append_tokens(tokens)
        self.manager.persist(session)
        return item

    # ---- turns ---------------------------------------------------------------------------
    def start_turn(self, session: Session, params: SamplingParams, request_id: str | None = None) -> Request:
        """Queue the next assistant turn on the engine (raises ValueError if it cannot run)."""
        if not session.token_ids:
            raise ValueError("the session has no items to respond to")
        if session.returning_from_tool:
            priority = TOOL_RETURN
        elif any(i.get("role") == "assistant" or i["type"] == "function_call" for i in session.items):
            priority = CONTINUING
        else:
            priority = FIRST_TURN
        if not self.use_priorities:
            priority = CONTINUING
        prompt = session.token_ids + self.renderer.generation_prompt
        req = self.engine.add_request(prompt, params, request_id=request_id, tenant=session.tenant,
                                      session_id=session.id, priority=priority)
        session.transition(SessionState.GENERATING)
        session.append_tokens(self.renderer.generation_prompt)
        session.returning_from_tool = False
        self._turns[session.id] = (session, req)
        return req

    def finish_turn(
        self, session: Session, out: RequestOutput, tool_calls: Sequence[tuple[str, str]] = (),
        output_items: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Record `output_items` and close the turn in the session's tokens as the template closes it; with `tool_calls`
        ((call_id, name) pairs) the session awaits them and its blocks stay pinned for the
        slowest tool's learned TTL, else for the default TTL."""
        self._turns.pop(session.id, None)
        session.items.extend(output_items)
        generated = list(out.token_ids)
        session.append_tokens(generated + self.renderer.close_turn(generated, self.eos_ids))
        now = time.monotonic()
        if tool_calls:
            for call_id, name in tool_calls:
                session.pending_calls[call_id] = (name, now)
            ttl = max(self.tool_stats.ttl(name) for _, name in tool_calls)
            session.transition(SessionState.AWAITING_TOOL)
            self.engine.kv_manager.set_pin_deadline(session.id, now + ttl)
            self._expect(session.id, now + ttl, returns=True)
        else:
            session.transition(SessionState.IDLE)
            self._expect(session.id, now)  # not expected back soon: its working set leaves the served set
        self.manager.persist(session)

    def _expect(self, session_id: str, until: float, returns: bool = False) -> None:
        admission = self.engine.scheduler.admission
        if admission is not None:
            admission.expect(session_id, until, returns)

    def run_turn(self, session: Session, params: SamplingParams, tool_calls: Sequence[tuple[str, str]] = ()) -> RequestOutput:
        """Run one turn to completion, stepping the engine (other requests progress too)."""
        req = self.start_turn(session, params)
        final = None
        while final is None:
            for o in self.engine.step():
                if o.request_id == req.request_id and o.finished:
                    final = o
        self.finish_turn(session, final, tool_calls)
        return final

    def fork(self, parent: Session, metadata: dict[str, Any] | None = None) -> Session:
        child = self.manager.fork(parent, metadata)
        self.engine.kv_manager.copy_pins(parent.id, child.id)
        return child

    def close(self, session: Session) -> None:
        turn = self._turns.pop(session.id, None)
        if turn is not None:
            self.engine.abort(turn[1].request_id)
        self.manager.close(session)
        self.engine.kv_manager.unpin(session.id, demote=False)
        self._expect(session.id, 0.0)  # it gives up its place in the served order, live or away
