"""A branching agent: one session forked into alternatives that run in parallel; the best is
picked, and the usage shows the shared prefix served from the cache.

    python examples/agents/branching.py [--url HOST:PORT]"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.agents._server import args, server  # noqa: E402
from tools import protocol as P  # noqa: E402
from tools.client import SessionClient  # noqa: E402

BRIEF = ("We are naming a small coffee shop by the sea. It serves espresso, pastries and sandwiches, "
         "opens at dawn for fishermen and closes at sunset. The owners love old sailing ships.")


async def answer(client: SessionClient, seed: int) -> tuple[str, P.Usage]:
    text, usage = "", None
    async for ev in client.respond(temperature=0.9, seed=seed, max_output_tokens=24):
        if isinstance(ev, P.OutputTextDelta):
            text += ev.delta
        elif isinstance(ev, P.ResponseDone):
            usage = ev.response.usage
    assert usage is not None
    return text.strip(), usage


async def run(url: str) -> None:
    async with SessionClient(f"ws://{url}/v1/ws") as root:
        await root.update(instructions="You suggest names. Answer with one name and one short reason.")
        await root.send_message(BRIEF)
        await root.send_message("Suggest a name for the shop.")
        first, usage = await answer(root, seed=0)  # computes and caches the shared context
        print(f"root: {first!r} (prompt {usage.input_tokens} tokens)")
        forks = [await root.fork({"branch": str(i)}) for i in range(3)]
        results = await asyncio.gather(*(answer(f, seed=i + 1) for i, f in enumerate(forks)))
        for i, (text, u) in enumerate(results):
            print(f"branch {i}: {text!r} prompt={u.input_tokens} cached={u.input_token_details.cached_tokens}")
        best = max(range(len(results)), key=lambda i: len(results[i][0]))
        print(f"picked branch {best}: {results[best][0]!r}")
        total_cached = sum(u.input_token_details.cached_tokens for _, u in results)
        print(f"shared prefix reused: {total_cached} cached prompt tokens across {len(forks)} branches")
        for f in forks:
            await f.close()


def main() -> None:
    a = args()
    with server(a.url) as url:
        asyncio.run(run(url))


if __name__ == "__main__":
    main()
