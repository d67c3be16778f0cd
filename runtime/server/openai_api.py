"""`POST /v1/chat/completions`, compatible with the official `openai` client: non-streaming and
server-sent events, `tools`, `tool_choice` ("none" suppresses calls), usage with cached tokens."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from runtime.outputs import RequestOutput
from runtime.sampling_params import SamplingParams
from sessions.session import new_id
from tools.formats import call_grammar, format_calls, tool_system_prompt
from tools.parsers import PARSERS, ArgsDelta, CallEnd, CallStart, TextDelta


def _error(status: int, message: str, code: str, param: str | None = None, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


def template_takes_tools(tokenizer: Any) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def to_template_messages(messages: list[dict[str, Any]], fmt: str, tools: list[dict[str, Any]] | None,
                         native_tools: bool) -> list[dict[str, Any]]:
    """OpenAI messages -> chat-template messages (tool calls in history written in `fmt`)."""
    out = []
    for m in messages:
        role = m.get("role")
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if role == "assistant" and m.get("tool_calls") and not native_tools:
            calls = [(c["function"]["name"], c["function"].get("arguments") or "{}") for c in m["tool_calls"]]
            content = (content + "\n" if content else "") + format_calls(fmt, calls)
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ValueError(f"unknown message role {role!r}")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if tools and not native_tools:
        prompt = tool_system_prompt(fmt, tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _usage(out: RequestOutput) -> dict[str, Any]:
    n_in, n_out = len(out.prompt_token_ids), len(out.token_ids)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


async def chat_completions(request: Request) -> Response:
    from runtime.server.app import ServerState, _bearer

    state: ServerState = request.app.state.ember
    tenant = state.tenant_for(_bearer(request.headers))
    if tenant is None:
        return _error(401, "missing or wrong API key", "invalid_api_key", type_="authentication_error")
    try:
        body = await request.json()
        messages = body["messages"]
        assert isinstance(messages, list) and messages
    except (ValueError, KeyError, AssertionError):
        return _error(400, "the body must be JSON with a non-empty `messages` list", "invalid_body", "messages")
    engine = state.aengine.engine
    tok = engine.tokenizer
    if tok is None:
        return _error(400, "this model has no tokenizer, so no chat template", "no_chat_template")
    fmt = state.cfg.parser_format
    tools = body.get("tools") or None
    tool_choice = body.get("tool_choice", "auto")
    use_tools = bool(tools) and tool_choice != "none"
    native = template_takes_tools(tok)
    try:
        conv = to_template_messages(messages, fmt, tools if use_tools else None, native)
        prompt = list(tok.apply_chat_template(conv, tools=tools if (use_tools and native) else None,
                                              add_generation_prompt=True, tokenize=True, return_dict=False))
        stop = body.get("stop")
        params = SamplingParams(
            max_tokens=int(body.get("max_completion_tokens") or body.get("max_tokens") or state.cfg.default_max_output_tokens),
            temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
            seed=body.get("seed"), stop=tuple([stop] if isinstance(stop, str) else (stop or ())),
        )
        forced = tool_choice == "required" or isinstance(tool_choice, dict)
        if forced:
            if not tools:
                raise ValueError("tool_choice requires tools")
            name = None
            if isinstance(tool_choice, dict):
                name = (tool_choice.get("function") or {}).get("name")
                if not isinstance(name, str):
                    raise ValueError("tool_choice must be 'none', 'auto', 'required' or {type: function, function: {name}}")
            params = replace(params, grammar=call_grammar(fmt, tools, name))
        engine.validate_prompt(prompt, params)
    except ValueError as err:
        code = "context_length_exceeded" if "context" in str(err) else "invalid_request"
        return _error(400, str(err), code)
    cid, created, model = f"chatcmpl-{new_id('c')[2:]}", int(time.time()), state.cfg.model_id
    gen = state.aengine.generate(prompt, params, tenant=tenant)
    parser = PARSERS[fmt]() if use_tools else None

    if not body.get("stream"):
        text, calls, final = "", [], None
        async for out in gen:
            events = (parser.feed(out.delta_text) if parser else [TextDelta(out.delta_text)]) if out.delta_text else []
            if out.finished and parser:
                events += parser.finish()
            for e in events:
                if isinstance(e, TextDelta):
                    text += e.text
                elif isinstance(e, CallEnd):
                    calls.append({"id": new_id("call"), "type": "function",
                                  "function": {"name": e.name, "arguments": e.arguments}})
            final = out
        assert final is not None
        reason = "tool_calls" if calls else ("length" if final.finish_reason == "length" else "stop")
        message: dict[str, Any] = {"role": "assistant", "content": text if (text or not calls) else None}
        if calls:
            message["tool_calls"] = calls
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model,
                             "choices": [{"index": 0, "message": message, "finish_reason": reason}],
                             "usage": _usage(final)})

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

    async def sse() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        ids: dict[int, str] = {}
        final = None
        async for out in gen:
            events = (parser.feed(out.delta_text) if parser else [TextDelta(out.delta_text)]) if out.delta_text else []
            if out.finished and parser:
                events += parser.finish()
            for e in events:
                if isinstance(e, TextDelta) and e.text:
                    yield chunk({"content": e.text})
                elif isinstance(e, CallStart):
                    ids[e.index] = new_id("call")
                    yield chunk({"tool_calls": [{"index": e.index, "id": ids[e.index], "type": "function",
                                                 "function": {"name": e.name, "arguments": ""}}]})
                elif isinstance(e, ArgsDelta):
                    yield chunk({"tool_calls": [{"index": e.index, "function": {"arguments": e.delta}}]})
            final = out
        assert final is not None
        n_calls = parser.num_calls if parser else 0
        yield chunk({}, "tool_calls" if n_calls else ("length" if final.finish_reason == "length" else "stop"))
        if include_usage:
            yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                         "model": model, "choices": [], "usage": _usage(final)}) + "\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")
