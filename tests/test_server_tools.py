"""Server-side tools (`--tools module:attr`): the server runs them as soon as their arguments are
complete, reports them as tool events, appends their outputs and continues the same response."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.server_util import Client, ServerProcess, module_server


server = module_server("tools", "--tools", "tests.data.server_tools:TOOLS", "--tool-timeout", "0.5", "--max-tool-rounds", "2")


@pytest.mark.parametrize("name, ok, expect", [
    ("add", True, None), ("explode", False, "RuntimeError: exploded"), ("sleepy", False, "timed out after 0.5 s")])
def test_a_server_side_tool(server: ServerProcess, name: str, ok: bool, expect: str | None) -> None:
    c = Client(server)
    created = c.recv()
    assert created["type"] == "session.created"
    c.send({"type": "session.update", "session": {"tool_choice": {"type": "function", "name": name}}})
    tools = c.until("session.updated")[-1]["session"]["tools"]
    assert {t["function"]["name"] for t in tools} == {"add", "explode", "sleepy"}
    c.send({"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": "Use the tool, then tell me the result."}})
    c.until("conversation.item.added")
    c.send({"type": "response.create", "response": {"temperature": 0, "max_output_tokens": 40}})
    events = c.until("response.done")
    types = [e["type"] for e in events]
    started = types.index("tool.execution.started")
    done_i = types.index("tool.execution.done")
    assert types.index("response.function_call_arguments.done") < started < done_i
    done = events[done_i]
    assert done["name"] == name and done["is_error"] is (not ok) and done["duration_ms"] >= 0
    if ok:
        args = json.loads(next(e for e in events if e["type"] == "response.function_call_arguments.done")["arguments"])
        assert done["output"] == str(args["a"] + args["b"])
    else:
        assert expect in done["output"]
    added = events[done_i + 1]
    assert added["type"] == "conversation.item.added" and added["item"]["type"] == "function_call_output"
    assert added["item"]["call_id"] == done["call_id"] and added["item"]["output"] == done["output"]
    # The same response went on after the tool: a second round of output items.
    response = events[-1]["response"]
    assert len({e["response_id"] for e in events if "response_id" in e}) == 1
    assert response["output"][0]["type"] == "function_call" and len(response["output"]) >= 2
    assert sum(response["usage"]["cache"].values()) == response["usage"]["input_tokens"]
    # The session is usable afterwards.
    assert c.turn("Thanks!", max_output_tokens=4, temperature=0, tool_choice="none")["response"]["status"] in ("completed", "incomplete")
    c.close()


def test_in_process_hooks_when_embedding_ember(tmp_path: Path) -> None:
    import threading
    import time

    import uvicorn

    from runtime import LLM
    from runtime.async_engine import AsyncEngine
    from runtime.server.app import ServerConfig, ServerState, create_app
    from runtime.server.hooks import Hooks, ServerTools
    from runtime.session_engine import SessionEngine
    from tests.data.server_tools import add
    from tests.redis_util import free_port

    seen: dict[str, list] = {"before": [], "after": [], "tokens": []}

    def before(session_id: str, name: str, args: dict) -> dict:
        seen["before"].append((name, dict(args)))
        return {"a": 40, "b": 2}  # the embedding application rewrites the call

    engine = LLM("smollm2-135m").engine
    state = ServerState(AsyncEngine(engine), SessionEngine(engine, tool_format="smollm2"),
                        ServerConfig(model_id="smollm2-135m", parser_format="smollm2"))
    state.tools = ServerTools({"add": add}, timeout_s=5, max_rounds=1)
    state.hooks = Hooks(before_tool_call=before,
                        after_tool_result=lambda sid, name, out, err: seen["after"].append((name, out, err)),
                        on_token=lambda sid, delta: seen["tokens"].append(delta))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        class Local:
            url = f"127.0.0.1:{port}"

        c = Client(Local())  # type: ignore[arg-type]
        c.recv()
        c.send({"type": "session.update", "session": {"tool_choice": "required"}})
        c.until("session.updated")
        done = c.turn("Add two numbers.", temperature=0, max_output_tokens=80)
        c.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        state.aengine.shutdown()
    assert seen["before"] and seen["before"][0][0] == "add"
    assert seen["after"] == [("add", "42", False)]
    assert "".join(seen["tokens"]).startswith("<tool_call>")
    assert done["response"]["output"][0]["type"] == "function_call"
