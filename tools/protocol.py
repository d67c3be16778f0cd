"""Ember session protocol, version 1: client events as msgspec Structs, a tagged union on `type`,
decoded with validation (a wrong field type or an unknown event is a clear error)."""
from __future__ import annotations

from typing import Any, Literal, Union

import msgspec


class ContentPart(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["input_text", "output_text"]
    text: str


class MessageItem(msgspec.Struct, tag="message", tag_field="type", forbid_unknown_fields=True):
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[ContentPart]]
    id: Union[str, None] = None


class FunctionCallOutputItem(msgspec.Struct, tag="function_call_output", tag_field="type", forbid_unknown_fields=True):
    call_id: str
    output: str
    id: Union[str, None] = None


Item = Union[MessageItem, FunctionCallOutputItem]


class FunctionTool(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    name: str


ToolChoice = Union[Literal["auto", "none", "required"], NamedToolChoice]


class SessionConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    instructions: Union[str, None] = None
    tools: Union[list[FunctionTool], None] = None
    tool_choice: Union[ToolChoice, None] = None
    temperature: Union[float, None] = None
    top_p: Union[float, None] = None
    max_output_tokens: Union[int, None] = None
    metadata: Union[dict[str, Any], None] = None


class ResponseConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    max_output_tokens: Union[int, None] = None
    temperature: Union[float, None] = None
    top_p: Union[float, None] = None
    seed: Union[int, None] = None
    tool_choice: Union[ToolChoice, None] = None
    stop: Union[list[str], None] = None


class SessionUpdate(msgspec.Struct, tag="session.update", tag_field="type", forbid_unknown_fields=True):
    session: SessionConfig
    event_id: Union[str, None] = None


class ItemCreate(msgspec.Struct, tag="conversation.item.create", tag_field="type", forbid_unknown_fields=True):
    item: Item
    event_id: Union[str, None] = None


class ResponseCreate(msgspec.Struct, tag="response.create", tag_field="type", forbid_unknown_fields=True):
    response: ResponseConfig = msgspec.field(default_factory=ResponseConfig)
    event_id: Union[str, None] = None


class ResponseCancel(msgspec.Struct, tag="response.cancel", tag_field="type", forbid_unknown_fields=True):
    response_id: Union[str, None] = None
    event_id: Union[str, None] = None


class SessionFork(msgspec.Struct, tag="session.fork", tag_field="type", forbid_unknown_fields=True):
    metadata: Union[dict[str, Any], None] = None
    event_id: Union[str, None] = None


class SessionClose(msgspec.Struct, tag="session.close", tag_field="type", forbid_unknown_fields=True):
    event_id: Union[str, None] = None


ClientEvent = Union[SessionUpdate, ItemCreate, ResponseCreate, ResponseCancel, SessionFork, SessionClose]

_decoder = msgspec.json.Decoder(ClientEvent)


class ProtocolError(ValueError):
    """A client frame that is not a valid event; `event_id` echoes the client's when it had one."""

    def __init__(self, message: str, event_id: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.event_id = event_id
        self.param = param


def decode_client_event(data: str | bytes) -> ClientEvent:
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as e:
        event_id = None
        try:
            raw = msgspec.json.decode(data)
            if isinstance(raw, dict) and isinstance(raw.get("event_id"), str):
                event_id = raw["event_id"]
        except msgspec.DecodeError:
            pass
        raise ProtocolError(f"invalid event: {e}", event_id) from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"invalid JSON: {e}") from None


def item_to_dict(item: Item) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(item)
    if out.get("id") is None:
        out.pop("id", None)
    return out


def error_event(type_: str, code: str, message: str, event_id: str | None = None, param: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"type": type_, "code": code, "message": message}
    if param is not None:
        err["param"] = param
    if event_id is not None:
        err["event_id"] = event_id
    return {"type": "error", "error": err}


# ---- server events ------------------------------------------------------------------------
# Every event the server sends, as a Struct (the SDK decodes with these; the tests decode every
# event the server emits with them, so the server cannot drift from its own contract).

class _ServerEvent(msgspec.Struct, tag_field="type", kw_only=True):
    event_id: str
    seq: int


class SessionInfo(msgspec.Struct, kw_only=True):
    id: str
    created_at: Union[int, None] = None
    last_seq: Union[int, None] = None
    state: Union[Literal["idle", "generating", "awaiting_tool", "closed"], None] = None
    metadata: Union[dict[str, Any], None] = None
    forked_from: Union[str, None] = None
    instructions: Union[str, None] = None
    tools: Union[list[dict[str, Any]], None] = None
    temperature: Union[float, None] = None
    top_p: Union[float, None] = None
    max_output_tokens: Union[int, None] = None
    tool_choice: Union[str, dict[str, Any], None] = None


class SessionCreated(_ServerEvent, tag="session.created"):
    session: SessionInfo


class SessionResumed(_ServerEvent, tag="session.resumed"):
    session: SessionInfo


class SessionUpdated(_ServerEvent, tag="session.updated"):
    session: SessionInfo


class SessionForked(_ServerEvent, tag="session.forked"):
    session: SessionInfo


class SessionClosed(_ServerEvent, tag="session.closed"):
    session: SessionInfo


class ItemAdded(_ServerEvent, tag="conversation.item.added"):
    item: dict[str, Any]


class ResponseRef(msgspec.Struct):
    id: str
    status: str


class ResponseCreated(_ServerEvent, tag="response.created"):
    response: ResponseRef


class OutputItemAdded(_ServerEvent, tag="response.output_item.added"):
    response_id: str
    output_index: int
    item: dict[str, Any]


class OutputTextDelta(_ServerEvent, tag="response.output_text.delta"):
    response_id: str
    item_id: str
    output_index: int
    delta: str


class OutputTextDone(_ServerEvent, tag="response.output_text.done"):
    response_id: str
    item_id: str
    output_index: int
    text: str


class ArgumentsDelta(_ServerEvent, tag="response.function_call_arguments.delta"):
    response_id: str
    item_id: str
    output_index: int
    call_id: str
    delta: str


class ArgumentsDone(_ServerEvent, tag="response.function_call_arguments.done"):
    response_id: str
    item_id: str
    output_index: int
    call_id: str
    name: str
    arguments: str


class OutputItemDone(_ServerEvent, tag="response.output_item.done"):
    response_id: str
    output_index: int
    item: dict[str, Any]


class ToolExecutionStarted(_ServerEvent, tag="tool.execution.started"):
    response_id: str
    call_id: str
    name: str


class ToolExecutionDone(_ServerEvent, tag="tool.execution.done"):
    response_id: str
    call_id: str
    name: str
    output: str
    is_error: bool
    duration_ms: int


class CacheUsage(msgspec.Struct, forbid_unknown_fields=True):
    gpu: int
    host: int
    redis: int
    recomputed: int


class InputTokenDetails(msgspec.Struct, forbid_unknown_fields=True):
    cached_tokens: int


class Usage(msgspec.Struct, forbid_unknown_fields=True):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_token_details: InputTokenDetails
    cache: CacheUsage


class ResponseInfo(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    status: Literal["completed", "incomplete", "cancelled", "failed"]
    stop_reason: Literal["stop", "tool_calls", "length", "cancelled", "error"]
    output: list[dict[str, Any]]
    usage: Usage
    status_details: Union[dict[str, Any], None] = None


class ResponseDone(_ServerEvent, tag="response.done"):
    response: ResponseInfo


class ErrorInfo(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["invalid_request_error", "authentication_error", "not_found", "rate_limit_error", "server_error"]
    code: str
    message: str
    param: Union[str, None] = None
    event_id: Union[str, None] = None


class Error(_ServerEvent, tag="error"):
    error: ErrorInfo


ServerEvent = Union[
    SessionCreated, SessionResumed, SessionUpdated, SessionForked, SessionClosed, ItemAdded, ResponseCreated,
    OutputItemAdded, OutputTextDelta, OutputTextDone, ArgumentsDelta, ArgumentsDone, OutputItemDone,
    ToolExecutionStarted, ToolExecutionDone, ResponseDone, Error,
]
_server_decoder = msgspec.json.Decoder(ServerEvent)


def decode_server_event(data: str | bytes) -> ServerEvent:
    return _server_decoder.decode(data)
