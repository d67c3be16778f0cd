"""An agent driven by the OpenAI Agents SDK (`openai-agents`) through Ember's OpenAI-compatible
chat completions endpoint, with a tool the SDK runs.

    python examples/agents/openai_agents.py [--url HOST:PORT]"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.agents._server import args, server  # noqa: E402


def main() -> None:
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # no tracing export: this runs offline against a local server

    @function_tool
    def km_to_miles(km: float) -> float:
        """Convert kilometres to miles.

        Args:
            km: A distance in kilometres.
        """
        print(f"tool call: km_to_miles(km={km})")
        return round(km * 0.621371, 3)

    a = args()
    with server(a.url) as url:
        client = AsyncOpenAI(base_url=f"http://{url}/v1", api_key="unused")
        agent = Agent(
            name="converter",
            instructions="Convert distances with the tool, then state the result in one sentence.",
            tools=[km_to_miles],
            model=OpenAIChatCompletionsModel(model="smollm2-135m", openai_client=client),
            # A 135M model needs the call asked for; the SDK resets the choice after the call.
            model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
        )
        result = Runner.run_sync(agent, "How many miles is 42 kilometres?", max_turns=4)
        print(f"answer: {str(result.final_output).strip()}")


if __name__ == "__main__":
    main()
