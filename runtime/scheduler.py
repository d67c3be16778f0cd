"""The scheduler: decides, each step, which tokens of which requests run.

`schedule()` returns a plain `SchedulerOutput`; the runner executes it; `update_from_output()`
applies the sampled tokens. The scheduler never touches a tensor.

Policy (one step):
1. Running requests whose next chunk is a decode each get their one token, oldest first. When the
   pool cannot hold a chunk, the newest running request of the lowest class is preempted (its
   blocks freed, its tokens kept; it recomputes later, re-hitting whatever is still cached) until
   the chunk fits or the request itself was the one preempted (then nothing more is scheduled).
2. Waiting requests of the first class (a turn returning from a tool, one aged into that class, or
   a preempted request) are admitted next, so a tool's result is not queued behind other turns'
   prompts; then running requests' prefill chunks get the budget left, as in 1.
3. If nothing was preempted, the other waiting requests are admitted while budget, sequence slots
   and blocks last. Each admission follows a longest-prefix match that continues from the device
   through host RAM; a prompt longer than the budget is chunked across steps. The next request
   admitted is the one of the best priority class (a turn returning from a tool, then a
   continuing turn, then a new session's first turn), every `aging_s` of waiting lifting a
   request one class so no class starves; within a class, turns of sessions that started
   earlier go first (`session_order`), then arrival order.
   When blocks run short, session pins are reclaimed first, the pin expected back last first. A
   request below the first class may reclaim at most `pin_reclaim_fraction` of the pinned working
   set (admission control) unless the pin's blocks are all in host RAM already (taking it back
   then costs only a restore). A first-class request may also displace a running request of a
   worse class when a host tier holds the victim's blocks (it comes back with a restore).
   Sessions are served in the order they started while their contexts fit the device pool
   (runtime.admission): a turn of a session that does not fit behind the earlier ones waits,
   unless nothing is running.
4. A request whose prefix may continue in Redis is first sent to LOADING: its blocks are fetched
   off the engine thread while the batch keeps running, and it returns to the head of the queue
   when they arrive (or when `load_timeout_s` passes, to recompute instead).
5. A request admitted with blocks to copy in from host RAM or Redis runs from the first step
   after the copies land (on CUDA they overlap the steps in between).
"""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field

from kvstore.cache_manager import KVCacheManager
from runtime.admission import WorkingSetAdmission
from runtime.config import SchedulerConfig
from runtime.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledChunk:
    request: Request
    start: int  # first token of the chunk (== num_computed_tokens when scheduled)
    num_tokens: int
    block_ids: list[int]  # the request's block table, covering start + num_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so its last logits are sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # decodes (one token) first
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(slots=True)
class RunnerOutput:
    sampled: dict[str, int]  # request id -> token, for chunks that sample
    logprobs: dict[str, dict[int, float]] = field(default_factory=dict)
    logits: dict[str, object] = field(default_factory=dict)  # request id -> (vocab_size,) tensor


@dataclass(slots=True)
class RequestUpdate:
    request: Request
    new_token_ids: list[int]


@dataclass(slots=True)
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_pin_reclaims: int = 0
    num_displaced: int = 0  # running requests preempted to admit a turn of the first class
    num_computed_prompt_tokens: int = 0  # prompt tokens run through the model (not from cache)
    prompt_tokens_by_tier: dict[str, int] = field(
        default_factory=lambda: {"gpu": 0, "host": 0, "redis": 0, "recomputed": 0}
    )


