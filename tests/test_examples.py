"""The example agents run for real, as their one command, against the embedded model."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server_util import ServerProcess, module_server

ROOT = Path(__file__).resolve().parents[1]


server = module_server("examples")


def run(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "agents" / name), *args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_calculator_tools_run_on_the_client(server: ServerProcess) -> None:
    out = run("calculator.py", "--url", server.url)
    call = re.search(r"tool call: (multiply|km_to_miles)\((\{.*\})\)", out)
    assert call, out
    assert re.search(rf"tool result: {call.group(1)} -> [0-9.]+\n", out), out
    assert "answer: " in out


def test_server_side_tools_are_watched_by_the_client() -> None:
    out = run("server_tools.py")  # starts its own server with --tools
    assert "server runs: km_to_miles" in out
    m = re.search(r"server result: km_to_miles -> ([0-9.]+) \(error=False", out)
    assert m, out
    assert "answer: " in out


def test_branching_reuses_the_shared_prefix(server: ServerProcess) -> None:
    out = run("branching.py", "--url", server.url)
    cached = [int(c) for c in re.findall(r"branch \d: .* cached=(\d+)", out)]
    assert len(cached) == 3 and all(c > 0 for c in cached), out
    assert re.search(r"picked branch \d", out)
    assert int(re.search(r"shared prefix reused: (\d+)", out).group(1)) == sum(cached)  # type: ignore[union-attr]


def test_openai_agents_sdk_through_chat_completions(server: ServerProcess) -> None:
    out = run("openai_agents.py", "--url", server.url)
    assert re.search(r"tool call: km_to_miles\(km=[0-9.]+\)", out), out
    assert "answer: " in out
