"""Agent workload: N concurrent agents x K turns with tool calls, on the in-process engine and
session layer, against ablations run in the same process.

    python bench/agents.py [--agents 6] [--turns 4] [--tool-tokens 250] [--num-blocks 192]

Each agent opens with a task, then each turn decodes --decode-tokens tokens, "calls" a tool whose
duration is drawn from a heavy-tailed lognormal (mean about --tool-mean-s, capped), appends a
tool output of about --tool-tokens tokens, and continues. Agents start within --stagger-s.
The device pool is capped (--num-blocks) so the working set outgrows it.

Configurations: ember (pins with learned TTLs, priority classes, host tier), no_pinning,
no_priority, and stateless (the whole conversation recomputed every turn: prefix caching off).
Reports job completion time (mean, p95), time to first token of tool-return turns (p50, p95),
the prefix-hit ratio and prompt tokens per tier. Writes bench/results/agents.json.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import LLM, SamplingParams  # noqa: E402
from runtime.session_engine import SessionEngine  # noqa: E402
from sessions.session import Session  # noqa: E402
from sessions.tool_stats import ToolStats  # noqa: E402

TOOLS = {"search": (-1.6, 0.8), "run_tests": (0.0, 1.0)}  # lognormal (mu, sigma) per tool


@dataclass
class Agent:
    idx: int
    session: Session
    start: float
    turns_left: int
    rng: random.Random
    request_id: str | None = None
    turn_start: float = 0.0
    tool_return: bool = False
    got_first: bool = False
    tool_due: float | None = None
    call: tuple[str, str] | None = None
    done_at: float | None = None
    ttfts: list[float] = field(default_factory=list)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1)]


def tool_output(rng: random.Random, tokens: int) -> str:
    words = ["file", "line", "error", "passed", "match", "def", "return", "value", "path", "test"]
    return " ".join(f"{rng.choice(words)}{rng.randrange(100)}" for _ in range(tokens // 2))


def run(config: str, args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = dict(num_blocks=args.num_blocks, host_cache_gib=2.0, pin_default_ttl_s=args.idle_pin_s)
    stats = ToolStats(cap_s=args.tool_cap_s)
    if config == "no_pinning":
        kw["pin_default_ttl_s"] = 0.0
        stats = ToolStats(cap_s=0.0, floor_s=0.0, default_s=0.0)
    if config == "stateless":
        kw["enable_prefix_caching"] = False
    llm = LLM("smollm2-135m", **kw)
    engine = llm.engine
    se = SessionEngine(engine, tool_stats=stats, use_priorities=config != "no_priority")
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    agents = []
    for i in range(args.agents):
        s = se.manager.create(f"tenant-{i % 2}")
        s.instructions = "You are a coding agent. Think briefly, then call tools."
        agents.append(Agent(i, s, t0 + rng.uniform(0, args.stagger_s), args.turns, random.Random(args.seed * 100 + i)))
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
    by_request: dict[str, Agent] = {}

    def start_turn(a: Agent, now: float) -> None:
        req = se.start_turn(a.session, params)
        a.request_id, a.turn_start, a.got_first = req.request_id, now, False
        by_request[req.request_id] = a

    started = set()
    while any(a.done_at is None for a in agents):
        now = time.monotonic()
        for a in agents:
            if a.idx not in started and now >= a.start:
                started.add(a.idx)
                se.append_item(a.session, {"type": "message", "role": "user",
                                           "content": f"Task {a.idx}: fix the failing test in module {a.idx}."})
                a.tool_return = False
                start_turn(a, now)
            elif a.tool_due is not None and now >= a.tool_due:
                a.tool_due = None
                assert a.call is not None
                se.append_item(a.session, {"type": "function_call_output", "call_id": a.call[0],
                                           "output": tool_output(a.rng, args.tool_tokens)})
                a.tool_return = True
                start_turn(a, time.monotonic())
        if not engine.has_unfinished:
            due = [a.tool_due for a in agents if a.tool_due is not None] + [a.start for a in agents if a.idx not in started]
            if due:
                time.sleep(max(0.0, min(due) - time.monotonic()))
            continue
        for out in engine.step():
            a = by_request.get(out.request_id)
            if a is None:
                continue
            now = time.monotonic()
            if not a.got_first and out.token_ids:
                a.got_first = True
                if a.tool_return:
                    a.ttfts.append(now - a.turn_start)
            if out.finished:
                a.turns_left -= 1
                if a.turns_left == 0:
                    se.finish_turn(a.session, out)
                    a.done_at = now
                    continue
                name = a.rng.choice(sorted(TOOLS))
                mu, sigma = TOOLS[name]
                duration = min(args.tool_cap_s, a.rng.lognormvariate(mu, sigma)) * args.tool_scale
                a.call = (f"call_{a.idx}_{a.turns_left}", name)
                se.finish_turn(a.session, out, [a.call])
                a.tool_due = now + duration
    jct = [a.done_at - a.start for a in agents if a.done_at is not None]
    ttft = [t for a in agents for t in a.ttfts]
    tiers = engine.scheduler.stats.prompt_tokens_by_tier
    prompt = sum(tiers.values())
    res = {
        "config": config, "jct_mean_s": statistics.mean(jct), "jct_p95_s": pct(jct, 0.95),
        "tool_ttft_p50_s": pct(ttft, 0.5), "tool_ttft_p95_s": pct(ttft, 0.95),
        "prefix_hit_ratio": (prompt - tiers["recomputed"]) / prompt if prompt else 0.0,
        "prompt_tokens_by_tier": dict(tiers), "preemptions": engine.scheduler.stats.num_preemptions,
        "pin_expiries": engine.kv_manager.num_pin_expiries, "steps": engine.scheduler.stats.num_steps,
        "moved_blocks": dict(engine.mover.stats.loaded_blocks or {}) if engine.mover else {},
    }
    llm.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=6)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--tool-tokens", type=int, default=250)
    ap.add_argument("--tool-scale", type=float, default=1.0, help="multiplies every tool duration")
    ap.add_argument("--tool-cap-s", type=float, default=10.0)
    ap.add_argument("--idle-pin-s", type=float, default=5.0)
    ap.add_argument("--stagger-s", type=float, default=1.0)
    ap.add_argument("--num-blocks", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default="ember,no_pinning,no_priority,stateless")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "agents.json"))
    args = ap.parse_args()
    rows = [run(c, args) for c in args.configs.split(",")]
    print(f"{'config':12} {'JCT mean':>9} {'JCT p95':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'hit':>5}  tokens by tier")
    for r in rows:
        print(f"{r['config']:12} {r['jct_mean_s']:9.2f} {r['jct_p95_s']:8.2f} {r['tool_ttft_p50_s']:9.3f} "
              f"{r['tool_ttft_p95_s']:9.3f} {r['prefix_hit_ratio']:5.2f}  {r['prompt_tokens_by_tier']}")
    meta = {"machine": platform.platform(), "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
