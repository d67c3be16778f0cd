"""Streaming tool-call parsers: identical events however the text is chunked."""
from __future__ import annotations

import json

import pytest

from tools.parsers import PARSERS, ArgsDelta, CallEnd, CallStart, TextDelta, ToolCallParser


def run(parser: ToolCallParser, text: str, chunk: int) -> tuple[str, list[tuple[str, str]], dict[int, str]]:
    events = []
    for i in range(0, len(text), chunk):
        events += parser.feed(text[i : i + chunk])
    events += parser.finish()
    out_text = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls = [(e.name, e.arguments) for e in events if isinstance(e, CallEnd)]
    streamed: dict[int, str] = {}
    for e in events:
        if isinstance(e, ArgsDelta):
            streamed[e.index] = streamed.get(e.index, "") + e.delta
    starts = [e for e in events if isinstance(e, CallStart)]
    ended = {e.index for e in events if isinstance(e, CallEnd)}
    # Every completed call was announced first, before its arguments and its end.
    for st in [s for s in starts if s.index in ended]:
        first_delta = next((k for k, e in enumerate(events) if isinstance(e, ArgsDelta) and e.index == st.index), None)
        end = next(k for k, e in enumerate(events) if isinstance(e, CallEnd) and e.index == st.index)
        assert events.index(st) < end and (first_delta is None or events.index(st) < first_delta)
    return out_text, calls, streamed


CASES = [
    ("hermes", 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>',
     "Let me check. ", [("get_weather", {"city": "Paris", "unit": "c"})]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {"x": "}{\\"<"}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>',
     "", [("a", {"x": '}{"<'}), ("b", {})]),
    ("smollm2", '<tool_call>[{"name": "add", "arguments": {"a": 1, "b": [2, 3]}}, {"name": "neg", "arguments": {"v": -1}}]</tool_call>',
     "", [("add", {"a": 1, "b": [2, 3]}), ("neg", {"v": -1})]),
    ("smollm2", "No tools needed: 2 < 3 and <b>bold</b>.", "No tools needed: 2 < 3 and <b>bold</b>.", []),
    ("llama3_json", '<|python_tag|>{"name": "search", "parameters": {"q": "ember"}}', "", [("search", {"q": "ember"})]),
    ("llama3_json", "Plain answer {not json", "Plain answer {not json", []),
]


@pytest.mark.parametrize("fmt, text, want_text, want_calls", CASES)
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_parsers_stream_the_same_events_whatever_the_chunking(fmt, text, want_text, want_calls, chunk) -> None:
    out_text, calls, streamed = run(PARSERS[fmt](), text, chunk)
    assert out_text == want_text
    assert [(n, json.loads(a)) for n, a in calls] == want_calls
    for i, (_, args) in enumerate(calls):
        assert json.loads(streamed[i]) == json.loads(args)  # the deltas add up to the arguments


def test_unterminated_call_is_not_lost() -> None:
    text = 'Sure <tool_call>{"name": "f", "argu'
    parser = PARSERS["hermes"]()
    out_text, calls, _ = run(parser, text, 4)
    assert calls == [] and out_text == text and parser.num_calls == 0
