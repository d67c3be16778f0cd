"""Scheduling for agents: tool-return turns first, bounded waits for every class, session pins
that survive pressure during their TTL and move down a tier after it, forks that hold their shared
prefix once, and multi-turn sessions that reuse their whole context."""
from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from runtime import LLM, SamplingParams
from runtime.session_engine import SessionEngine
from tests.reference import assert_matches, reference


def _rand(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(320) for _ in range(n)]


def _run(engine, req) -> object:  # type: ignore[no-untyped-def]
    while True:
        for o in engine.step():
            if o.request_id == req.request_id and o.finished:
                return o


def test_tool_return_turn_gets_its_first_token_before_fresh_requests(tiny_llama_dir: Path) -> None:
    engine = LLM(str(tiny_llama_dir), max_num_seqs=1).engine
    long = SamplingParams(max_tokens=30, ignore_eos=True)
    engine.add_request(_rand(20, 0), long, priority=2)
    engine.step()
    fresh = [engine.add_request(_rand(20, 10 + i), long, priority=2) for i in range(8)]
    tool_return = engine.add_request(_rand(20, 99), long, priority=0, session_id="agent")
    first_token: dict[str, int] = {}
    step = 0
    while engine.has_unfinished:
        step += 1
        for o in engine.step():
            first_token.setdefault(o.request_id, step)
    assert all(first_token[tool_return.request_id] < first_token[f.request_id] for f in fresh)
    engine.check_integrity()


@pytest.mark.parametrize("aging_s, bounded", [(0.05, True), (1e9, False)])
def test_aging_bounds_the_wait_of_a_low_class(tiny_llama_dir: Path, aging_s: float, bounded: bool) -> None:
    # (no host tier: first touches of its slab's pages would only add noise to the timing)
    engine = LLM(str(tiny_llama_dir), max_num_seqs=1, aging_s=aging_s, host_cache_gib=0).engine
    short = SamplingParams(max_tokens=2, ignore_eos=True)
    engine.add_request(_rand(10, 0), short, priority=0)
    low = engine.add_request(_rand(10, 1), short, priority=2)
    t0 = time.monotonic()
    seed = 2
    while time.monotonic() - t0 < 1.0 and low.num_output_tokens == 0:
        # A steady stream of tool-return turns, one more every step.
        engine.add_request(_rand(10, seed), short, priority=0)
        seed += 1
        engine.step()
    if bounded:
        waited = time.monotonic() - t0
        # (typically 0.1-0.15 s; the slack is for a loaded machine, still well inside the 1 s
        # that the unbounded case must starve it for)
        assert low.num_output_tokens > 0 and waited < 2 * aging_s + 0.5, f"waited {waited:.3f}s"
    else:
        assert low.num_output_tokens == 0  # without aging the stream starves it: the test can fail
    for rid in list(engine.scheduler.requests):
        engine.abort(rid)
    engine.check_integrity()


def test_pins_survive_pressure_during_ttl_and_move_to_host_after(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype="float32").eval()
    llm = LLM(str(tiny_llama_dir), num_blocks=20, pin_reclaim_fraction=0.0, pin_default_ttl_s=60.0)
    engine = llm.engine
    kv = engine.kv_manager
    turn1 = _rand(64, 5)
    _run(engine, engine.add_request(turn1, SamplingParams(max_tokens=1), session_id="A", priority=2))
    assert kv.pinned_blocks("A") == 4

    def pressure(seed: int) -> None:
        # Two fresh 9-block requests at once: with A's 4 pinned blocks they exceed 20 blocks.
        reqs = [engine.add_request(_rand(140, seed + i), SamplingParams(max_tokens=2), priority=2) for i in range(2)]
        while any(not r.status.finished for r in reqs):
            engine.step()

    pressure(100)
    assert kv.pinned_blocks("A") == 4
    turn2 = turn1 + _rand(17, 6)
    ref2 = reference(hf, turn2, 8)
    params = SamplingParams(max_tokens=8, temperature=0, output_logits=True)
    out = _run(engine, engine.add_request(turn2, params, session_id="A", priority=0))
    assert out.cache["gpu"] == 64  # type: ignore[attr-defined]
    assert_matches(out, ref2, "pinned across pressure")
    # The pin lapses: its blocks are copied to host, then pressure evicts them from the device.
    kv.set_pin_deadline("A", time.monotonic() - 1)
    engine.step()
    assert kv.pinned_blocks("A") == 0 and kv.num_pin_expiries == 1
    pressure(200)
    turn3 = turn2 + out.token_ids[:-1] + _rand(5, 7)  # type: ignore[attr-defined]
    ref3 = reference(hf, turn3, 8)
    out3 = _run(engine, engine.add_request(turn3, params, session_id="A", priority=0))
    # Tails are evicted before their ancestors, so the head may still be on the device; what
    # left it came back from host, and nothing was recomputed but the last partial block.
    cache = out3.cache  # type: ignore[attr-defined]
    assert cache["host"] >= 16 and cache["gpu"] + cache["host"] == (len(turn3) - 1) // 16 * 16
    assert_matches(out3, ref3, "demoted to host after the TTL")
    engine.check_integrity()


