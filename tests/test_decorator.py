"""Tool schemas derived from type hints and docstrings; importing the SDK pulls in no torch."""
from __future__ import annotations

import asyncio
import enum
import subprocess
import sys
from typing import Literal, Optional

from tools.decorator import tool


class Unit(enum.Enum):
    C = "c"
    F = "f"


@tool
def get_weather(city: str, unit: Unit = Unit.C, days: int = 1, detailed: Optional[bool] = None,
                tags: list[str] = [], mode: Literal["fast", "slow"] = "fast") -> str:  # noqa: B006
    """Current weather for a city.

    Args:
        city: The city's name.
        unit: Temperature unit.
        days: How many days
            ahead to forecast.
        detailed: Whether to add wind and humidity.
        tags: Free-form labels.
        mode: How hard to try.

    Returns:
        A sentence.
    """
    return f"{city}: 20{unit.value}"


@tool(name="sum_numbers")
async def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


def test_schema_from_hints_and_docstring() -> None:
    assert get_weather.name == "get_weather"
    assert get_weather.description == "Current weather for a city."
    p = get_weather.parameters
    assert p["required"] == ["city"] and p["additionalProperties"] is False
    assert p["properties"]["city"] == {"type": "string", "description": "The city's name."}
    assert p["properties"]["unit"] == {"type": "string", "enum": ["c", "f"], "description": "Temperature unit.", "default": "c"}
    assert p["properties"]["days"] == {"type": "integer", "description": "How many days ahead to forecast.", "default": 1}
    assert p["properties"]["detailed"]["anyOf"] == [{"type": "boolean"}, {"type": "null"}]
    assert p["properties"]["tags"]["type"] == "array" and p["properties"]["tags"]["items"] == {"type": "string"}
    assert p["properties"]["mode"]["enum"] == ["fast", "slow"]
    assert get_weather.spec()["type"] == "function"


def test_sync_and_async_tools_run() -> None:
    assert add.name == "sum_numbers" and add.is_async and not get_weather.is_async
    assert asyncio.run(add.run({"a": 1, "b": 2.5})) == 3.5
    assert asyncio.run(get_weather.run({"city": "Oslo", "unit": Unit.F})) == "Oslo: 20f"


def test_importing_the_sdk_does_not_import_torch() -> None:
    code = ("import sys, tools.decorator, tools.protocol, tools.parsers, tools.formats, tools.client, tools.agent; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
