"""The calculator's tools registered on the server (`ember serve --tools ...`): the server runs
them itself, and the client only watches the tool events of one response.

    python examples/agents/server_tools.py [--url HOST:PORT]   (a given server must have been
    started with --tools examples.agents.calc_tools:TOOLS)"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.agents._server import args, server  # noqa: E402
from tools import protocol as P  # noqa: E402
from tools.client import SessionClient  # noqa: E402


async def run(url: str) -> None:
    async with SessionClient(f"ws://{url}/v1/ws") as client:
        await client.update(instructions="Use the tools for every computation, then state the result.")
        await client.send_message("How many miles is 42 kilometres?")
        async for ev in client.respond(tool_choice={"type": "function", "name": "km_to_miles"},
                                       temperature=0, max_output_tokens=80):
            if isinstance(ev, P.ToolExecutionStarted):
                print(f"server runs: {ev.name}")
            elif isinstance(ev, P.ToolExecutionDone):
                print(f"server result: {ev.name} -> {ev.output} (error={ev.is_error}, {ev.duration_ms} ms)")
            elif isinstance(ev, P.ResponseDone):
                text = "".join(p.get("text", "") for o in ev.response.output if o["type"] == "message"
                               for p in o.get("content", []))
                print(f"answer: {text.strip()}")


def main() -> None:
    a = args()
    with server(a.url, "--tools", "examples.agents.calc_tools:TOOLS", "--max-tool-rounds", "1") as url:
        asyncio.run(run(url))


if __name__ == "__main__":
    main()
