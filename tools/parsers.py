"""Streaming tool-call parsers: model text in, text deltas and tool-call events out.

One ABC, one implementation per output format:
- `hermes`: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one call per tag;
- `smollm2`: a JSON list of calls inside one ``<tool_call>`` tag (SmolLM2's own agent format);
- `llama3_json`: a bare JSON object ``{"name": ..., "parameters": {...}}`` as the whole reply,
  optionally after ``<|python_tag|>``.

Text before a call streams as text. A call is announced (`CallStart`) as soon as its name is
complete, its arguments stream as they are generated (`ArgsDelta`, raw JSON text), and `CallEnd`
carries the complete arguments string once its closing brace arrives.
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    name: str


@dataclass(frozen=True)
class ArgsDelta:
    index: int
    delta: str


@dataclass(frozen=True)
class CallEnd:
    index: int
    name: str
    arguments: str  # a JSON object, as text


ParseEvent = Union[TextDelta, CallStart, ArgsDelta, CallEnd]


class ToolCallParser(ABC):
    """Contract: `feed` takes the next text delta and returns the events it completes, in order;
    `finish` flushes at the end of generation (an unterminated call's text is returned as text, so
    nothing the model wrote is lost). Instances are single-use, one per response. Never raises on
    malformed model output: what does not parse as a call is text."""

    @abstractmethod
    def feed(self, delta: str) -> list[ParseEvent]: ...

    @abstractmethod
    def finish(self) -> list[ParseEvent]: ...

    @property
    @abstractmethod
    def num_calls(self) -> int: ...


class _ObjectScanner:
    """Finds where a JSON value ends in text that arrives piece by piece (strings and escapes aware)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_str = False
        self.escape = False
        self.started = False

    def feed(self, text: str) -> int:
        """Consume `text`; returns the index just past the value's end, or -1 if it continues."""
        for i, ch in enumerate(text):
            if self.in_str:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_str = False
                continue
            if ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
                self.started = True
            elif ch in "}]":
                self.depth -= 1
                if self.started and self.depth == 0:
                    return i + 1
        return -1


_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


class _CallStream:
    """One call object being generated: {"name": "...", "<args key>": {...}}."""

    def __init__(self, index: int, args_key: str) -> None:
        self.index = index
        self.args_key = re.compile(r'"' + args_key + r'"\s*:\s*')
        self.buf = ""
        self.name: str | None = None
        self.args_start = -1
        self.args_sent = 0
        self.args_scan = _ObjectScanner()
        self.args_done = False
        self.obj_scan = _ObjectScanner()
        self.closed_at = -1  # index in buf just past the call object's end

    def feed(self, text: str) -> list[ParseEvent]:
        start = len(self.buf)
        self.buf += text
        end = self.obj_scan.feed(text)
        if end >= 0:
            self.closed_at = start + end
        events: list[ParseEvent] = []
        if self.name is None:
            m = _NAME.search(self.buf)
            if m:
                self.name = json.loads(f'"{m.group(1)}"')
                events.append(CallStart(self.index, self.name))
        if self.name is not None and self.args_start < 0:
            m = self.args_key.search(self.buf)
            if m and m.end() < len(self.buf):
                self.args_start = m.end()
                self.args_sent = self.args_start
        if self.args_start >= 0 and not self.args_done:
            fresh = self.buf[self.args_sent :]
            stop = self.args_scan.feed(fresh)
            if stop >= 0:
                fresh = fresh[:stop]
                self.args_done = True
            if fresh:
                events.append(ArgsDelta(self.index, fresh))
                self.args_sent += len(fresh)
        return events

    def end_event(self) -> CallEnd | None:
        """The CallEnd if the object parsed as a call, else None (it was not a call)."""
        text = self.buf[: self.closed_at] if self.closed_at >= 0 else self.buf
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get(self.args_key.pattern.split('"')[1], {})
        return CallEnd(self.index, obj["name"], json.dumps(args if args is not None else {}))


