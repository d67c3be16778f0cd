"""Ember's configuration: a frozen dataclass tree, validated once at start-up.

Environment variables are read here and nowhere else (`EngineConfig.from_env`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import xxhash

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs, derived from a Hugging Face config."""

    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_model_len: int
    tie_word_embeddings: bool
    qkv_bias: bool
    mlp_bias: bool
    eos_token_ids: tuple[int, ...]
    config_hash: str
    # The Hugging Face config object, kept for RoPE initialisation (its scaling variants).
    hf_config: Any = field(compare=False, repr=False)

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        archs = getattr(hf, "architectures", None) or []
        model_type = getattr(hf, "model_type", "")
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and model_type in SUPPORTED_ARCHITECTURES.values():
            arch = model_type
        if arch is None:
            raise ValueError(
                f"unsupported model architecture {archs or model_type!r}; "
                f"Ember serves {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {hf.hidden_act!r}; Ember supports 'silu'")
        rope_type = (getattr(hf, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(f"RoPE type {rope_type!r} depends on the sequence length; not supported")
        if arch == "mistral" and getattr(hf, "sliding_window", None):
            if hf.sliding_window < hf.max_position_embeddings:
                raise ValueError("sliding-window attention is not supported")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        cfg_dict = {k: v for k, v in hf.to_dict().items() if k not in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype")}
        config_hash = xxhash.xxh3_128_hexdigest(json.dumps(cfg_dict, sort_keys=True, default=str).encode())
        return cls(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_model_len=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            eos_token_ids=eos_ids,
            config_hash=config_hash,
            hf_config=hf,
        )

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        lm_head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + lm_head

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Either an explicit block count or a memory budget for the KV cache.
    num_blocks: int | None = None
    kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be positive, got {self.kv_cache_gib}")


@dataclass(frozen=True)
class TierConfig:
    """The KV tiers below the device pool."""

    host_cache_gib: float = 2.0  # host RAM for demoted blocks; 0 turns the host tier off
    redis_url: str | None = None  # redis://, rediss://, or redis+cluster://host:port
    # "write_through" (a block goes to Redis as soon as it is full) or "write_back" (on eviction
    # from the tier above). Defaults to write_through when Redis is configured.
    write_policy: str | None = None
    redis_ttl_s: int | None = None
    redis_timeout_s: float = 5.0
    redis_retry_interval_s: float = 1.0
    load_timeout_s: float = 2.0  # a request waits this long for Redis, then recomputes
    # Bandwidths in bytes/s for the cost model; measured at start-up when None.
    host_bandwidth: float | None = None
    redis_bandwidth: float | None = None
    max_pending_write_mib: int = 256
    # When a block reaches host RAM: "compute" (as soon as it is computed: the copy overlaps
    # compute, and evicting it later costs nothing), "evict" (when the device pool reuses it), or
    # "auto" (compute on CUDA, evict on CPU, where host RAM and the device pool are the same RAM).
    host_offload: str = "auto"
    redis_connections: int = 2  # parallel sockets for block reads (and as many for writes)

    def validate(self) -> None:
        if self.host_offload not in ("auto", "compute", "evict"):
            raise ValueError(f"host_offload must be 'auto', 'compute' or 'evict', got {self.host_offload!r}")
        if self.redis_connections < 1:
            raise ValueError(f"redis_connections must be positive, got {self.redis_connections}")
        if self.host_cache_gib < 0:
            raise ValueError(f"host_cache_gib must be >= 0, got {self.host_cache_gib}")
        if self.write_policy not in (None, "write_through", "write_back"):
            raise ValueError(f"write_policy must be 'write_through' or 'write_back', got {self.write_policy!r}")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "redis+cluster://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss://, unix:// or redis+cluster://, got {self.redis_url!r}")

    @property
    def write_through(self) -> bool:
        return self.redis_url is not None and (self.write_policy or "write_through") == "write_through"


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    # Per-step token budget: decodes take one each, prefills are chunked to fit the rest. On an H200
    # at 128 agents (bench/agents.py, 0148c57, one process) 1,024 lost 0.6-1.3 s of mean job time
    # to 2,048 (first turns take two steps) for a 20-30% lower tool-return TTFT p95.
    max_num_batched_tokens: int = 2048
    # Priority classes (0: a turn returning from a tool, 1: a continuing turn or plain request,
    # 2: a new session's first turn); every `aging_s` of waiting lifts a request one class.
    aging_s: float = 2.0
    # How long a session keeps its blocks pinned after a turn unless told otherwise.
    pin_default_ttl_s: float = 5.0
    # Under memory pressure, requests that do not return from a tool may reclaim at most this
    # fraction of the pinned working set (pins lapse by their TTL regardless).
    pin_reclaim_fraction: float = 0.25
    # Sessions are served in the order they started while their contexts fit in this multiple
    # of the device pool; later sessions' turns wait until they fit (runtime.admission). 0 turns
    # it off. On an H200 at 128 agents (bench/agents.py): at c8d9de6, 0.75, 1.0 and 1.5 gave a
    # mean job time of 33.5, 34.2 and 36.8 s and serving every session at once 38.3 s; at
    # be509a9, 0.75 with live sessions kept gave 29.7 s and a tool-return TTFT p50 of 39 ms,
    # against 30.2-31.1 s and 49 ms at 1.0 without (the mixed steps carry fewer decodes); at
    # de74ed5 (sessions away mid-tool resume at their place, so the live total overshoots the
    # bound for a while) 0.65 gave 27.7 s against 29.2-30.4 s at 0.75 (one run); at 1bebcf3,
    # 0.55 gave 26.9 and 26.5 s (TTFT p50 37-40 ms) against 27.4 and 27.6 s (47-53 ms) at 0.65,
    # and 16.1 against 16.7 s at 64 agents, each with a p95 1-4 s later (the last cohort starts later);
    # at 1ec1bc7, 0.45 and 0.5 gave 28.0 and 27.3 s against 26.5 s at 0.55 (one process); at
    # 0148c57, 256 agents: 49.8 s at 0.55 against 50.1 s at 0.65 (one process).
    working_set_fraction: float = 0.55
    # The bound holds back new sessions only: a live session's turns always start, whatever
    # the earlier sessions grew to (runtime.admission's keep_live).
    working_set_keeps_live: bool = True
    # Within a class, turns of sessions that started earlier go first and are preempted last (the
    # order runtime.admission keeps), so sessions finish in the order they came instead of all
    # sharing the card and all finishing late; off: turns go in their own arrival order.
    session_order: bool = True

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.aging_s <= 0:
            raise ValueError(f"aging_s must be positive, got {self.aging_s}")
        if not 0 <= self.pin_reclaim_fraction <= 1:
            raise ValueError(f"pin_reclaim_fraction must be in [0, 1], got {self.pin_reclaim_fraction}")
        if not 0 <= self.working_set_fraction <= 4:
            raise ValueError(f"working_set_fraction must be in [0, 4], got {self.working_set_fraction}")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m"
    load_format: str = "auto"  # "auto" | "dummy"
    # A directory holding tokenizer files, or the embedded alias, used instead of the model's own
    # (a dummy-weight model from a bare config has none); its vocabulary must fit the model's.
    tokenizer: str | None = None
    dtype: str = "auto"  # "auto" (float32 on CPU, bfloat16 on CUDA) | "float32" | "bfloat16" | "float16"
    device: str = "cpu"
    # "auto": Triton kernels on CUDA, torch on CPU; "triton" on CPU needs TRITON_INTERPRET=1
    attention_backend: str = "auto"
    enforce_eager: bool = False  # True: no CUDA graphs (every step eager)
    # Prefill rows of the captured mixed-step graphs (a step pads to the smallest that holds it);
    # empty: runtime.cuda_graphs.MIXED_TOKENS. Finer sizes pad less and take longer to capture.
    graph_tokens: tuple[int, ...] = ()
    seed: int = 0
    max_model_len: int | None = None  # defaults to the model's
    cache_dir: Path = Path.home() / ".cache" / "ember"
    # Secret behind the tenants' block-hash salts; a fresh one per process unless given.
    kv_secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    tiers: TierConfig = TierConfig()

    def validate(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton', got {self.attention_backend!r}")
        if any(t < 1 for t in self.graph_tokens):
            raise ValueError(f"graph_tokens must be positive, got {self.graph_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        self.cache.validate()
        self.scheduler.validate()
        self.tiers.validate()

    @classmethod
    def from_env(cls, **overrides: Any) -> EngineConfig:
        """The defaults, then EMBER_* environment variables, then explicit overrides."""
        env: dict[str, Any] = {}
        if "EMBER_CACHE_DIR" in os.environ:
            env["cache_dir"] = Path(os.environ["EMBER_CACHE_DIR"])
        if "EMBER_KV_SECRET" in os.environ:
            env["kv_secret"] = os.environ["EMBER_KV_SECRET"].encode()
        if "EMBER_REDIS_URL" in os.environ:
            env["tiers"] = TierConfig(redis_url=os.environ["EMBER_REDIS_URL"])
        cfg = replace(cls(), **{**env, **overrides})
        cfg.validate()
        return cfg

    @property
    def backend_name(self) -> str:
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if self.device.startswith("cuda") else "torch"

    @property
    def torch_dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.device.startswith("cuda") else "float32"
