"""The session layer without an engine: state machine, event log, rendering, manager, stores."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from sessions.event_log import EventLog, ResumeWindowExpired
from sessions.manager import NotFound, QuotaExceeded, SessionLimits, SessionManager
from sessions.render import IncrementalRenderer
from sessions.session import Session, SessionState, TransitionError
from sessions.store import RedisSessionStore
from sessions.tool_stats import ToolStats
from tests.redis_util import RedisServer, redis_server  # noqa: F401 (fixture)


def test_state_machine() -> None:
    s = Session(id="s", tenant="t")
    s.transition(SessionState.GENERATING)
    s.transition(SessionState.AWAITING_TOOL)
    s.transition(SessionState.GENERATING)
    s.transition(SessionState.IDLE)
    with pytest.raises(TransitionError):
        s.transition(SessionState.AWAITING_TOOL)
    s.transition(SessionState.CLOSED)
    with pytest.raises(TransitionError):
        s.transition(SessionState.IDLE)


def test_event_log_seq_and_resume_window() -> None:
    log = EventLog(retain=3)
    for i in range(5):
        log.append({"type": "x", "i": i})
    assert log.last_seq == 5
    assert [e["seq"] for e in log.since(3)] == [4, 5]
    assert [e["seq"] for e in log.since(2)] == [3, 4, 5]
    with pytest.raises(ResumeWindowExpired):
        list(log.since(1))
    assert list(log.since(5)) == []


def test_incremental_rendering_equals_a_full_render(smol_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    r = IncrementalRenderer(tok)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
            {"role": "tool", "content": "4"}]
    tokens = r.first(msgs[:2])
    for m in msgs[2:]:
        tokens += r.delta(m)
    full = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tokens + r.generation_prompt == list(full)
    # A turn that stopped on <|im_end|> gets only the newline; a truncated one gets both.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert r.close_turn([5, im_end], frozenset({im_end})) == tok.encode("\n", add_special_tokens=False)
    assert r.close_turn([5, 6], frozenset({im_end})) == tok.encode("<|im_end|>\n", add_special_tokens=False)


def test_manager_quotas_isolation_fork_and_expiry() -> None:
    m = SessionManager(SessionLimits(max_sessions_per_tenant=2, max_tokens_per_tenant=150, idle_ttl_s=10))
    a = m.create("t1", {"k": "v"})
    a.append_tokens(list(range(60)))
    with pytest.raises(NotFound):
        m.get(a.id, "t2")  # another tenant's id looks exactly like a missing one
    child = m.fork(a)
    assert child.token_ids == a.token_ids and child.forked_from == a.id and child.log.last_seq == 0
    with pytest.raises(QuotaExceeded):
        m.create("t1")  # two sessions already
    m.create("t2")
    with pytest.raises(QuotaExceeded, match="tokens"):
        m.check_tokens("t1", 50)  # 120 held (the fork holds its copy of the history)
    child.last_active -= 11
    assert m.expire() == [child]
    with pytest.raises(NotFound):
        m.get(child.id, "t1")


def test_learned_tool_ttls_follow_durations_under_the_cap() -> None:
    stats = ToolStats(cap_s=10.0)
    for i in range(20):
        stats.observe("grep", 0.1 + 0.001 * i)
        stats.observe("build", 3.0 + 0.05 * i)
    fast, slow = stats.ttl("grep"), stats.ttl("build")
    assert 0.1 <= fast < slow < stats.cap_s
    for _ in range(20):
        stats.observe("forever", 600.0)
    assert stats.ttl("forever") == stats.cap_s
    assert stats.ttl("never-seen") == stats.default_s


def test_sessions_persist_and_recover_through_redis(redis_server: RedisServer) -> None:
    m = SessionManager(store=RedisSessionStore(redis_server.url))
    s = m.create("tenant", {"agent": "x"})
    s.items.append({"id": "item_1", "type": "message", "role": "user", "content": "hi"})
    s.append_tokens([1, 2, 3])
    events = [s.log.append({"type": "conversation.item.added"}) for _ in range(3)]
    m.persist(s, events)
    other = m.create("tenant")
    m.close(other)
    m.store.flush()  # type: ignore[attr-defined]
    fresh = SessionManager(store=RedisSessionStore(redis_server.url))
    (back,) = fresh.recover()
    assert back.id == s.id and back.token_ids == [1, 2, 3] and back.items == s.items
    assert back.log.last_seq == 3 and [e["seq"] for e in back.log.since(1)] == [2, 3]
    assert back.metadata == {"agent": "x"} and back.tenant == "tenant"
    assert back.state == SessionState.IDLE
