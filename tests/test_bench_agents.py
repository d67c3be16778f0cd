"""bench/agents.py's pin ablations on the embedded model: `no_pinning` takes away both uses of a
tool's learned duration (the pin, and when the admission expects the session back); `pins_off`
and `quiet_at_tool` take away one each, and the run's counters and trace show which."""
import argparse
import math
import statistics

import pytest

from bench.agents import jct_bound, run
from runtime.llm import LLM

AGENTS, TURNS = 3, 3


@pytest.fixture(scope="module")
def engine():
    return LLM("smollm2-135m", host_cache_gib=0.05, pin_default_ttl_s=5.0).engine


def workload() -> argparse.Namespace:
    # Tools of a fixed 0.4 s (sigma 0): the learned pin TTL, 1.25x the 90th percentile, outlasts
    # every call, so in ember a pin lapses, if at all, only after its session is back (during the
    # next turn, whose running request holds the blocks); in pins_off each lapses during its tool.
    # Agents start up to 0.6 s apart, so some steps run while other agents wait on their tools.
    return argparse.Namespace(agents=AGENTS, turns=TURNS, start_tokens=96, decode_tokens=4, tool_tokens=24,
                              tool_mu=math.log(0.4), tool_sigma=0.0, tool_scale=1.0, tool_cap_s=10.0,
                              stagger_s=0.6, seed=0)


def mean_live_tokens(result: dict) -> float:
    return statistics.mean(row[11] for row in result["trace"])


def test_pins_off_and_quiet_at_tool_each_take_away_one_use_of_the_tools_time(engine) -> None:
    ember = run(engine, "ember", workload())
    pins_off = run(engine, "pins_off", workload())
    quiet = run(engine, "quiet_at_tool", workload())
    for r in (ember, pins_off, quiet):
        assert len(r["jct_s"]) == AGENTS  # every agent finished every turn
    # The floor: above every agent's chain (0.8 s of tools each, and its replies), at most
    # what was measured.
    assert 0.8 < ember["jct_bound_s"] <= ember["jct_blind_bound_s"] + 1e-9
    assert ember["jct_blind_bound_s"] <= ember["jct_mean_s"]
    # ... and made of the chains and executing time the run reports
    # (the trace's steps without prompt tokens are the decode-only ones)
    decode_only = sum(row[4] for row in ember["trace"] if row[2] == 0)
    assert ember["executing_s"]["decode_only"] == pytest.approx(decode_only, abs=1e-3)
    assert ember["executing_s"]["mixed"] > 0 and ember["executing_s"]["decode_only"] > 0
    work = ember["executing_s"]["decode_only"] + ember["executing_s"]["mixed"]
    assert jct_bound(ember["chains_s"], work, workload().stagger_s) == pytest.approx(ember["jct_bound_s"], abs=1e-3)
    tool_calls = AGENTS * (TURNS - 1)
    # pins_off: each tool call's pin lapses at the next step (unless reclaimed first).
    assert pins_off["pin_expiries"] + pins_off["pin_reclaims"] >= tool_calls
    # quiet_at_tool: pins are ember's, held through the tools.
    assert quiet["pin_expiries"] < tool_calls
    # quiet_at_tool: a session awaiting its tool leaves the admission's live total at once, so
    # the steps taken while others wait on tools count fewer live tokens than ember's; pins_off
    # keeps ember's expectation.
    assert mean_live_tokens(quiet) < mean_live_tokens(ember)
    assert mean_live_tokens(pins_off) > mean_live_tokens(quiet)


def test_an_unknown_configuration_is_refused(engine) -> None:
    with pytest.raises(ValueError, match="unknown configuration 'no_such'"):
        run(engine, "no_such", workload())


def test_the_jct_floor_pairs_the_shortest_chains_with_the_first_shares_of_work() -> None:
    # 6 s of work for 3 agents: the k-th to finish waits for 2k s of it, or for its own chain
    assert jct_bound([1.0, 2.0, 3.0], 6.0, 0.0) == pytest.approx((2 + 4 + 6) / 3)
    assert jct_bound([5.0, 1.0, 9.0], 6.0, 0.0) == pytest.approx((2 + 5 + 9) / 3)  # sorted: 1, 5, 9
    assert jct_bound([1.0, 2.0, 3.0], 6.0, 1.0) == pytest.approx((1 + 3 + 5) / 3)  # less the latest start
    assert jct_bound([4.0, 4.0], 0.0, 0.0) == 4.0  # no work: the chains alone
    # blind to the chains: each place holds each chain with chance 1/3
    blind = (max(1, 2) + max(2, 2) + max(3, 2) + max(1, 4) + max(2, 4) + max(3, 4) + 6 * 3) / 9
    assert jct_bound([3.0, 1.0, 2.0], 6.0, 0.0, blind=True) == pytest.approx(blind)
    assert blind > jct_bound([3.0, 1.0, 2.0], 6.0, 0.0), "seeing the chains can only help"
