"""`@tool`: a Python function (sync or async) becomes a tool with a JSON schema derived from its
type hints and its Google-style docstring (`Args:` section)."""
from __future__ import annotations

import asyncio
import enum
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union, get_args, get_origin

_PRIMITIVES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def type_schema(t: Any) -> dict[str, Any]:
    """JSON schema for a type hint."""
    if t is inspect.Parameter.empty or t is Any:
        return {}
    if t in _PRIMITIVES:
        return {"type": _PRIMITIVES[t]}
    if t is type(None):
        return {"type": "null"}
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return {"type": "string" if all(isinstance(m.value, str) for m in t) else "integer", "enum": [m.value for m in t]}
    origin, args = get_origin(t), get_args(t)
    if origin is Literal:
        kinds = {_PRIMITIVES.get(type(a), "string") for a in args}
        return {"type": kinds.pop(), "enum": list(args)} if len(kinds) == 1 else {"enum": list(args)}
    if origin in (Union, types.UnionType):
        options = [type_schema(a) for a in args if a is not type(None)]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        if type(None) in args:
            schema = {"anyOf": [schema, {"type": "null"}]}
        return schema
    if origin in (list, tuple, set, frozenset) or t in (list, tuple, set):
        out: dict[str, Any] = {"type": "array"}
        if args and args[0] is not Ellipsis:
            out["items"] = type_schema(args[0])
        return out
    if origin is dict or t is dict:
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = type_schema(args[1])
        return out
    raise TypeError(f"no JSON schema for the type {t!r}")


def _doc_args(doc: str) -> tuple[str, dict[str, str]]:
    """(summary, {argument: description}) from a Google-style docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary: list[str] = []
    args: dict[str, str] = {}
    section = None
    current = None
    for line in lines:
        stripped = line.strip()
        if re.fullmatch(r"(Args|Arguments|Parameters):", stripped):
            section = "args"
            continue
        if re.fullmatch(r"[A-Z][A-Za-z ]*:", stripped):
            section = "other"
            continue
        if section is None:
            summary.append(stripped)
        elif section == "args" and stripped:
            m = re.match(r"(\w+)\s*(\([^)]*\))?\s*:\s*(.*)", stripped)
            if m and not line.startswith(" " * 8):
                current = m.group(1)
                args[current] = m.group(3)
            elif current:
                args[current] += " " + stripped
    return " ".join(s for s in summary if s).strip(), args


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def spec(self) -> dict[str, Any]:
        """The protocol's (and OpenAI's Responses') function tool object."""
        return {"type": "function", "name": self.name, "description": self.description, "parameters": self.parameters}

    async def run(self, arguments: dict[str, Any]) -> Any:
        """Call the function (a sync one on a worker thread, so the event loop never waits)."""
        if self.is_async:
            return await self.fn(**arguments)
        return await asyncio.to_thread(self.fn, **arguments)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None) -> Any:
    """Declare a tool: `@tool` or `@tool(name=..., description=...)`."""

    def wrap(f: Callable[..., Any]) -> Tool:
        hints = typing.get_type_hints(f)
        summary, arg_docs = _doc_args(f.__doc__ or "")
        props: dict[str, Any] = {}
        required: list[str] = []
        for pname, p in inspect.signature(f).parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"tool {f.__name__}: *args and **kwargs have no schema")
            schema = type_schema(hints.get(pname, p.annotation))
            if pname in arg_docs:
                schema["description"] = arg_docs[pname]
            if p.default is p.empty:
                required.append(pname)
            elif isinstance(p.default, enum.Enum):
                schema["default"] = p.default.value
            elif p.default is None or isinstance(p.default, (str, int, float, bool, list, dict)):
                schema["default"] = p.default
            props[pname] = schema
        params: dict[str, Any] = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
        return Tool(name or f.__name__, description if description is not None else summary, params, f)

    return wrap(fn) if fn is not None else wrap
