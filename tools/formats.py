"""How each tool-call format is taught to the model and written back into history.

Used when a model's chat template does not take `tools` itself: the tools and the calling
convention go into the system prompt, and past calls are written in the same format."""
from __future__ import annotations

import json
from typing import Any

_EXAMPLES = {
    "smollm2": '<tool_call>[{"name": "a_function", "arguments": {"an_argument": "a value"}}]</tool_call>',
    "hermes": '<tool_call>{"name": "a_function", "arguments": {"an_argument": "a value"}}</tool_call>',
    "llama3_json": '{"name": "a_function", "parameters": {"an_argument": "a value"}}',
}


def tool_system_prompt(fmt: str, tools: list[dict[str, Any]]) -> str:
    """Instructions listing `tools` (OpenAI function specs) and the format to call them in."""
    specs = [t.get("function", t) for t in tools]
    many = "a JSON list of calls inside one tag" if fmt == "smollm2" else "one call per tag" if fmt == "hermes" else "a single JSON object"
    return (
        "You may call the following functions. Their JSON schemas:\n"
        f"{json.dumps(specs)}\n"
        f"To call functions, answer with nothing but the call(s), as {many}, for example:\n"
        f"{_EXAMPLES[fmt]}\n"
        "When no function is needed, answer in plain text."
    )


def format_calls(fmt: str, calls: list[tuple[str, str]]) -> str:
    """Past calls ((name, JSON arguments) pairs) written as the model would have written them."""
    if fmt == "smollm2":
        body = ", ".join(f'{{"name": {json.dumps(n)}, "arguments": {a}}}' for n, a in calls)
        return f"<tool_call>[{body}]</tool_call>"
    if fmt == "hermes":
        return "".join(f'<tool_call>{{"name": {json.dumps(n)}, "arguments": {a}}}</tool_call>' for n, a in calls)
    return "".join(f'{{"name": {json.dumps(n)}, "parameters": {a}}}' for n, a in calls)


def call_grammar(fmt: str, tools: list[dict[str, Any]], name: str | None = None) -> str:
    """A Lark grammar (llguidance dialect) that admits only tool calls in `fmt`: calls of the
    tool `name`, or of any of `tools` when `name` is None, with schema-valid arguments."""
    specs = [t.get("function", t) for t in tools]
    if name is not None:
        specs = [s for s in specs if s.get("name") == name]
        if not specs:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    args_key = "parameters" if fmt == "llama3_json" else "arguments"

    def closed(schema: dict[str, Any]) -> dict[str, Any]:
        # Strict mode: an object lists all its properties unless it says otherwise, so a call
        # cannot wander into invented keys and run out of tokens.
        schema = dict(schema or {"type": "object", "properties": {}})
        if schema.get("type") == "object" and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema

    options = [{"type": "object", "additionalProperties": False, "required": ["name", args_key],
                "properties": {"name": {"const": s["name"]}, args_key: closed(s.get("parameters"))}} for s in specs]
    call = options[0] if len(options) == 1 else {"anyOf": options}
    rule = "call: %json " + json.dumps(call)
    more = "" if name is not None else "*"  # a named choice is exactly one call
    if fmt == "smollm2":
        return f'start: "<tool_call>[" call ("," call){more} "]</tool_call>"\n' + rule if more else \
            'start: "<tool_call>[" call "]</tool_call>"\n' + rule
    if fmt == "hermes":
        return f'start: ("<tool_call>" call "</tool_call>"){"+" if more else ""}\n' + rule
    return "start: call\n" + rule
