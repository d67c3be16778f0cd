"""The calculator's tools, shared by the examples that run them on the client and on the server."""
from __future__ import annotations

from tools.decorator import tool


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


@tool
def km_to_miles(km: float) -> float:
    """Convert kilometres to miles.

    Args:
        km: A distance in kilometres.
    """
    return round(km * 0.621371, 3)


TOOLS = [multiply, km_to_miles]