def test_fresh_requests_reclaim_at_most_a_fraction_of_pins(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), num_blocks=32, pin_reclaim_fraction=0.25, pin_default_ttl_s=60.0)
    engine = llm.engine
    kv = engine.kv_manager
    for i in range(4):
        _run(engine, engine.add_request(_rand(64, 300 + i), SamplingParams(max_tokens=1), session_id=f"s{i}", priority=2))
    assert kv.pinned_blocks() == 16
    burst = [engine.add_request(_rand(150, 400 + i), SamplingParams(max_tokens=2), priority=2) for i in range(6)]
    low_water = 16
    while engine.has_unfinished:
        engine.step()
        low_water = min(low_water, kv.pinned_blocks())
    assert all(r.status.finished for r in burst)
    assert low_water >= 12, f"a burst of fresh requests reclaimed {16 - low_water} of 16 pinned blocks"
    # A turn returning from a tool may take whatever it needs.
    big = engine.add_request(_rand(16 * 27 + 5, 500), SamplingParams(max_tokens=2), priority=0)
    _run(engine, big)
    assert engine.scheduler.stats.num_pin_reclaims >= 1
    engine.check_integrity()


def test_pins_backed_by_host_yield_to_any_request(tiny_llama_dir: Path) -> None:
    """With blocks offloaded to host as they are computed, dropping a pin costs only a restore,
    so the reclaim bound does not hold back fresh requests."""
    llm = LLM(str(tiny_llama_dir), num_blocks=32, pin_reclaim_fraction=0.25, pin_default_ttl_s=60.0,
              host_offload="compute")
    engine = llm.engine
    kv = engine.kv_manager
    for i in range(4):
        _run(engine, engine.add_request(_rand(64, 300 + i), SamplingParams(max_tokens=1), session_id=f"s{i}", priority=2))
    assert kv.pinned_blocks() == 16 and all(kv.pin_backed(f"s{i}") for i in range(4))
    burst = [engine.add_request(_rand(150, 400 + i), SamplingParams(max_tokens=2), priority=2) for i in range(6)]
    low_water = 16
    while engine.has_unfinished:
        engine.step()
        low_water = min(low_water, kv.pinned_blocks())
    assert all(r.status.finished for r in burst) and low_water < 12
    engine.check_integrity()


def test_forks_hold_the_shared_prefix_once(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype="float32").eval()
    engine = LLM(str(tiny_llama_dir), pin_default_ttl_s=60.0).engine
    kv = engine.kv_manager
    parent = _rand(64, 600)
    _run(engine, engine.add_request(parent, SamplingParams(max_tokens=1), session_id="parent"))
    n, k = 3, 2
    branches = []
    for i in range(n):
        kv.copy_pins("parent", f"fork{i}")
        branch = parent + _rand(16 * k + 1, 700 + i)  # diverges by k full blocks
        _run(engine, engine.add_request(branch, SamplingParams(max_tokens=1), session_id=f"fork{i}"))
        branches.append(branch)
    assert kv.num_in_use == 4 + n * k
    assert kv.pinned_blocks() == 4 + n * k
    params = SamplingParams(max_tokens=8, temperature=0, output_logits=True)
    for i, prompt in ((None, parent + [1, 2]), (0, branches[0] + [3])):
        ref = reference(hf, prompt, 8)
        out = _run(engine, engine.add_request(prompt, params, session_id="parent" if i is None else f"fork{i}"))
        assert_matches(out, ref, f"branch {i}")
    engine.check_integrity()