class _TaggedParser(ToolCallParser):
    """Text, then ``<tool_call>`` ... ``</tool_call>`` regions holding one call or a list of calls."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, args_key: str = "arguments") -> None:
        self.args_key = args_key
        self.pending = ""  # text not yet classified (may be the start of a tag)
        self.in_tag = False
        self.tag_text = ""  # raw text inside the current tag
        self.call: _CallStream | None = None
        self._calls = 0

    @property
    def num_calls(self) -> int:
        return self._calls

    def feed(self, delta: str) -> list[ParseEvent]:
        self.pending += delta
        events: list[ParseEvent] = []
        while self.pending:
            if not self.in_tag:
                i = self.pending.find(self.OPEN)
                if i < 0:
                    # Hold back a suffix that could still become "<tool_call>".
                    keep = next((k for k in range(min(len(self.OPEN) - 1, len(self.pending)), 0, -1)
                                 if self.OPEN.startswith(self.pending[-k:])), 0)
                    text, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
                    if text:
                        events.append(TextDelta(text))
                    return events
                if i:
                    events.append(TextDelta(self.pending[:i]))
                self.pending = self.pending[i + len(self.OPEN) :]
                self.in_tag, self.tag_text = True, ""
                continue
            j = self.pending.find(self.CLOSE)
            chunk = self.pending if j < 0 else self.pending[:j]
            if j < 0:
                keep = next((k for k in range(min(len(self.CLOSE) - 1, len(chunk)), 0, -1)
                             if self.CLOSE.startswith(chunk[-k:])), 0)
                chunk = chunk[: len(chunk) - keep]
            events += self._feed_tag(chunk)
            if j < 0:
                self.pending = self.pending[len(chunk) :]
                return events
            self.pending = self.pending[j + len(self.CLOSE) :]
            events += self._close_tag()
        return events

    def _feed_tag(self, text: str) -> list[ParseEvent]:
        events: list[ParseEvent] = []
        self.tag_text += text
        while text:
            if self.call is None:
                k = text.find("{")
                if k < 0:
                    return events
                self.call = _CallStream(self._calls, self.args_key)
                text = text[k:]
            events += self.call.feed(text)
            if self.call.closed_at < 0:
                return events
            rest = self.call.buf[self.call.closed_at :]
            events += self._end_call()
            text = rest
        return events

    def _end_call(self) -> list[ParseEvent]:
        assert self.call is not None
        end = self.call.end_event()
        self.call = None
        if end is None:
            return []
        self._calls += 1
        return [end]

    def _close_tag(self) -> list[ParseEvent]:
        self.in_tag = False
        self.call = None  # an object the tag closed before its brace did is dropped
        return []

    def finish(self) -> list[ParseEvent]:
        events: list[ParseEvent] = []
        if self.in_tag:
            # An unterminated tag: a call whose object closed still counts; leftovers are text.
            if self.call is not None and self.call.closed_at >= 0:
                events += self._end_call()
            elif self.tag_text and self._calls == 0:
                events.append(TextDelta(self.OPEN + self.tag_text + self.pending))
            self.pending = ""
        elif self.pending:
            events.append(TextDelta(self.pending))
            self.pending = ""
        return events


class HermesParser(_TaggedParser):
    """One call object per tag (several tags for several calls)."""


class SmolLM2Parser(_TaggedParser):
    """A JSON list of call objects in one tag: the scanner walks from object to object."""


class Llama3JsonParser(ToolCallParser):
    """The whole reply is one call object when it starts with '{' (after an optional
    <|python_tag|>); otherwise it is text."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        self.head = ""
        self.mode: str | None = None  # "text" | "call"
        self.call = _CallStream(0, "parameters")
        self._calls = 0

    @property
    def num_calls(self) -> int:
        return self._calls

    def feed(self, delta: str) -> list[ParseEvent]:
        if self.mode is None:
            self.head += delta
            stripped = self.head.lstrip()
            if stripped.startswith(self.TAG):
                stripped = stripped[len(self.TAG) :].lstrip()
            elif self.TAG.startswith(stripped) and stripped:
                return []
            if not stripped:
                return []
            self.mode = "call" if stripped.startswith("{") else "text"
            delta, self.head = (stripped if self.mode == "call" else self.head), ""
        if self.mode == "text":
            return [TextDelta(delta)]
        events = self.call.feed(delta)
        return events

    def finish(self) -> list[ParseEvent]:
        if self.mode == "call":
            end = self.call.end_event()
            if end is not None:
                self._calls = 1
                return [end]
            return [TextDelta(self.call.buf)]
        return [TextDelta(self.head)] if self.head else []


PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesParser,
    "smollm2": SmolLM2Parser,
    "llama3_json": Llama3JsonParser,
}


def parser_for(model_family: str) -> str:
    """The default format for a model family (overridable by configuration)."""
    fam = model_family.lower()
    if "smollm" in fam:
        return "smollm2"
    if "llama-3" in fam or "llama3" in fam:
        return "llama3_json"
    return "hermes"
