"""A calculator and unit-conversion agent whose tools run on the client.

    python examples/agents/calculator.py [--url HOST:PORT]

A 135M model does not choose tools reliably on its own, so the first response asks for a call
through `tool_choice` ("required"), as a real agent on a small model would."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.agents._server import args, server  # noqa: E402
from examples.agents.calc_tools import km_to_miles, multiply  # noqa: E402
from tools.agent import Agent, AgentHooks  # noqa: E402


def main() -> None:
    a = args()
    with server(a.url) as url:
        agent = Agent(
            instructions="You are a careful calculator. Use a tool for every computation, then state the result.",
            tools=[multiply, km_to_miles], tool_choice="required", temperature=0, max_output_tokens=80,
            hooks=AgentHooks(on_tool_start=lambda n, args: print(f"tool call: {n}({args})"),
                             on_tool_end=lambda n, out, err: print(f"tool result: {n} -> {out}{' (error)' if err else ''}")),
        )
        result = agent.run_sync("How many miles is 42 kilometres?", url=f"ws://{url}/v1/ws")
        print(f"answer: {result.final_output.strip()}")


if __name__ == "__main__":
    main()