def test_twenty_turn_session_reuses_its_whole_context() -> None:
    llm = LLM("smollm2-135m", pin_default_ttl_s=60.0)
    se = SessionEngine(llm.engine)
    s = se.manager.create("tenant")
    s.instructions = "You are a terse assistant."
    params = SamplingParams(max_tokens=6, temperature=0)
    computed_before = 0
    for turn in range(20):
        se.append_item(s, {"type": "message", "role": "user", "content": f"Turn {turn}: name a color."})
        out = se.run_turn(s, params)
        if turn:
            assert out.num_cached_tokens == computed_before // 16 * 16, f"turn {turn}"
            assert out.cache["gpu"] == out.num_cached_tokens
        computed_before = len(out.prompt_token_ids) + len(out.token_ids) - 1
    assert len(s.items) == 20 and s.state.value == "idle"
    llm.engine.check_integrity()


def test_closing_a_session_gives_up_its_place_in_the_served_order() -> None:
    """A session awaiting a tool is live (or away, once past the tool's expected time) in the
    working-set admission; closing it takes it out at once: a live one's tokens no longer hold
    new sessions back, and an away one would no longer resume past the bound."""
    llm = LLM("smollm2-135m", pin_default_ttl_s=60.0)
    se = SessionEngine(llm.engine)
    admission = llm.engine.scheduler.admission
    assert admission is not None
    params = SamplingParams(max_tokens=4, temperature=0)
    sessions = []
    for i in range(3):
        s = se.manager.create("tenant")
        se.append_item(s, {"type": "message", "role": "user", "content": f"Agent {i}: look it up."})
        se.run_turn(s, params, tool_calls=[(f"call_{i}", "search")])
        sessions.append(s)
    stays, live, away = sessions
    assert admission.rank(stays.id) < admission.rank(live.id) < admission.rank(away.id) < float("inf")
    admission.expect(away.id, until=0.0, returns=True)  # its tool runs past the expected time
    now = time.monotonic()
    assert admission.admits(away.id, 10**9, now), "away: it would resume at its place"
    assert admission.rank(away.id) == float("inf")  # (out of the live order meanwhile)
    before = admission.live_tokens(now)
    se.close(live)
    se.close(away)
    now = time.monotonic()
    assert 0 < admission.live_tokens(now) < before and admission.rank(live.id) == float("inf")
    assert not admission.admits(away.id, 10**9, now), "closed: a turn of that id is a new session's"
    llm.engine.check_integrity()


@pytest.mark.parametrize("aging_s", [0.05, 1e6])
def test_aging_lifts_the_pin_reclaim_bound(tiny_llama_dir: Path, aging_s: float) -> None:
    """A fresh request that needs more than the bounded share of pinned blocks waits; once aging
    lifts it into the first class it may take pins like a tool return (with no aging it is still
    waiting when the check ends, pins lasting 60 s)."""
    llm = LLM(str(tiny_llama_dir), num_blocks=32, pin_reclaim_fraction=0.25, pin_default_ttl_s=60.0,
              aging_s=aging_s)
    engine = llm.engine
    for i in range(4):
        _run(engine, engine.add_request(_rand(64, 300 + i), SamplingParams(max_tokens=1), session_id=f"s{i}", priority=2))
    assert engine.kv_manager.pinned_blocks() == 16
    big = engine.add_request(_rand(16 * 27 + 5, 600), SamplingParams(max_tokens=2), priority=2)
    deadline = time.monotonic() + 2.0
    while not big.status.finished and time.monotonic() < deadline:
        engine.step()
        time.sleep(0.01)
    assert big.status.finished == (aging_s < 1)
    engine.check_integrity()


