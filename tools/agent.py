"""`Agent`: instructions, tools and hooks; `run(input)` drives a session until a final answer.

The loop: stream a response; run each client-side tool as soon as its arguments are complete
(concurrently with the rest of the stream); when the response ends in tool calls, send their
outputs and go on; stop at a final answer or after `max_turns` responses."""
from __future__ import annotations

import asyncio
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from tools import protocol as P
from tools.client import SessionClient
from tools.decorator import Tool


@dataclass
class AgentHooks:
    on_token: Callable[[str], Any] | None = None
    on_tool_start: Callable[[str, dict[str, Any]], Any] | None = None
    on_tool_end: Callable[[str, str, bool], Any] | None = None  # (name, output, is_error)
    on_response_done: Callable[[P.ResponseInfo], Any] | None = None


@dataclass
class ToolCallRecord:
    name: str
    arguments: dict[str, Any]
    output: str
    is_error: bool


@dataclass
class RunResult:
    final_output: str
    session_id: str
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    responses: list[P.ResponseInfo] = field(default_factory=list)


async def _call_hook(hook: Callable[..., Any] | None, *args: Any) -> None:
    if hook is not None:
        result = hook(*args)
        if inspect.isawaitable(result):
            await result


@dataclass
class Agent:
    instructions: str
    tools: list[Tool] = field(default_factory=list)
    hooks: AgentHooks = field(default_factory=AgentHooks)
    tool_choice: Any = "auto"  # for the first response of a run; later ones are "auto"
    max_turns: int = 8
    temperature: float | None = None
    max_output_tokens: int | None = None

    async def _run_tool(self, name: str, arguments: str) -> ToolCallRecord:
        try:
            args = json.loads(arguments or "{}")
        except json.JSONDecodeError as e:
            return ToolCallRecord(name, {}, f"error: arguments are not JSON: {e}", True)
        await _call_hook(self.hooks.on_tool_start, name, args)
        tool = next((t for t in self.tools if t.name == name), None)
        if tool is None:
            rec = ToolCallRecord(name, args, f"error: no tool named {name!r}", True)
        else:
            try:
                result = await tool.run(args)
                rec = ToolCallRecord(name, args, result if isinstance(result, str) else json.dumps(result), False)
            except Exception as e:  # reported to the model, which may recover
                rec = ToolCallRecord(name, args, f"error: {type(e).__name__}: {e}", True)
        await _call_hook(self.hooks.on_tool_end, name, rec.output, rec.is_error)
        return rec

    async def run(self, input: str, url: str = "ws://127.0.0.1:8000/v1/ws", api_key: str | None = None,
                  client: SessionClient | None = None) -> RunResult:
        own = client is None
        client = client or SessionClient(url, api_key)
        if own:
            await client.connect()
        try:
            await client.update(instructions=self.instructions, tools=[t.spec() for t in self.tools])
            await client.send_message(input)
            result = RunResult("", client.session_id or "")
            choice = self.tool_choice
            opts = {k: v for k, v in (("temperature", self.temperature), ("max_output_tokens", self.max_output_tokens)) if v is not None}
            for _ in range(self.max_turns):
                running: dict[str, asyncio.Task[ToolCallRecord]] = {}
                info: P.ResponseInfo | None = None
                async for ev in client.respond(tool_choice=choice, **opts):
                    if isinstance(ev, P.OutputTextDelta):
                        await _call_hook(self.hooks.on_token, ev.delta)
                    elif isinstance(ev, P.ArgumentsDone):
                        running[ev.call_id] = asyncio.create_task(self._run_tool(ev.name, ev.arguments))
                    elif isinstance(ev, P.ResponseDone):
                        info = ev.response
                assert info is not None
                result.responses.append(info)
                await _call_hook(self.hooks.on_response_done, info)
                if info.stop_reason != "tool_calls":
                    result.final_output = "".join(
                        part.get("text", "") for item in info.output if item.get("type") == "message"
                        for part in item.get("content", []))
                    break
                for call_id, task in running.items():
                    rec = await task
                    result.tool_calls.append(rec)
                    await client.send_tool_output(call_id, rec.output)
                choice = "auto"
            return result
        finally:
            if own:
                await client.close()

    def run_sync(self, input: str, **kwargs: Any) -> RunResult:
        return asyncio.run(self.run(input, **kwargs))
