"""Server-side tools and the in-process hooks API for embedding Ember as a library."""
from __future__ import annotations

import asyncio
import importlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tools.decorator import Tool


@dataclass
class Hooks:
    """Callbacks run on the server's event loop. `before_tool_call` may return replacement
    arguments (or None to keep them); `after_tool_result` sees every result; `on_token` every text
    delta of every response. A hook that raises is logged and otherwise ignored."""

    before_tool_call: Callable[[str, str, dict[str, Any]], dict[str, Any] | None] | None = None
    after_tool_result: Callable[[str, str, str, bool], None] | None = None
    on_token: Callable[[str, str], None] | None = None


@dataclass
class ToolResult:
    output: str
    is_error: bool
    duration_ms: int


@dataclass
class ServerTools:
    tools: dict[str, Tool] = field(default_factory=dict)
    timeout_s: float = 30.0
    max_rounds: int = 4

    def specs(self) -> list[dict[str, Any]]:
        return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters}} for t in self.tools.values()]

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    async def run(self, name: str, arguments: str) -> ToolResult:
        """Run a registered tool; an exception, a timeout or bad arguments become an error
        output, never a raise."""
        t0 = time.monotonic()
        try:
            args = json.loads(arguments or "{}")
            if not isinstance(args, dict):
                raise ValueError("arguments must be a JSON object")
            result = await asyncio.wait_for(self.tools[name].run(args), self.timeout_s)
            output, is_error = (result if isinstance(result, str) else json.dumps(result)), False
        except asyncio.TimeoutError:
            output, is_error = f"error: {name} timed out after {self.timeout_s:g} s", True
        except Exception as e:  # the tool's failure is reported to the model, not raised
            output, is_error = f"error: {type(e).__name__}: {e}", True
        return ToolResult(output, is_error, int((time.monotonic() - t0) * 1000))


def load_tools(spec: str) -> dict[str, Tool]:
    """`module:attr`, where attr is a Tool or a list of Tools (declared with `@tool`)."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--tools takes module:attr, got {spec!r}")
    obj = getattr(importlib.import_module(module_name), attr)
    items = obj if isinstance(obj, (list, tuple)) else [obj]
    out: dict[str, Tool] = {}
    for t in items:
        if not isinstance(t, Tool):
            raise ValueError(f"{spec}: {t!r} is not declared with @tool")
        out[t.name] = t
    return out