@pytest.mark.parametrize("host_gib", [0.01, 0.0])
def test_tool_return_displaces_a_first_turn_when_host_ram_backs_it(tiny_llama_dir: Path, host_gib: float) -> None:
    """With the pool full of a first turn, a turn returning from a tool takes its place at once
    when a host tier holds the displaced turn's blocks (it resumes with a restore, its tokens still
    transformers'); without a host tier it waits for the first turn to finish."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype="float32").eval()
    llm = LLM(str(tiny_llama_dir), num_blocks=24, block_size=16, host_cache_gib=host_gib)
    engine = llm.engine
    params = SamplingParams(max_tokens=20, temperature=0, output_logits=True)
    first_prompt, tool_prompt = _rand(300, 800), _rand(100, 801)
    first = engine.add_request(first_prompt, params, priority=2)
    while first.num_output_tokens < 3:
        engine.step()
    tool_return = engine.add_request(tool_prompt, params, priority=0)
    finished = {}
    steps = 0
    first_token_step = None
    while engine.has_unfinished:
        steps += 1
        for o in engine.step():
            if o.request_id == tool_return.request_id and first_token_step is None:
                first_token_step = steps
            if o.finished:
                finished[o.request_id] = o
    displaced = engine.scheduler.stats.num_displaced
    if host_gib:
        assert displaced == 1 and first_token_step == 1
        assert engine.mover is not None and engine.mover.stats.loaded_blocks["host"] > 0  # type: ignore[index]
    else:
        assert displaced == 0 and first_token_step is not None and first_token_step > 10
    assert_matches(finished[first.request_id], reference(hf, first_prompt, 20), "displaced first turn")
    assert_matches(finished[tool_return.request_id], reference(hf, tool_prompt, 20), "tool return")
    engine.check_integrity()


def test_working_set_admission_serves_sessions_in_start_order() -> None:
    """Sessions keep their place in the serving order; one that outgrows the tiers behind the
    earlier ones waits; the head always fits; quiet sessions leave the order."""
    import math

    from runtime.admission import WorkingSetAdmission

    ws = WorkingSetAdmission(capacity_tokens=1000)
    assert ws.admits("a", 400, now=0.0)
    ws.started("a", 400)
    ws.started("b", 400)
    assert ws.admits("c", 200, now=2.0) and not ws.admits("c", 201, now=2.0)
    ws.started("c", 200)
    # a grows: it stays first, so c (last) no longer fits, while b still does
    ws.finished("a", 500, until=10.0)
    assert ws.admits("a", 520, now=3.0) and ws.admits("b", 400, now=3.0) and not ws.admits("c", 200, now=3.0)
    assert ws.num_held == 2
    ws.finished("b", 450, until=math.inf)  # (expected back whenever: still live)
    ws.expect("a", until=3.0)  # a will not be back soon: it leaves the order
    assert ws.live_tokens(now=4.0) == 650 and ws.admits("c", 200, now=4.0)
    assert ws.admits("z", 5000, now=4.0) is False
    ws.started("d", 100)  # d joins the end; c, finishing with 700 tokens, no longer fits before it
    ws.finished("c", 700, until=20.0)
    assert not ws.admits("c", 700, now=5.0) and not ws.admits("d", 100, now=5.0), "no overtaking"
    ws.queued("c")  # c's next turn waits in the queue past its expected time: it stays live
    assert ws.live_tokens(now=30.0) == 1250
    ws.finished("c", 700, until=0.0)  # c is done: d moves up
    assert ws.admits("d", 100, now=30.0) and ws.live_tokens(now=30.0) == 550
    assert WorkingSetAdmission(10).admits("alone", 10**6, now=0.0), "the order's head always fits"


def test_working_set_admission_that_keeps_live_sessions_bounds_new_ones_only() -> None:
    """With keep_live, a live session pushed out of the fitting head by an earlier one's growth
    still starts its turns; a new session is held while the live total leaves no room, and
    starts once a live one goes quiet."""
    from runtime.admission import WorkingSetAdmission

    ws = WorkingSetAdmission(capacity_tokens=1000, keep_live=True)
    for sid in ("a", "b", "c"):
        assert ws.admits(sid, 300, now=0.0)
        ws.started(sid, 300)
    ws.finished("a", 600, until=10.0)  # a grows: c would no longer fit behind a and b
    assert ws.admits("c", 300, now=1.0) and ws.admits("b", 300, now=1.0)
    assert not ws.admits("d", 50, now=1.0) and ws.num_held == 1
    ws.finished("b", 300, until=2.0)
    assert ws.admits("d", 50, now=3.0), "b went quiet: 900 live tokens leave room for 50"


def test_a_session_away_past_its_tools_expected_time_resumes_at_its_place() -> None:
    """With keep_live, a session whose tool runs past its expected time goes quiet: its tokens
    leave the live total, so a new session may start in the room, and when the tool returns its
    turn starts at once at its old place instead of waiting as a new session would. A session
    that ended without tool calls, or any session without keep_live, starts anew."""
    from runtime.admission import WorkingSetAdmission

    for keep in (True, False):
        ws = WorkingSetAdmission(capacity_tokens=1000, keep_live=keep)
        for sid in ("a", "b"):
            assert ws.admits(sid, 400, now=0.0)
            ws.started(sid, 400)
        ws.finished("a", 500, until=1.0)
        ws.expect("a", until=2.0, returns=True)  # a awaits a tool, expected back by 2.0
        ws.finished("b", 450, until=1.0)
        ws.expect("b", until=0.5)  # b is done
        assert ws.live_tokens(now=3.0) == 0  # the tool runs late: a is away
        assert ws.admits("c", 900, now=3.0)
        ws.started("c", 900)
        assert ws.admits("a", 520, now=3.5) is keep, "a's tool returned: it resumes (with keep_live)"
        assert not ws.admits("b", 460, now=3.5), "b ended: its next turn is a new session's"
        if keep:
            ws.started("a", 520)
            assert ws.rank("a") < ws.rank("c") and list(ws._live) == ["a", "c"]
            assert ws.live_tokens(now=3.5) == 1420


def test_a_session_outgrowing_the_tiers_waits_for_one_to_go_quiet(tiny_llama_dir: Path) -> None:
    """With the device pool holding two sessions' contexts, a third session's
    first turn waits while the first two are live and other work runs; when one goes quiet it
    starts. With the admission off, it starts at once."""
    for fraction in (0.9, 0.0):
        # 96 blocks of 16: the sessions may hold int(0.9 * 96) * 16 = 1,376 tokens
        # (pins last 60 s, so a and b stay live however slow the machine)
        engine = LLM(str(tiny_llama_dir), num_blocks=96, block_size=16, host_cache_gib=0,
                     working_set_fraction=fraction, pin_default_ttl_s=60.0).engine
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        for sid, seed in (("a", 1), ("b", 2)):  # two sessions of 604 tokens each, pinned
            _run(engine, engine.add_request(_rand(600, seed), params, session_id=sid, priority=2))
        busy = engine.add_request(_rand(20, 3), SamplingParams(max_tokens=60, ignore_eos=True))  # keeps the engine running
        third = engine.add_request(_rand(200, 4), params, session_id="c", priority=2)  # 1,208 + 200 > 1,376
        for _ in range(5):
            engine.step()
        if fraction:
            assert third.num_output_tokens == 0 and engine.scheduler.admission is not None
            assert engine.scheduler.admission.num_held >= 5
            engine.scheduler.admission.expect("a", until=0.0)  # a's agent is done
            engine.step()
        else:
            assert engine.scheduler.admission is not None and engine.scheduler.admission.num_held == 0
        assert third.num_output_tokens >= 1
        engine.abort(busy.request_id)
        while engine.has_unfinished:
            engine.step()
        assert third.num_output_tokens == 4
        engine.check_integrity()


def test_turns_held_by_the_working_set_leave_decode_steps_launched_ahead(tiny_llama_dir: Path) -> None:
    """While every waiting turn is held by the working-set admission, each decode step launches
    the next one ahead (nothing can start until a session changes or a request arrives), and the
    outputs are those of eager mode. An arrival, or a live session going quiet, is taken up
    within two steps."""
    results = {}
    for eager in (False, True):
        # 48 blocks of 4 at fraction 0.5: the sessions may hold 96 tokens
        engine = LLM(str(tiny_llama_dir), attention_backend="triton", num_blocks=48, block_size=4,
                     host_cache_gib=0, working_set_fraction=0.5, pin_default_ttl_s=60.0, max_num_seqs=4,
                     enforce_eager=eager).engine
        runner, admission = engine.runner, engine.scheduler.admission
        assert admission is not None
        short = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        for sid, seed in (("a", 1), ("b", 2)):  # two sessions of 44 tokens each, pinned
            _run(engine, engine.add_request(_rand(40, seed), short, session_id=sid, priority=2))
        busy = engine.add_request(_rand(12, 3), SamplingParams(max_tokens=22, temperature=0, ignore_eos=True))
        held = engine.add_request(_rand(16, 4), short, session_id="c", priority=2)  # 88 + 16 > 96
        for _ in range(3):
            engine.step()
        hits = runner.spec_hits
        for _ in range(8):
            engine.step()
        assert held.num_computed_tokens == 0
        if not eager:
            assert runner.spec_hits - hits >= 7  # every step but at most one was launched ahead
        late = engine.add_request(_rand(8, 5), short)  # no session: never held
        engine.step()
        engine.step()
        assert late.num_computed_tokens > 0
        admission.expect("a", until=0.0)  # a's agent is done: c fits now
        engine.step()
        engine.step()
        assert held.num_computed_tokens > 0
        while engine.has_unfinished:
            engine.step()
        results[eager] = [r.output_token_ids for r in (busy, late, held)]
        engine.check_integrity()
    assert results[False] == results[True]


def test_turns_of_the_session_that_started_first_go_first(tiny_llama_dir: Path) -> None:
    """Two live sessions' turns of one class wait for the one sequence slot: the turn of the
    session that started first runs first, though it arrived second. With `session_order` off,
    arrival order decides."""
    for ordered in (True, False):
        engine = LLM(str(tiny_llama_dir), max_num_seqs=1, pin_default_ttl_s=60.0, session_order=ordered).engine
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        for sid, seed in (("early", 1), ("late", 2)):
            _run(engine, engine.add_request(_rand(40, seed), params, session_id=sid, priority=2))
        late = engine.add_request(_rand(50, 3), params, session_id="late", priority=1)
        early = engine.add_request(_rand(50, 4), params, session_id="early", priority=1)
        engine.step()
        first, second = (early, late) if ordered else (late, early)
        assert first.num_computed_tokens > 0 and second.num_computed_tokens == 0
        while engine.has_unfinished:
            engine.step()
        engine.check_integrity()


def test_a_decode_step_is_launched_after_a_mixed_step(tiny_llama_dir: Path) -> None:
    """A mixed step whose every chunk samples (a decode, and a tool's return whose prompt it
    completes) launches the decode step after it. The return's session started first, so the
    scheduler lists its row before the other session's while the launched step has it last:
    the launched step is used all the same, and the tokens are transformers' and eager mode's."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype="float32").eval()
    results = {}
    for eager in (False, True):
        engine = LLM(str(tiny_llama_dir), attention_backend="triton", num_blocks=64, block_size=4,
                     host_cache_gib=0, pin_default_ttl_s=60.0, max_num_seqs=4, enforce_eager=eager).engine
        runner = engine.runner
        short = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        task = _rand(20, 1)
        first = _run(engine, engine.add_request(task, short, session_id="a", priority=2))
        busy = engine.add_request(_rand(12, 2), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                                  session_id="b", priority=2)
        for _ in range(4):
            engine.step()
        back = engine.add_request(task + first.token_ids + _rand(6, 3), short, session_id="a", priority=0)
        admission = engine.scheduler.admission
        assert admission is not None and admission.rank("a") < admission.rank("b")
        if not eager:
            engine.step()  # the decode step launched before the return arrived
            assert runner.graphs is not None
            mixed, hits = runner.graphs.mixed_replays, runner.spec_hits
        engine.step()  # busy's decode and back's prompt, in one mixed step
        assert back.num_output_tokens == 1
        if not eager:
            assert runner.graphs.mixed_replays == mixed + 1 and runner.launched_ahead
            engine.step()
            assert runner.spec_hits == hits + 1 and back.num_output_tokens == 2
        while engine.has_unfinished:
            engine.step()
        results[eager] = [r.output_token_ids for r in (busy, back)]
        engine.check_integrity()
    assert results[False] == results[True]
    assert results[False] == [reference(hf, r.token_ids[: r.num_prompt_tokens], r.num_output_tokens).tokens
                              for r in (busy, back)]
