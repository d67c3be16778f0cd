"""The engine: owns the model, KV cache, scheduler and runner; one `step()` is one forward pass.

    step():  schedule()  ->  runner.execute()  ->  update_from_output()

Requests are validated on entry, so a bad one is refused with a ValueError naming the problem and
never reaches the batch that other requests are running in.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from kvstore.cache_manager import KVCacheManager
from kvstore.hashing import BlockHasher, model_fingerprint, tenant_salt
from kvstore.mover import TierMover
from runtime.attention import TorchAttentionBackend, TritonAttentionBackend
from runtime.config import EngineConfig, ModelConfig, SchedulerConfig
from runtime.cuda_graphs import (
    INTERPRETED_MIXED_DECODES, INTERPRETED_MIXED_TOKENS, MIXED_DECODES, MIXED_TOKENS, StepGraphs,
)
from runtime.kv_cache import PagedKVCache
from runtime.kv_tiers import build_tiers
from runtime.metrics import Metrics
from runtime.model_runner import ModelRunner
from runtime.models.llama import LlamaForCausalLM
from runtime.models.loader import load_model
from runtime.models.ops import TritonOps
from runtime.outputs import OutputProcessor, RequestOutput
from runtime.request import Request, RequestStatus
from runtime.sampling_params import SamplingParams
from runtime.scheduler import Scheduler

log = logging.getLogger("ember.engine")

Prompt = str | Sequence[int]
_PREFILL_RATES: dict[tuple[str, str, str, int], float] = {}  # see LLMEngine._prefill_rate


@dataclass(frozen=True, slots=True)
class StepStats:
    """What the last `step()` ran and where its wall time went."""
    num_seqs: int
    num_prefill_tokens: int  # tokens of chunks longer than one (decodes excluded)
    schedule_s: float
    execute_s: float  # building inputs, the forward (launched ahead for graph decodes), sampling
    update_s: float  # applying tokens, tier bookkeeping, outputs


class LLMEngine:
    def __init__(self, cfg: EngineConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        loaded = load_model(cfg)
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.max_model_len = min(cfg.max_model_len or loaded.config.max_model_len, loaded.config.max_model_len)
        self.device = torch.device(cfg.device)
        dtype = next(loaded.model.parameters()).dtype
        bs = cfg.cache.block_size
        num_blocks = cfg.cache.num_blocks or PagedKVCache.blocks_for_budget(loaded.config, bs, dtype, cfg.cache.kv_cache_gib)
        self.kv_cache = PagedKVCache(loaded.config, num_blocks, bs, dtype, self.device)
        self.fingerprint = model_fingerprint(
            loaded.config.architecture, loaded.config.config_hash, loaded.weights_id, str(dtype).removeprefix("torch."), bs
        )
        self.runner = self._make_runner(loaded.model, loaded.config)
        self.runner.grammar_factory = self._grammar_masker
        self.mover, self.kv_secret = build_tiers(cfg, loaded.config, self.kv_cache, self.fingerprint, self._prefill_rate)
        self._built_mover = self.mover  # the tiers as built, for `reset`
        self.kv_manager = KVCacheManager(num_blocks, bs, cfg.cache.enable_prefix_caching, self.mover)
        if self.runner.graphs is not None:
            self.runner.reserve = self._reserve
        self.scheduler = Scheduler(cfg.scheduler, self.kv_manager, loaded.config.eos_token_ids, cfg.tiers.load_timeout_s)
        self.outputs = OutputProcessor(self.tokenizer)
        self._hashers: dict[str, BlockHasher] = {}
        self._ids = itertools.count()
        self.metrics: Metrics | None = None  # set by a server that exports them
        self.last_step = StepStats(0, 0, 0.0, 0.0, 0.0)

    def _make_runner(self, model: LlamaForCausalLM, mcfg: ModelConfig) -> ModelRunner:
        """The torch backend with eager ops (the CPU default); or the Triton backend (the CUDA
        default, or on CPU under TRITON_INTERPRET) with fused layer ops and, unless
        `enforce_eager`, decode and mixed steps through the graph runner (captured on CUDA)."""
        if self.cfg.backend_name == "torch":
            return ModelRunner(model, self.kv_cache, TorchAttentionBackend(), self.device)
        if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("attention_backend='triton' needs CUDA, or TRITON_INTERPRET=1 to run its "
                             "kernels in Triton's interpreter on the CPU (slow: tests only)")
        backend = TritonAttentionBackend(mcfg.num_kv_heads, self.device, self.kv_cache.data.dtype, mcfg.head_dim,
                                         mcfg.num_heads)
        model.ops = TritonOps()
        runner = ModelRunner(model, self.kv_cache, backend, self.device)
        if not self.cfg.enforce_eager:  # (off CUDA: the same path without capture, for tests)
            sched = self.cfg.scheduler
            max_blocks = -(-self.max_model_len // self.cfg.cache.block_size)
            cuda = self.device.type == "cuda"
            tokens = self.cfg.graph_tokens or (MIXED_TOKENS if cuda else INTERPRETED_MIXED_TOKENS)
            runner.graphs = StepGraphs(
                model, self.kv_cache, backend, sched.max_num_seqs, max_blocks, self.device,
                max_tokens=min(sched.max_num_batched_tokens, max(tokens)), mixed_tokens=tokens,
                mixed_decodes=MIXED_DECODES if cuda else INTERPRETED_MIXED_DECODES,
            )
            t0 = time.perf_counter()
            runner.graphs.capture()
            log.info("captured %d step graphs in %.1f s", runner.graphs.num_graphs, time.perf_counter() - t0)
        if self.device.type == "cuda":  # (the interpreter compiles nothing)
            t0 = time.perf_counter()
            n = runner.warmup(self.cfg.scheduler.max_num_seqs)
            log.info("compiled the eager path's kernels in %d forwards, %.1f s", n, time.perf_counter() - t0)
        return runner

    def _prefill_rate(self) -> float:
        """Prefill tokens/s for the tiers' cost model, from one forward at start; measured once a
        process per model, backend and device (engines rebuilt on the same weights, as policy
        comparisons and tests do, reuse it; the cost model refines it from the steps it sees)."""
        n = min(256, self.max_model_len - 1)
        key = (self.fingerprint, self.cfg.backend_name, str(self.device), n)
        if key not in _PREFILL_RATES:
            _PREFILL_RATES[key] = self.runner.profile_prefill(n)
        return _PREFILL_RATES[key]

    def _reserve(self, req: Request, num_tokens: int) -> list[int] | None:
        """Grow a running request's block table ahead of the scheduler (for a decode step
        launched ahead); None when the pool cannot."""
        if not self.kv_manager.allocate(req.request_id, num_tokens):
            return None
        return self.kv_manager.block_ids(req.request_id)

    # ---- requests ------------------------------------------------------------------------
    def hasher(self, tenant: str) -> BlockHasher:
        h = self._hashers.get(tenant)
        if h is None:
            salt = tenant_salt(self.kv_secret, tenant)
            h = self._hashers[tenant] = BlockHasher.create(self.fingerprint, salt, self.cfg.cache.block_size)
        return h

    def _grammar_masker(self) -> object:
        from runtime.grammar import GrammarMasker

        if self.tokenizer is None:
            raise ValueError("grammars need a model with a tokenizer")
        eos = self.model_config.eos_token_ids[0] if self.model_config.eos_token_ids else self.tokenizer.eos_token_id
        return GrammarMasker(self.tokenizer, self.model_config.vocab_size, eos)

    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids, not text")
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    def validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but the model's context is {self.max_model_len} "
                "(at least one position must be left to generate)"
            )
        vocab = self.model_config.vocab_size
        for i, t in enumerate(token_ids):
            if not 0 <= t < vocab:
                raise ValueError(f"token id {t} at position {i} is outside the vocabulary [0, {vocab})")
        total = min(len(token_ids) + params.max_tokens, self.max_model_len)
        need = self.kv_manager.num_blocks_for(total)
        if need > self.kv_manager.pool.num_blocks:
            raise ValueError(
                f"the request needs up to {total} tokens ({need} blocks) but the KV cache holds "
                f"{self.kv_manager.pool.num_blocks} blocks; lower max_tokens or enlarge the cache"
            )

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
        tenant: str = "default",
        session_id: str | None = None,
        priority: int = 1,
    ) -> Request:
        """Validate and queue a request; raises ValueError (and queues nothing) on bad input.

        With `session_id`, the blocks the request computes stay pinned for that session after it
        ends; `priority` is its class (0: returns from a tool call, 1: continuing, 2: first turn).
        """
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.grammar is not None:
            if self.runner.grammar is None:
                self.runner.grammar = self._grammar_masker()
            self.runner.grammar.matcher(params.grammar)  # invalid grammars are refused here
        token_ids = self.tokenize(prompt)
        self.validate_prompt(token_ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.scheduler.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        req = Request(
            request_id=rid,
            token_ids=token_ids,
            num_prompt_tokens=len(token_ids),
            params=params,
            hasher=self.hasher(tenant),
            max_total_tokens=min(len(token_ids) + params.max_tokens, self.max_model_len),
            session_id=session_id,
            priority=priority,
        )
        self.scheduler.add_request(req)
        self.outputs.add(req)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; returns its final output, or None if it had already finished."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        return self.outputs.process(req)[0]

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        ts = time.perf_counter()
        launched = self.runner.launched_ids
        if launched and not launched <= {r.request_id for r in self.scheduler.running}:
            # A request of the step in flight stopped on a token, was aborted or preempted: the
            # step is stale. (Kept, it would make this a decodes-only step that might schedule
            # nothing, and nothing else, forever.)
            self.runner.drop_launched()
        # A decode step launched ahead is this step: new work joins the step after it, rather
        # than the launched step being thrown away (a whole step of GPU time).
        sched = self.scheduler.schedule(decodes_only=self.runner.launched_ahead)
        t0 = time.perf_counter()
        result = self.runner.execute(sched, launch_ahead=not self.scheduler.more_to_schedule)
        t1 = time.perf_counter()
        if self.mover is not None and sched.num_tokens >= 64:
            self.mover.cost.observe_prefill(sched.num_tokens, t1 - t0)
        elif not sched.chunks and self.scheduler.loading and self.mover is not None:
            self.mover.wait(0.002)  # only fetches are pending: do not spin
        updates = self.scheduler.update_from_output(sched, result)
        if self.mover is not None:
            self.mover.end_step()
        outs = []
        for u in updates:
            out, stop = self.outputs.process(u.request)
            if stop is not None:
                self.scheduler.finish_request(u.request.request_id, RequestStatus.FINISHED_STOPPED, stop)
            outs.append(out)
        if self.metrics is not None and outs:
            self.metrics.on_outputs(outs, {u.request.request_id: u.request.arrival_time for u in updates})
        decodes = sum(1 for c in sched.chunks if c.num_tokens == 1)
        self.last_step = StepStats(len(sched.chunks), sched.num_tokens - decodes, t0 - ts, t1 - t0,
                                   time.perf_counter() - t1)
        return outs

    def check_integrity(self) -> None:
        self.kv_manager.check_integrity()

    def reset(self, scheduler: SchedulerConfig | None = None, host: bool = True, redis: bool = True) -> None:
        """Drop every request, pin and cached block (device and host; Redis keeps its keys) and
        start over under another scheduler config and set of tiers, keeping the weights, the KV
        buffers, the graphs and the host slab. For benchmarks that compare policies on one
        loaded model; `host`/`redis` off leave out a tier this engine was built with."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.runner.drop_launched()
        if self.mover is not None:
            self.mover.synchronize()
            self.mover.close(close_store=False)
        built, mover = self._built_mover, None
        if built is not None:
            if built.host is not None:
                built.host.clear()
            h, r = (built.host if host else None), (built.redis if redis else None)
            if h is not None or r is not None:
                mover = TierMover(built.device_blocks, h, r, built.cost, built.write_through and r is not None,
                                  built.max_pending_write_bytes, built.offload_on_compute and h is not None)
        self.mover = mover
        sched_cfg = scheduler or self.cfg.scheduler
        self.kv_manager = KVCacheManager(self.kv_cache.num_blocks, self.cfg.cache.block_size,
                                         self.cfg.cache.enable_prefix_caching, mover)
        self.scheduler = Scheduler(sched_cfg, self.kv_manager, self.model_config.eos_token_ids, self.cfg.tiers.load_timeout_s)
        self.outputs = OutputProcessor(self.tokenizer)

    def close(self) -> None:
        """Stop the tier threads (pending Redis writes are flushed first)."""
        if self.mover is not None:
            self.mover.flush()
            self.mover.close()