class Scheduler:
    def __init__(
        self, cfg: SchedulerConfig, kv: KVCacheManager, eos_token_ids: tuple[int, ...], load_timeout_s: float = 2.0
    ) -> None:
        self.cfg = cfg
        self.kv = kv
        self.eos_token_ids = frozenset(eos_token_ids)
        self.load_timeout_s = load_timeout_s
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.loading: dict[str, Request] = {}
        # Pinned blocks when the current pressure episode began (for the reclaim bound).
        self._pinned_high_water = 0
        self._pressure = False
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self.more_to_schedule = False  # set by schedule()
        # Requests ever queued into `waiting` (arrivals, returns from loading, preemptions), and,
        # when the last full step's admission pass held back every waiting request for the
        # working set, that count and the admission's version then: until either changes (or a
        # session goes quiet, `_held_until`), the held requests cannot start, so decode steps
        # may keep being launched ahead.
        self._intake = 0
        self._held: tuple[int, int] | None = None
        self._held_until = 0.0
        capacity = int(cfg.working_set_fraction * kv.pool.num_blocks) * kv.block_size
        # The admission also keeps the order sessions started in, which `session_order` uses
        # with or without a bound.
        self.admission = (WorkingSetAdmission(capacity if capacity > 0 else sys.maxsize, cfg.working_set_keeps_live)
                          if capacity > 0 or cfg.session_order else None)

    # ---- intake --------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        assert req.request_id not in self.requests
        self.requests[req.request_id] = req
        self.waiting.append(req)
        self._intake += 1
        if self.admission is not None and req.session_id is not None:
            self.admission.queued(req.session_id)

    def finish_request(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """End a request from outside the token loop (abort, stop string). Unknown ids are ignored:
        the request may have finished in the same step."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.LOADING:
            del self.loading[request_id]
            if self.kv.mover is not None:
                self.kv.mover.cancel(request_id)
        else:
            self.waiting.remove(req)
        req.status = status
        req.stop_reason = stop_reason
        if req.session_id is not None:
            # The session keeps what this turn computed until its next turn or its pin lapses.
            until = time.monotonic() + self.cfg.pin_default_ttl_s
            self.kv.pin(req.session_id, request_id, until)
            if self.admission is not None:
                self.admission.finished(req.session_id, req.num_tokens, until)
        self.kv.forget(request_id)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step ------------------------------------------------------------------------
    def schedule(self, decodes_only: bool = False) -> SchedulerOutput:
        """The next step. With `decodes_only` (the runner has the running requests' next decode
        step in flight already), only the running requests' decodes; waiting requests and prompt
        chunks go in the step after."""
        now = time.monotonic()
        self.kv.expire_pins(now)
        if self.loading:
            self._collect_loads()
        if not self._pressure:
            self._pinned_high_water = self.kv.pinned_blocks()
        self._pressure = False
        out = SchedulerOutput()
        if not decodes_only:
            self._held = None  # set again by an admission pass that holds every waiting request
        budget = self._run_pass(out, self.cfg.max_num_batched_tokens, decodes=True)
        if budget is not None and not decodes_only:
            if not out.preempted:
                budget = self._admit(out, budget, now, first_class_only=True)
            budget = self._run_pass(out, budget, decodes=False)
            if budget is not None and not out.preempted:
                budget = self._admit(out, budget, now)
        out.chunks.sort(key=lambda c: c.num_tokens != 1)
        self.stats.num_steps += bool(out.chunks)
        # Whether the next step should be scheduled in full rather than launched ahead as this
        # step's decodes again: something waits that this step did not consider or ran out of
        # budget for, or a running request has prompt left (a chunk to come, or copies landing).
        # Requests the working-set admission holds do not count while nothing has changed.
        scheduled = {c.request.request_id for c in out.chunks if c.samples}
        waits = bool(self.waiting) and not self._all_held(now)
        self.more_to_schedule = (
            waits and (decodes_only or budget is None or budget <= 0 or bool(out.preempted))
        ) or any(r.request_id not in scheduled for r in self.running)
        return out

    def _all_held(self, now: float) -> bool:
        """Whether every waiting request is still held back by the working-set admission, as
        the last full admission pass found: nothing was queued and no session changed since."""
        return (self._held is not None and self.admission is not None and now < self._held_until
                and self._held == (self._intake, self.admission.version))

    def _run_pass(self, out: SchedulerOutput, budget: int | None, decodes: bool) -> int | None:
        """Give the running requests whose next chunk is a decode (or, with `decodes` off, a
        prefill chunk) that chunk, oldest first; returns the budget left, or None once a request
        had to preempt itself (nothing more is scheduled this step)."""
        if budget is None:
            return None
        scheduled = {c.request.request_id for c in out.chunks}
        for req in sorted(self.running, key=self._order):  # stable: oldest first within a session rank
            if budget <= 0:
                break
            remaining = req.num_tokens - req.num_computed_tokens
            if (remaining == 1) != decodes or req.request_id in scheduled or req.status != RequestStatus.RUNNING:
                continue
            if not self.kv.restore_ready(req.request_id):
                continue  # its prefix is still being copied in: it joins a later step
            n = min(remaining, budget)
            while not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
                self._pressure = True
                if self._reclaim_pin(req, unbounded=True):
                    continue
                # The victim: lowest class, then newest, among those not yet scheduled this step.
                victim = max((r for r in self.running if r.request_id not in scheduled),
                             key=lambda r: (r.priority, self._order(r), r.arrival_time))
                self.running.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    return None
            out.chunks.append(self._chunk(req, n))
            scheduled.add(req.request_id)
            budget -= n
        return budget

    def _collect_loads(self) -> None:
        assert self.kv.mover is not None
        back = [self.loading.pop(rid) for rid in self.kv.mover.poll() if rid in self.loading]
        now = time.monotonic()
        for req in [r for r in self.loading.values() if r.load_deadline <= now]:
            del self.loading[req.request_id]
            self.kv.mover.cancel(req.request_id, timed_out=True)
            back.append(req)
        # They arrived before anything still waiting: back to the head, in arrival order.
        for req in sorted(back, key=lambda r: r.arrival_time, reverse=True):
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)
            self._intake += 1

    def _reclaim_pin(self, req: Request, unbounded: bool) -> bool:
        """Release one session's pin to make room for `req`; False when none may be taken."""
        for owner in self.kv.pins_by_expected_wait():
            if owner == req.session_id:
                continue
            size = self.kv.pinned_blocks(owner)
            # A pin whose blocks are all in host RAM costs only a restore to take back: the
            # bound protects pins that would otherwise have to be recomputed.
            if not unbounded and not self.kv.pin_backed(owner):
                floor = (1 - self.cfg.pin_reclaim_fraction) * self._pinned_high_water
                if self.kv.pinned_blocks() - size < floor:
                    return False
            self.kv.unpin(owner)
            self.stats.num_pin_reclaims += 1
            return True
        return False

    def _class(self, req: Request, now: float) -> float:
        """The request's class after aging: every `aging_s` of waiting lifts it one class."""
        return req.priority - (now - req.arrival_time) // self.cfg.aging_s

    def _order(self, req: Request) -> float:
        """The place of the request's session in the order sessions started (math.inf for no
        live session), with `session_order`; 0 without."""
        if not self.cfg.session_order or self.admission is None:
            return 0.0
        return self.admission.rank(req.session_id)

    def _effective_class(self, req: Request, now: float) -> tuple[float, float, float]:
        if req.status == RequestStatus.PREEMPTED:
            return (-1e9, self._order(req), req.arrival_time)  # it already held the batch: back first
        return (self._class(req, now), self._order(req), req.arrival_time)

    def _displace(self, req: Request, out: SchedulerOutput, now: float) -> int | None:
        """Preempt one running request of a worse class than `req` to make room for it (its
        chunk this step, if it had one, is dropped); returns the budget that frees, or None when
        there is no such request. Only with a host tier: the victim's blocks have host copies
        (offloaded as computed, or demoted as they leave), so taking its place costs it a
        restore, not a recompute. A victim waits with its class intact and may not displace
        others in turn; aging bounds how often it can be displaced."""
        if self.kv.mover is None or self.kv.mover.host is None:
            return None
        mine = self._class(req, now)
        victims = [r for r in self.running if self._class(r, now) > mine]
        if not victims:
            return None
        victim = max(victims, key=lambda r: (self._class(r, now), self._order(r), r.arrival_time))
        freed = 0
        for c in [c for c in out.chunks if c.request is victim]:
            out.chunks.remove(c)
            freed += c.num_tokens
            if c.request.num_computed_tokens < c.request.num_prompt_tokens:
                self.stats.num_computed_prompt_tokens -= min(c.num_tokens, c.request.num_prompt_tokens - c.start)
        self.running.remove(victim)
        self._preempt(victim)
        victim.status = RequestStatus.WAITING  # not "back first" like a preempted request: it yielded
        self.stats.num_displaced += 1
        return freed

    def _admit(self, out: SchedulerOutput, budget: int, now: float, first_class_only: bool = False) -> int:
        """Admit waiting requests, best class first, while budget, slots and blocks last;
        returns the budget left. With `first_class_only`, only requests of the first class
        (returning from a tool, aged into it, or preempted) are admitted."""
        # One pass in class order: a request's class, rank and arrival do not change within a
        # step (a request displaced meanwhile waits for the next step).
        held = 0
        for req in sorted(self.waiting, key=lambda r: self._effective_class(r, now)):
            if budget <= 0 or len(self.running) >= self.cfg.max_num_seqs:
                return budget
            if first_class_only and self._effective_class(req, now)[0] > 0:
                return budget
            if (self.admission is not None and req.session_id is not None and self.running
                    and req.status == RequestStatus.WAITING
                    and not self.admission.admits(req.session_id, req.num_tokens, now)):
                held += 1
                continue  # its session does not fit behind the live ones: it waits
            match = self.kv.find_prefix(req.request_id, req.token_ids, req.hasher)
            if not req.fetch_planned:
                req.fetch_planned = True
                fetch = self.kv.plan_fetch(req.request_id, req.token_ids, match)
                if fetch:
                    assert self.kv.mover is not None
                    self.kv.mover.start_fetch(req.request_id, fetch)
                    self.waiting.remove(req)
                    req.status = RequestStatus.LOADING
                    req.load_deadline = time.monotonic() + self.load_timeout_s
                    self.loading[req.request_id] = req
                    continue
            while True:
                n = min(req.num_tokens - match.num_tokens, budget)
                if self.kv.allocate(req.request_id, match.num_tokens + n, match):
                    break
                self._pressure = True
                # Only a turn of the first class (returning from a tool, or aged into it) may
                # take pins without bound, or displace a running request of a worse class;
                # either may free blocks of this very match, so it is looked up again.
                urgent = self._class(req, now) <= 0
                if not self._reclaim_pin(req, unbounded=urgent):
                    freed = self._displace(req, out, now) if urgent else None
                    if freed is None:
                        return budget  # no room: nothing more is admitted this step
                    budget += freed
                match = self.kv.find_prefix(req.request_id, req.token_ids, req.hasher)
            self.waiting.remove(req)
            num_cached = match.num_tokens  # after allocate: a lower block that vanished is recomputed
            n = min(req.num_tokens - num_cached, budget)
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
                by_tier = match.tokens_by_tier()
                by_tier["recomputed"] = req.num_prompt_tokens - num_cached
                req.cache_by_tier = by_tier
                for k, v in by_tier.items():
                    self.stats.prompt_tokens_by_tier[k] += v
            req.status = RequestStatus.RUNNING
            req.admitted_time = req.admitted_time or now
            self.running.append(req)
            if self.admission is not None and req.session_id is not None:
                self.admission.started(req.session_id, req.num_tokens)
            if self.kv.restore_ready(req.request_id):
                out.chunks.append(self._chunk(req, n))
                budget -= n
        if held and held == len(self.waiting) and self.admission is not None:
            # every request considered and every one left held (the others started or load)
            self._held = (self._intake, self.admission.version)
            self._held_until = self.admission.quiet_at(now)
        return budget

    def _chunk(self, req: Request, n: int) -> ScheduledChunk:
        if req.num_computed_tokens < req.num_prompt_tokens:
            self.stats.num_computed_prompt_tokens += min(n, req.num_prompt_tokens - req.num_computed_tokens)
        return ScheduledChunk(req, req.num_computed_tokens, n, self.kv.block_ids(req.request_id))

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        self._intake += 1
        self.stats.num_preemptions += 1

    def update_from_output(self, out: SchedulerOutput, result: RunnerOutput) -> list[RequestUpdate]:
        updates: list[RequestUpdate] = []
        for chunk in out.chunks:
            req = chunk.request
            req.num_computed_tokens += chunk.num_tokens
            self.kv.cache_blocks(req.request_id, req.token_ids, req.num_computed_tokens, req.hasher)
            if not chunk.samples:
                continue
            tok = result.sampled[req.request_id]
            req.token_ids.append(tok)
            if req.request_id in result.logprobs:
                req.logprobs.append(result.logprobs[req.request_id])
            if req.request_id in result.logits:
                req.logits.append(result.logits[req.request_id])
            self._check_stop(req, tok)
            updates.append(RequestUpdate(req, [tok]))
        return updates

    def _check_stop(self, req: Request, tok: int) -> None:
        p = req.params
        if not p.ignore_eos and tok in self.eos_token_ids:
            self._finish(req, RequestStatus.FINISHED_STOPPED, None)
        elif tok in p.stop_token_ids:
            self._finish(req, RequestStatus.FINISHED_STOPPED, tok)
        elif req.num_output_tokens >= p.max_tokens or req.num_tokens >= req.max_total_tokens:
            self._finish(req, RequestStatus.FINISHED_LENGTH, None)

    def _finish(self, req: Request, status: RequestStatus, stop_reason: int | str | None) -> None:
        self.finish_request(req.request_id, status, stop_reason)
