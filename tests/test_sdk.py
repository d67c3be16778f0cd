"""The SDK against a running server: the agent loop with client-side tools and hooks, and a
client that resumes by itself after its TCP connection is cut mid-response."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.server_util import ServerProcess, module_server
from tools import protocol as P
from tools.agent import Agent, AgentHooks
from tools.client import SessionClient
from tools.decorator import tool


server = module_server("sdk")


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def test_agent_runs_client_side_tools_with_hooks(server: ServerProcess) -> None:
    seen: dict[str, list] = {"tokens": [], "start": [], "end": [], "done": []}
    agent = Agent(
        instructions="You are a calculator. Use the tool, then state the result.",
        tools=[multiply], tool_choice={"type": "function", "name": "multiply"}, temperature=0, max_output_tokens=60,
        hooks=AgentHooks(on_token=seen["tokens"].append, on_tool_start=lambda n, a: seen["start"].append((n, a)),
                         on_tool_end=lambda n, o, e: seen["end"].append((n, o, e)),
                         on_response_done=seen["done"].append),
    )
    result = agent.run_sync("What is 6 times 7?", url=f"ws://{server.url}/v1/ws")
    (call,) = result.tool_calls[:1]
    assert call.name == "multiply" and call.output == str(call.arguments["a"] * call.arguments["b"])
    assert seen["start"][0][0] == "multiply" and seen["end"][0] == ("multiply", call.output, False)
    assert len(result.responses) >= 2 and result.responses[0].stop_reason == "tool_calls"
    assert result.responses[-1].stop_reason != "tool_calls" and result.final_output
    assert seen["tokens"] and len(seen["done"]) == len(result.responses)


def test_client_resumes_after_the_tcp_connection_is_cut(server: ServerProcess) -> None:
    async def run() -> tuple[list[P.ServerEvent], SessionClient]:
        client = SessionClient(f"ws://{server.url}/v1/ws")
        await client.connect()
        await client.send_message("Count from one to twenty, in words.")
        events: list[P.ServerEvent] = []
        deltas = 0
        async for ev in client.respond(temperature=0, max_output_tokens=60):
            events.append(ev)
            if isinstance(ev, P.OutputTextDelta):
                deltas += 1
                if deltas == 5:
                    client.drop_connection()  # the TCP socket cut, no closing handshake
        await client.close()
        return events, client

    events, client = asyncio.run(run())
    assert client.reconnects == 1
    seqs = [e.seq for e in events]  # the reconnect's own session.resumed is a logged event too
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "an event was lost or repeated"
    assert sum(isinstance(e, P.SessionResumed) for e in events) == 1
    done = events[-1]
    assert isinstance(done, P.ResponseDone)
    text = "".join(e.delta for e in events if isinstance(e, P.OutputTextDelta))
    assert text == done.response.output[0]["content"][0]["text"]
