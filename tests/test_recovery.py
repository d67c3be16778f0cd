"""A server killed with SIGKILL loses nothing a client needs: a new server against the same Redis
recovers the session, and its continuation is token-identical to an uninterrupted run, with the
prompt served from the Redis tier rather than recomputed."""
from __future__ import annotations

from pathlib import Path

import httpx

from runtime import LLM, SamplingParams
from runtime.session_engine import SessionEngine
from tests.redis_util import RedisServer, redis_server  # noqa: F401 (fixture)
from tests.server_util import Client, ServerProcess

TURNS = ["Hello! Who are you?", "Name a fruit.", "What colour is it?", "Thanks. Say goodbye."]
RESPONSE = {"max_output_tokens": 12, "temperature": 0}


def test_sigkill_and_recover_from_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    first = ServerProcess("--redis", redis_server.url, log_path=tmp_path / "first.log").start()
    try:
        c = Client(first)
        created = c.recv()
        assert created["type"] == "session.created" and created["seq"] == 1
        sid = created["session"]["id"]
        texts = []
        for text in TURNS[:3]:
            done = c.turn(text, **RESPONSE)
            texts.append(done["response"]["output"][0]["content"][0]["text"])
        last_seq = c.events[-1]["seq"]
        c.close()
        import time

        time.sleep(1.0)  # session writes are asynchronous: let the last ones land
    finally:
        first.kill()

    second = ServerProcess("--redis", redis_server.url, log_path=tmp_path / "second.log").start()
    try:
        c = Client(second, f"?session_id={sid}&after_seq={last_seq}")
        resumed = c.recv()
        assert resumed["type"] == "session.resumed" and resumed["seq"] == last_seq + 1
        assert resumed["session"]["last_seq"] == last_seq  # nothing after what the client saw
        done = c.turn(TURNS[3], **RESPONSE)
        texts.append(done["response"]["output"][0]["content"][0]["text"])
        usage = done["response"]["usage"]
        info = httpx.get(f"http://{second.url}/v1/sessions/{sid}").json()
        c.close()
    finally:
        second.stop()

    # The prompt came back from Redis: all but the new user message and the last partial block.
    assert usage["cache"]["redis"] > 0 and usage["cache"]["gpu"] == 0
    assert usage["cache"]["recomputed"] < 48, usage
    assert sum(usage["cache"].values()) == usage["input_tokens"]

    # The same four turns, uninterrupted, in one process.
    se = SessionEngine(LLM("smollm2-135m").engine)
    s = se.manager.create("default")
    ref_texts = []
    for text in TURNS:
        se.append_item(s, {"type": "message", "role": "user", "content": text})
        out = se.run_turn(s, SamplingParams(max_tokens=12, temperature=0))
        ref_texts.append(out.text)
    assert texts == ref_texts
    assert info["num_tokens"] == len(s.token_ids)
