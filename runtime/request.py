"""A request's state as the scheduler and engine see it. Holds no tensors."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from kvstore.hashing import BlockHasher
from runtime.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    LOADING = "loading"  # waiting for its prefix blocks to arrive from a lower tier
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    token_ids: list[int]  # prompt then generated tokens: the sequence whose KV is cached
    num_prompt_tokens: int
    params: SamplingParams
    hasher: BlockHasher  # the tenant's hash chain
    max_total_tokens: int  # the context limit for this request
    arrival_time: float = field(default_factory=time.monotonic)
    session_id: str | None = None  # the session whose turn this is: its blocks are pinned after
    priority: int = 1  # 0: returns from a tool call, 1: continuing turn / plain, 2: first turn
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache, set at first schedule
    num_preemptions: int = 0
    fetch_planned: bool = False  # the lower tiers were consulted (once per request)
    load_deadline: float = 0.0  # monotonic time after which a pending fetch is abandoned
    admitted_time: float = 0.0  # monotonic time it first started running (0: not yet)
    cache_by_tier: dict[str, int] | None = None  # prompt tokens per source, set at first schedule
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    generator: Any = None  # torch.Generator for seeded sampling, made by the runner
    matcher: Any = None  # the grammar's matcher (llguidance), made by the runner
    logprobs: list[dict[int, float]] = field(default_factory=list)
    logits: list[Any] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens
