"""Agent workload: N concurrent agents x K turns with tool calls, through the session layer, with
the ablations run in the same process on the same loaded model.

    python bench/agents.py                     # CPU: SmolLM2, 6 agents x 4 turns
    python bench/agents.py --preset gpu [--agents 128]   # one GPU: Llama-3-8B shape, dummy bf16
    python bench/agents.py --preset gpu --runs 128:ember,no_priority 64:ember,stateless   # several scales

Each agent opens a session with a task of --start-tokens tokens (system prompt included), then
each turn decodes --decode-tokens tokens, "calls" a tool that takes lognormal(--tool-mu,
--tool-sigma) seconds (capped at --tool-cap-s), gets back about --tool-tokens tokens of output, and
continues; agents start within --stagger-s. The device KV pool is capped (--kv-cache-gib or
--num-blocks) so the working set outgrows it.

Configurations (one engine, `LLMEngine.reset` between them):
- ember: pins with TTLs learned per tool, priority classes, host tier (and Redis with --redis);
- no_pinning: pins lapse at once (the blocks still go down to the tiers);
- no_priority: every turn in one class, first come first served;
- no_host: no host tier (Redis, if any, catches what leaves the device);
- stateless: a server without sessions: no pins, no priorities, no tiers below the device; the
  whole conversation is re-sent each turn and only the device prefix cache can help;
- no_admission (not run by default): ember without working-set admission (every session is
  served at once, however far the working set outgrows the tiers).
no_pinning takes away both uses of a tool's learned duration: the pin, and the admission's
expectation of when the session is back (with it zeroed, a session awaiting its tool leaves the
live total at once). Two more configurations, not run by default, take away one each:
- pins_off: pins lapse at once; the admission still expects the session back at the tool's time;
- quiet_at_tool: pins hold as in ember; the admission counts the session quiet (away) at once.

A name may end in ":N" (say ember:1024) to run with a per-step token budget of N, and in scheduler
settings "@field=value" (say ember@working_set_fraction=0.5@session_order=0).
Reports per configuration: job completion time (mean, p95), time to first token of turns that
return from a tool (p50, p95; also in decode steps: over the median time of the run's steps that
carried no prefill; and in parts: noticed between steps, queued until admitted, computed until
the first token), prompt tokens by tier and the hit ratio, bytes moved per tier, preemptions,
and a floor under the mean job completion time for the run's own executing time (`jct_bound`),
with what it is made of (every agent's chain; the decode-only and mixed steps' executing time).
With --profile S:E, an ember run of the largest agent count goes first and stops at E seconds:
its steps from S to E are profiled on the GPU (bench/timeline.py: kernel time by kind, copies,
each kind of step's wall against its kernel time), and the summary lands in the JSON's meta.
Writes bench/results/agents[-<agents>...].json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Page-lock the host tier's slab in parallel threads (tens of GiB take a while on one).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "pinned_use_cuda_host_register:True,pinned_num_register_threads:8")

import torch  # noqa: E402

from bench.timeline import StepWindow  # noqa: E402
from runtime import LLM, SamplingParams  # noqa: E402
from runtime.engine import LLMEngine  # noqa: E402
from runtime.session_engine import SessionEngine  # noqa: E402
from sessions.session import Session  # noqa: E402
from sessions.tool_stats import ToolStats  # noqa: E402

CONFIGS = ("ember", "no_pinning", "no_priority", "no_host", "stateless")
EXTRA_CONFIGS = ("no_admission", "pins_off", "quiet_at_tool")  # named in --runs/--configs only
TOOL = "run_tool"
WORDS = ["file", "line", "error", "passed", "match", "def", "return", "value", "path", "test", "class", "import"]
GPU_PRESET = dict(model="bench/configs/llama-3-8b.json", load_format="dummy", tokenizer="smollm2-135m",
                  device="cuda", dtype="bfloat16", agents=128, turns=8, start_tokens=2048, tool_tokens=300,
                  decode_tokens=64, stagger_s=2.0, kv_cache_gib=24.0, host_cache_gib=64.0, max_num_seqs=256,
                  redis=True)


@dataclass
class Agent:
    idx: int
    session: Session
    start: float
    turns_left: int
    rng: random.Random
    turn_start: float = 0.0
    tool_return: bool = False
    got_first: bool = False
    tool_due: float | None = None
    call: tuple[str, str] | None = None
    done_at: float | None = None
    ttfts: list[float] = field(default_factory=list)
    # per tool-return turn: (noticed, queued, computed) seconds, summing to its TTFT (see `run`)
    ttft_parts: list[tuple[float, float, float]] = field(default_factory=list)
    request: Any = None  # the turn in flight


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1)]


def jct_bound(chains: list[float], work_s: float, stagger_s: float, blind: bool = False) -> float:
    """A floor under the mean job completion time of any order of serving these agents, given
    the card's executing time `work_s` split evenly among them: the k-th agent to finish needs
    its own chain, and k shares of the work done (less the latest start, `stagger_s`). The
    shortest chains go first (pairing sorted with sorted minimises the sum of maxima). With
    `blind`, the same for an order that cannot see the chains (the tools' durations): the
    expectation over orders drawn at random, where each place holds each chain with chance 1/n.
    A policy that executes less (bigger batches) has a lower floor: it bounds the order, not
    the work."""
    n = len(chains)
    shares = [k * work_s / n - stagger_s for k in range(1, n + 1)]
    if blind:
        return sum(max(t, c) for c in shares for t in chains) / (n * n)
    return sum(max(t, c) for t, c in zip(sorted(chains), shares)) / n


def text_of(tok: Any, rng: random.Random, tokens: int) -> str:
    """Random words cut to `tokens` tokens of this tokenizer."""
    words = " ".join(f"{rng.choice(WORDS)}{rng.randrange(1000)}" for _ in range(tokens))
    return str(tok.decode(tok(words)["input_ids"][:tokens]))


def start_redis(maxmemory_gib: float) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server on a free port and a Unix socket; returns it and the socket's URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server not found: run `make setup`, or pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock = f"/tmp/ember-bench-redis-{port}.sock"
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--unixsocket", sock, "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--maxmemory", f"{int(maxmemory_gib * 2**30)}",
         "--maxmemory-policy", "allkeys-lru", "--io-threads", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"unix://{sock}"  # beside the engine: a Unix socket beats loopback TCP


def step_kind(prefill_tokens: int) -> str:
    return "decode" if prefill_tokens == 0 else "mixed<=512" if prefill_tokens <= 512 else \
        "mixed<=1024" if prefill_tokens <= 1024 else "mixed>1024"


def run(engine: LLMEngine, name: str, args: argparse.Namespace,
        profile: tuple[float, float] | None = None) -> dict[str, Any]:
    """One configuration; `name` may end in ":N" to run it with a per-step budget of N tokens and
    in "@field=value" scheduler settings. With `profile` (start, end seconds into the run), the
    GPU's time in that window is profiled (bench/timeline.py), and the run ends there and returns
    only that summary."""
    head, *settings = name.split("@")
    config, _, budget = head.partition(":")
    sched = engine.cfg.scheduler
    if budget:
        sched = replace(sched, max_num_batched_tokens=int(budget))
    for kv in settings:
        key, _, value = kv.partition("=")
        kind = type(getattr(sched, key))  # an unknown field raises here
        sched = replace(sched, **{key: bool(int(value)) if kind is bool else kind(value)})
    stats = ToolStats(cap_s=args.tool_cap_s)
    if config not in CONFIGS + EXTRA_CONFIGS:
        raise ValueError(f"unknown configuration {config!r}")
    if config == "no_admission":
        sched = replace(sched, working_set_fraction=0.0)
    if config in ("no_pinning", "stateless"):
        sched = replace(sched, pin_default_ttl_s=0.0)
        stats = ToolStats(cap_s=0.0, floor_s=0.0, default_s=0.0)
    engine.reset(sched, host=config not in ("no_host", "stateless"), redis=config != "stateless")
    if engine.mover is not None and engine.mover.redis is not None:
        engine.mover.redis.flushdb()
    se = SessionEngine(engine, tool_stats=stats, use_priorities=config not in ("no_priority", "stateless"))
    tok = engine.tokenizer
    rng = random.Random(args.seed)
    agents = []
    for i in range(args.agents):
        s = se.manager.create(f"tenant-{i % 2}")
        s.instructions = "You are a coding agent. Think briefly, then call tools."
        agents.append(Agent(i, s, rng.uniform(0, args.stagger_s), args.turns, random.Random(args.seed * 1000 + i)))
    # The texts are made before the clock starts (producing them is the clients' work).
    tasks = {a.idx: f"Task {a.idx}: " + text_of(tok, a.rng, args.start_tokens - 40) for a in agents}
    outputs = {a.idx: [text_of(tok, a.rng, args.tool_tokens) for _ in range(args.turns)] for a in agents}
    # Each agent's tool durations, in call order (drawn from its own generator after its texts,
    # as they would be call by call).
    tools = {a.idx: [min(args.tool_cap_s, a.rng.lognormvariate(args.tool_mu, args.tool_sigma)) * args.tool_scale
                     for _ in range(args.turns - 1)] for a in agents}
    hits0, misses0 = engine.runner.spec_hits, engine.runner.spec_misses
    t0 = time.monotonic()
    for a in agents:
        a.start += t0  # (an offset until now)
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
    by_request: dict[str, Agent] = {}
    # Per step: start, seqs, prefill tokens, schedule/execute/update s, then after the step the
    # requests running / waiting / loading, free device blocks, pinned sessions and the tokens of
    # the sessions the admission counts live (0 without admission).
    trace: list[tuple[float, ...]] = []

    def start_turn(a: Agent, since: float) -> None:
        req = se.start_turn(a.session, params)
        a.turn_start, a.got_first, a.request = since, False, req
        by_request[req.request_id] = a

    started: set[int] = set()
    num_steps = 0
    window = StepWindow() if profile else None
    kinds: list[str] = []  # each profiled step's kind (step_kind)
    while any(a.done_at is None for a in agents):
        now = time.monotonic()
        if window is not None and profile is not None:
            if not window.active and now - t0 >= profile[0]:
                window.start()
            elif window.active and now - t0 >= profile[1]:
                return {"config": name, "window_s": list(profile), "profile": window.stop(kinds)}
        for a in agents:
            if a.idx not in started and now >= a.start:
                started.add(a.idx)
                se.append_item(a.session, {"type": "message", "role": "user", "content": tasks[a.idx]})
                a.tool_return = False
                start_turn(a, a.start)
            elif a.tool_due is not None and now >= a.tool_due:
                due, a.tool_due = a.tool_due, None
                assert a.call is not None
                se.append_item(a.session, {"type": "function_call_output", "call_id": a.call[0],
                                           "output": outputs[a.idx][a.turns_left]})
                a.tool_return = True
                start_turn(a, due)  # TTFT counts from the tool's return, not from noticing it
        if not engine.has_unfinished:
            due_at = [a.tool_due for a in agents if a.tool_due is not None] + [a.start for a in agents if a.idx not in started]
            if due_at:
                time.sleep(max(0.0, min(due_at) - time.monotonic()))
            continue
        ts = time.monotonic()
        with window.step() if window is not None else contextlib.nullcontext():
            outs = engine.step()
        num_steps += 1
        st = engine.last_step
        if window is not None and window.active:
            kinds.append(step_kind(st.num_prefill_tokens))
        sc = engine.scheduler
        trace.append((ts - t0, st.num_seqs, st.num_prefill_tokens, st.schedule_s, st.execute_s, st.update_s,
                      len(sc.running), len(sc.waiting), len(sc.loading), engine.kv_manager.pool.num_free,
                      engine.kv_manager.num_pins, sc.admission.live_tokens(time.monotonic()) if sc.admission else 0))
        for out in outs:
            owner = by_request.get(out.request_id)
            if owner is None:
                continue
            a = owner
            now = time.monotonic()
            if not a.got_first and out.token_ids:
                a.got_first = True
                if a.tool_return:
                    a.ttfts.append(now - a.turn_start)
                    # TTFT = noticed (the tool's return to the turn's submission, between steps)
                    # + queued (to its admission: held, waiting for room or for its restore)
                    # + computed (its prompt's chunks, and the step launched ahead it followed)
                    req = a.request
                    a.ttft_parts.append((req.arrival_time - a.turn_start, req.admitted_time - req.arrival_time,
                                         now - req.admitted_time))
            if out.finished:
                a.turns_left -= 1
                if a.turns_left == 0:
                    se.finish_turn(a.session, out)
                    a.done_at = now
                    continue
                duration = tools[a.idx][args.turns - 1 - a.turns_left]
                a.call = (f"call_{a.idx}_{a.turns_left}", TOOL)
                se.finish_turn(a.session, out, [a.call])
                if config == "pins_off":  # the pin lapses at the next step, the expectation stays
                    engine.kv_manager.set_pin_deadline(a.session.id, now)
                elif config == "quiet_at_tool" and engine.scheduler.admission is not None:
                    engine.scheduler.admission.expect(a.session.id, now, returns=True)
                a.tool_due = now + duration
    wall = time.monotonic() - t0
    jct = [a.done_at - a.start for a in agents if a.done_at is not None]
    ttft = [t for a in agents for t in a.ttfts]
    step_s = [sum(x[3:6]) for x in trace if x[2] == 0 and x[1] > 0]  # steps that ran decodes only
    decode_step = statistics.median(step_s) if step_s else float("nan")
    buckets: dict[str, list[float]] = {}
    for x in trace:
        b = "0" if x[2] == 0 else "1-512" if x[2] <= 512 else "513-1024" if x[2] <= 1024 else ">1024"
        buckets.setdefault(b, []).append(sum(x[3:6]))
    tiers = engine.scheduler.stats.prompt_tokens_by_tier
    prompt = sum(tiers.values())
    # the card's executing time, by kind of step (decode-only steps carry no prompt tokens)
    executing_by = {"decode_only": sum(x[4] for x in trace if x[2] == 0),
                    "mixed": sum(x[4] for x in trace if x[2] > 0)}
    executing = sum(executing_by.values())
    # An agent's own chain: its tool calls, and its replies decoded at the run's decode-only step.
    chains = [sum(tools[a.idx]) + args.turns * args.decode_tokens * decode_step for a in agents]
    mv = engine.mover
    res: dict[str, Any] = {
        "config": name, "jct_mean_s": statistics.mean(jct), "jct_p95_s": pct(jct, 0.95),
        "tool_ttft_p50_s": pct(ttft, 0.5), "tool_ttft_p95_s": pct(ttft, 0.95),
        "decode_step_s": decode_step,
        "jct_bound_s": jct_bound(chains, executing, args.stagger_s),
        "jct_blind_bound_s": jct_bound(chains, executing, args.stagger_s, blind=True),
        # what the floors are made of, to recompute them for another amount of work
        "chains_s": sorted(round(c, 4) for c in chains),
        "executing_s": executing_by,
        "tool_ttft_p50_steps": pct(ttft, 0.5) / decode_step, "tool_ttft_p95_steps": pct(ttft, 0.95) / decode_step,
        "tool_ttft_parts_p50_s": {k: pct([p[i] for a in agents for p in a.ttft_parts], 0.5)
                                  for i, k in enumerate(("noticed", "queued", "computed"))},
        "tool_ttft_parts_p95_s": {k: pct([p[i] for a in agents for p in a.ttft_parts], 0.95)
                                  for i, k in enumerate(("noticed", "queued", "computed"))},
        "prefix_hit_ratio": (prompt - tiers["recomputed"]) / prompt if prompt else 0.0,
        "prompt_tokens_by_tier": dict(tiers),
        "hit_ratio_by_tier": {k: v / prompt for k, v in tiers.items()} if prompt else {},
        "preemptions": engine.scheduler.stats.num_preemptions,
        "pin_reclaims": engine.scheduler.stats.num_pin_reclaims,
        "turn_steps_held": engine.scheduler.admission.num_held if engine.scheduler.admission else 0,
        "pin_expiries": engine.kv_manager.num_pin_expiries, "steps": num_steps, "wall_s": wall,
        "time_in_steps_s": {"schedule": sum(x[3] for x in trace), "execute": executing,
                            "update": sum(x[5] for x in trace)},
        "steps_by_prefill_tokens": {b: {"steps": len(v), "median_ms": statistics.median(v) * 1e3}
                                    for b, v in sorted(buckets.items())},
        "mean_seqs_per_step": statistics.mean(x[1] for x in trace) if trace else 0.0,
        # steps launched before the previous step's tokens reached the host: used / dropped
        "steps_launched_ahead": [engine.runner.spec_hits - hits0, engine.runner.spec_misses - misses0],
        "jct_s": sorted(round(x, 3) for x in jct),
        "trace": [[round(v, 5) for v in x] for x in trace],
    }
    if mv is not None:
        mv.synchronize()
        mv.flush()
        ms = mv.stats
        res["bytes_loaded"] = dict(ms.loaded_bytes or {})
        res["load_GBps"] = {k: (ms.loaded_bytes or {})[k] / s / 1e9 for k, s in (ms.load_seconds or {}).items() if s > 0}
        res["bytes_to_host"] = (ms.offloaded_to_host + ms.demoted_to_host) * mv.block_bytes
        res["bytes_to_redis"] = ms.written_to_redis * mv.block_bytes
        res["redis_writes_dropped"] = ms.writes_dropped
        res["redis_fetches"] = ms.fetches
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory or smollm2-135m (dummy models)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--agents", type=int, default=6)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--start-tokens", type=int, default=120)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--tool-tokens", type=int, default=250)
    ap.add_argument("--tool-mu", type=float, default=-0.5)
    ap.add_argument("--tool-sigma", type=float, default=1.0)
    ap.add_argument("--tool-scale", type=float, default=1.0, help="multiplies every tool duration")
    ap.add_argument("--tool-cap-s", type=float, default=10.0)
    ap.add_argument("--idle-pin-s", type=float, default=5.0)
    ap.add_argument("--stagger-s", type=float, default=1.0)
    ap.add_argument("--num-blocks", type=int, default=160)
    ap.add_argument("--kv-cache-gib", type=float, default=None, help="device KV pool (instead of --num-blocks)")
    ap.add_argument("--host-cache-gib", type=float, default=2.0)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--redis", action="store_true", help="start a redis-server beside the engine (write-back tier)")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--redis-maxmemory-gib", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-agents", type=int, default=32, help="agents of the untimed warm-up run (0: none)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--runs", nargs="*", default=None, metavar="N:CONFIGS",
                    help="agent counts with their configurations, one loaded model for all (say "
                         "128:ember,no_priority 64:ember,stateless); instead of --agents/--configs")
    ap.add_argument("--graph-tokens", default="", help="prefill rows of the mixed-step graphs (default: the engine's)")
    ap.add_argument("--profile", default="", metavar="S:E",
                    help="first profile seconds S to E of an ember run of the largest agent count (bench/timeline.py)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.preset == "gpu":  # the reference workload, unless a flag given on the command line says otherwise
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in sys.argv[1:] if a.startswith("--")}
        for k, v in GPU_PRESET.items():
            if k not in given:
                setattr(args, k, v)
    proc, url = None, args.redis_url
    if args.redis and url is None:
        proc, url = start_redis(args.redis_maxmemory_gib)
    kw: dict[str, Any] = dict(
        load_format=args.load_format, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
        host_cache_gib=args.host_cache_gib, pin_default_ttl_s=args.idle_pin_s, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens, redis_url=url,
        write_policy="write_back" if url else None, graph_tokens=tuple(int(t) for t in args.graph_tokens.split(",") if t))
    if args.kv_cache_gib is not None:
        kw["kv_cache_gib"] = args.kv_cache_gib
    else:
        kw["num_blocks"] = args.num_blocks
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    runs = [(int(n), c.split(",")) for n, _, c in (r.partition(":") for r in args.runs)] if args.runs else \
        [(args.agents, args.configs.split(","))]
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        "agents.json" if args.preset == "cpu" else f"agents-{'-'.join(str(n) for n, _ in runs)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        t0 = time.monotonic()
        llm = LLM(args.model, **kw)
        meta = {"machine": platform.platform(), "card": card, "torch": torch.__version__,
                "setup_s": time.monotonic() - t0, "args": vars(args)}
        engine = llm.engine
        print(f"engine ready in {meta['setup_s']:.1f} s: {engine.kv_cache.num_blocks} device blocks of "
              f"{engine.kv_cache.bytes_per_block / 2**20:.2f} MiB", flush=True)
        # Kernels compile (and cuBLAS picks algorithms) for each new shape on first use: a short
        # run of the same workload first keeps that out of the first configuration's figures.
        warm = argparse.Namespace(**{**vars(args), "agents": min(max(n for n, _ in runs), args.warmup_agents), "turns": 2})
        if args.warmup_agents:
            t1 = time.monotonic()
            run(engine, "ember", warm)
            print(f"warm-up ({warm.agents} agents x 2 turns) took {time.monotonic() - t1:.1f} s", flush=True)
        if args.profile:
            lo, _, hi = args.profile.partition(":")
            most = argparse.Namespace(**{**vars(args), "agents": max(n for n, _ in runs)})
            meta["profile"] = run(engine, "ember", most, profile=(float(lo), float(hi)))
            print(json.dumps(meta["profile"], indent=1), flush=True)
        for agents, configs in runs:
            step_args = argparse.Namespace(**{**vars(args), "agents": agents})
            for c in configs:
                rows.append({"agents": agents, **run(engine, c, step_args)})
                r = rows[-1]
                print(f"{agents:4d} {c:12} JCT {r['jct_mean_s']:.2f}/{r['jct_p95_s']:.2f} s  TTFT {r['tool_ttft_p50_s']:.3f}/"
                      f"{r['tool_ttft_p95_s']:.3f} s ({r['tool_ttft_p50_steps']:.1f}/{r['tool_ttft_p95_steps']:.1f} steps of "
                      f"{r['decode_step_s'] * 1e3:.1f} ms)  hit {r['prefix_hit_ratio']:.2f}  wall {r['wall_s']:.1f} s  "
                      f"JCT floor {r['jct_bound_s']:.2f} s (blind {r['jct_blind_bound_s']:.2f} s)", flush=True)
                parts = "  ".join(f"{k} {r['tool_ttft_parts_p50_s'][k] * 1e3:.1f}/{r['tool_ttft_parts_p95_s'][k] * 1e3:.0f} ms"
                                  for k in r["tool_ttft_parts_p50_s"])
                print(f"{'':17} TTFT parts p50/p95: {parts}", flush=True)
                # Written after every configuration: a run cut short keeps what it measured.
                out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        llm.close()
    finally:
        if proc is not None:
            proc.kill()
    print(f"\n{'agents':>6} {'config':12} {'JCT mean':>9} {'JCT p95':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'steps50':>7} {'hit':>5}  tokens by tier")
    for r in rows:
        print(f"{r['agents']:6d} {r['config']:12} {r['jct_mean_s']:9.2f} {r['jct_p95_s']:8.2f} {r['tool_ttft_p50_s']:9.3f} "
              f"{r['tool_ttft_p95_s']:9.3f} {r['tool_ttft_p50_steps']:7.1f} {r['prefix_hit_ratio']:5.2f}  {r['prompt_tokens_by_tier']}")
    print("wrote", out)


if __name__ == "__main__":
    main()
