"""The session protocol against a running `ember serve` on the embedded model, with a real
websockets client."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.server_util import Client, ServerProcess

GREEDY = {"max_output_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("server")
    keys = d / "keys.json"
    keys.write_text(json.dumps({"key-a": "tenant-a", "key-b": "tenant-b"}))
    srv = ServerProcess("--api-keys", str(keys), "--max-model-len", "512", "--max-item-tokens", "1000",
                        log_path=d / "server.log").start()
    yield srv
    srv.stop()


A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


def test_a_session_end_to_end_with_seq_across_reconnects(server: ServerProcess) -> None:
    c = Client(server, headers=A)
    created = c.recv()
    assert created["type"] == "session.created" and created["session"]["state"] == "idle"
    sid = created["session"]["id"]
    c.send({"type": "session.update", "session": {"instructions": "Answer in one short sentence.", "temperature": 0}})
    assert c.until("session.updated")[-1]["session"]["instructions"] == "Answer in one short sentence."
    done = c.turn("What is the capital of France?", **GREEDY)
    types = [e["type"] for e in c.events]
    for t in ("conversation.item.added", "response.created", "response.output_item.added",
              "response.output_text.delta", "response.output_text.done", "response.output_item.done", "response.done"):
        assert t in types
    r = done["response"]
    assert r["status"] in ("completed", "incomplete") and r["output"][0]["type"] == "message"
    assert "Paris" in r["output"][0]["content"][0]["text"]
    u = r["usage"]
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
    assert sum(u["cache"].values()) == u["input_tokens"]
    seqs = [e["seq"] for e in c.events]
    assert seqs == list(range(1, len(seqs) + 1))  # +1 each, no gaps
    c.close()
    # Reconnect mid-history: exactly the events after the one asked for, then live.
    k = seqs[len(seqs) // 2]
    c2 = Client(server, f"?session_id={sid}&after_seq={k}", headers=A)
    replay = c2.until("session.resumed")
    assert [e["seq"] for e in replay] == list(range(k + 1, seqs[-1] + 2))
    assert [e["event_id"] for e in replay[:-1]] == [e["event_id"] for e in c.events[k:]]
    done2 = c2.turn("And of Italy?", **GREEDY)
    assert done2["seq"] > replay[-1]["seq"]
    assert done2["response"]["usage"]["input_token_details"]["cached_tokens"] > 0
    c2.close()


def test_tenants_are_isolated_and_foreign_ids_look_missing(server: ServerProcess) -> None:
    c = Client(server, headers=A)
    sid = c.recv()["session"]["id"]
    c.close()
    from websockets.exceptions import ConnectionClosed

    for headers in (B, {"Authorization": "Bearer key-a"}):
        query = f"?session_id={sid}" if headers is B else "?session_id=sess_doesnotexist"
        other = Client(server, query, headers=headers)
        ev = other.recv()
        assert ev["type"] == "error" and ev["error"]["type"] == "not_found"
        with pytest.raises(ConnectionClosed) as info:
            other.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 4404
    assert httpx.get(f"http://{server.url}/v1/sessions/{sid}", headers=B).status_code == 404
    assert httpx.get(f"http://{server.url}/v1/sessions/{sid}", headers=A).status_code == 200
    bad = Client(server, headers={"Authorization": "Bearer nope"})
    assert bad.recv()["error"]["type"] == "authentication_error"
    with pytest.raises(ConnectionClosed) as info:
        bad.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 4401
    assert httpx.post(f"http://{server.url}/v1/sessions").status_code == 401


def test_bad_frames_get_errors_and_the_session_stays_usable(server: ServerProcess) -> None:
    c = Client(server, headers=A)
    c.recv()
    c.ws.send("{not json")
    assert c.until("error")[-1]["error"]["code"] == "invalid_event"
    c.send({"type": "no.such.event", "event_id": "e1"})
    c.send({"type": "response.create", "event_id": "e2", "response": {"max_output_tokens": "many"}})
    errs = [c.until("error")[-1], c.until("error")[-1]]
    assert errs[1]["error"]["event_id"] == "e2" and errs[1]["error"]["type"] == "invalid_request_error"
    c.ws.send("x" * (2 << 20))
    assert c.until("error")[-1]["error"]["code"] == "frame_too_large"
    c.send({"type": "conversation.item.create", "event_id": "e3",
            "item": {"type": "function_call_output", "call_id": "call_unknown", "output": "1"}})
    err = c.until("error")[-1]["error"]
    assert err["event_id"] == "e3" and "unknown call_id" in err["message"]
    done = c.turn("Say hi.", **GREEDY)
    assert done["response"]["status"] in ("completed", "incomplete")
    c.close()


def test_cancel_fork_close_and_context_limit(server: ServerProcess) -> None:
    c = Client(server, headers=A)
    sid = c.recv()["session"]["id"]
    c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": "Count to fifty."}})
    c.until("conversation.item.added")
    c.send({"type": "response.create", "response": {"max_output_tokens": 200, "temperature": 0}})
    c.send({"type": "response.create", "event_id": "again", "response": {}})
    got = c.until("response.output_text.delta")
    assert any(e["type"] == "error" and e["error"]["code"] == "conversation_already_has_active_response" for e in got) \
        or c.until("error")[-1]["error"]["code"] == "conversation_already_has_active_response"
    for _ in range(20):  # take in what has already arrived, so only deltas sent after the cancel count
        try:
            c.recv(timeout=0.05)
        except TimeoutError:
            break
    c.send({"type": "response.cancel"})
    after = c.until("response.done")
    deltas_after_cancel = [e for e in after if e["type"] == "response.output_text.delta"]
    assert after[-1]["response"]["status"] == "cancelled" and after[-1]["response"]["stop_reason"] == "cancelled"
    assert len(deltas_after_cancel) <= 1  # the step in flight when the cancel arrived, at most
    c.send({"type": "session.fork", "metadata": {"branch": "b"}})
    forked = c.until("session.forked")[-1]["session"]
    assert forked["forked_from"] == sid
    f = Client(server, f"?session_id={forked['id']}", headers=A)
    assert f.recv()["type"] == "session.resumed"
    assert f.turn("Now count to three.", **GREEDY)["response"]["usage"]["input_token_details"]["cached_tokens"] > 0
    f.close()
    # An item over the per-item limit (1,000 tokens here) is refused; the session goes on.
    c.send({"type": "conversation.item.create", "event_id": "huge",
            "item": {"type": "message", "role": "user", "content": "word " * 1500}})
    err = c.until("error")[-1]["error"]
    assert err["event_id"] == "huge" and "limit is 1000" in err["message"]
    # Past the context (512 tokens here): the response fails, the session stays usable.
    long = "word " * 600
    done = c.turn(long, **GREEDY)
    assert done["response"]["status"] == "failed"
    assert done["response"]["status_details"]["error"]["code"] == "context_length_exceeded"
    c.send({"type": "session.close"})
    assert c.until("session.closed")[-1]["session"]["id"] == sid
    assert httpx.get(f"http://{server.url}/v1/sessions/{sid}", headers=A).status_code == 404


def test_http_endpoints(server: ServerProcess) -> None:
    base = f"http://{server.url}"
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert httpx.get(f"{base}/v1/models", headers=A).json()["data"][0]["id"] == "smollm2-135m"
    s = httpx.post(f"{base}/v1/sessions", headers=A, json={"metadata": {"x": 1}}).json()
    assert s["metadata"] == {"x": 1}
    fork = httpx.post(f"{base}/v1/sessions/{s['id']}/fork", headers=A).json()
    assert fork["forked_from"] == s["id"]
    assert httpx.delete(f"{base}/v1/sessions/{fork['id']}", headers=A).json()["deleted"] is True
    assert httpx.get(f"{base}/v1/sessions/{fork['id']}", headers=A).status_code == 404


def test_metrics(server: ServerProcess) -> None:
    c = Client(server, headers=A)
    c.recv()
    c.turn("Hi there.", **GREEDY)
    c.close()
    text = httpx.get(f"http://{server.url}/metrics").text
    for name in ("ember_running_sequences", "ember_waiting_sequences", "ember_generation_tokens_per_second",
                 "ember_time_to_first_token_seconds_bucket", "ember_inter_token_seconds_bucket",
                 'ember_prompt_tokens{tier="recomputed"}', 'ember_kv_blocks{tier="gpu",use="used"}',
                 'ember_sessions{state="idle"}', "ember_pinned_blocks"):
        assert name in text, name
    count = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("ember_time_to_first_token_seconds_count"))
    assert count >= 1


def test_official_openai_client(server: ServerProcess) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{server.url}/v1", api_key="key-a")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=16, temperature=0)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=16, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    stream = client.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, reasons, usage = [], [], None
    for ch in stream:
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            reasons.append(ch.choices[0].finish_reason)
        if ch.usage:
            usage = ch.usage
    assert "".join(parts) == r.choices[0].message.content
    assert reasons[-1] == r.choices[0].finish_reason and usage is not None
    with pytest.raises(Exception) as info:
        OpenAI(base_url=f"http://{server.url}/v1", api_key="wrong").chat.completions.create(
            model="smollm2-135m", messages=msgs, max_tokens=4)
    assert "401" in str(info.value) or "authentication" in str(info.value).lower()


WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"type": "string", "enum": ["c", "f"]}},
                          "required": ["city", "unit"]}}
CLOCK = {"type": "function", "name": "get_time", "description": "The time in a timezone",
         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}


def test_a_named_tool_choice_always_yields_a_valid_call(server: ServerProcess) -> None:
    import jsonschema

    clients = []
    for seed in range(20):
        c = Client(server, headers=A)
        c.recv()
        c.send({"type": "session.update", "session": {"tools": [WEATHER, CLOCK],
                                                      "tool_choice": {"type": "function", "name": "get_weather"}}})
        c.until("session.updated")
        c.send({"type": "conversation.item.create",
                "item": {"type": "message", "role": "user", "content": "Tell me a joke about cats."}})
        c.until("conversation.item.added")
        c.send({"type": "response.create", "response": {"temperature": 1.0, "seed": seed, "max_output_tokens": 120}})
        clients.append(c)
    for c in clients:  # all twenty ran in one batch
        events = c.until("response.done")
        r = events[-1]["response"]
        assert r["stop_reason"] == "tool_calls" and r["status"] == "completed", r
        (call,) = [o for o in r["output"] if o["type"] == "function_call"]
        assert call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), WEATHER["parameters"])
        streamed = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
        assert json.loads(streamed) == json.loads(call["arguments"])
        assert any(e["type"] == "response.function_call_arguments.done" for e in events)
        c.close()


def test_openai_client_streams_a_tool_call(server: ServerProcess) -> None:
    import jsonschema
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{server.url}/v1", api_key="key-a")
    tools = [{"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}]
    stream = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What's the weather in Paris, in celsius?"}],
        tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0, max_tokens=80, stream=True)
    name, args, reasons = None, "", []
    for ch in stream:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        for tc in d.tool_calls or []:
            name = tc.function.name or name
            args += tc.function.arguments or ""
        reasons.append(ch.choices[0].finish_reason)
    assert name == "get_weather" and reasons[-1] == "tool_calls"
    jsonschema.validate(json.loads(args), WEATHER["parameters"])
    plain = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=tools,
        tool_choice="required", temperature=0, max_tokens=80)
    (tc,) = plain.choices[0].message.tool_calls
    assert tc.function.name == "get_weather" and plain.choices[0].finish_reason == "tool_calls"
