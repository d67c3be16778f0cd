"""Tools the test server runs itself (`ember serve --tools tests.data.server_tools:TOOLS`)."""
from __future__ import annotations

import asyncio

from tools.decorator import tool


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


@tool
def explode(reason: str) -> str:
    """A tool that always fails.

    Args:
        reason: Why it fails.
    """
    raise RuntimeError(f"exploded: {reason}")


@tool
async def sleepy(seconds: int) -> str:
    """A tool slower than the server's timeout.

    Args:
        seconds: How long to sleep.
    """
    await asyncio.sleep(30)
    return "woke up"


TOOLS = [add, explode, sleepy]
