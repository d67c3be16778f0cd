"""The Llama family (Llama, Mistral, Qwen2) over a paged KV cache.

Tokens of all sequences in a step are laid out flat: hidden states are (num_tokens, hidden_size)
and attention structure comes from the backend's metadata. The arithmetic follows Hugging Face's
implementation op for op (RMSNorm in float32, RoPE via cat(freqs, freqs), SiLU-gated MLP) so that
float32 logits agree with it to rounding; q/k/v and gate/up are fused into single matmuls.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from runtime.attention import AttentionBackend
from runtime.config import ModelConfig
from runtime.kv_cache import PagedKVCache
from runtime.models.ops import LayerOps, TorchOps


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, precomputed once (elementwise the same values a
    per-step computation gives)."""

    cos: torch.Tensor  # (max_positions, head_dim) float32
    sin: torch.Tensor

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        hf = cfg.hf_config
        rope = (getattr(hf, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type == "default":
            base = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float, device="cpu") / cfg.head_dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
        # computed on the host in float32 whatever device or default dtype the model is built under
        freqs = torch.arange(max_positions, dtype=torch.float, device="cpu")[:, None] * inv_freq.float().cpu()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_positions, head_dim)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].to(q.dtype)[:, None, :]  # (num_tokens, 1, head_dim)
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return q * cos + self._rotate_half(q) * sin, k * cos + self._rotate_half(k) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(self, x, positions, ops: LayerOps, rope: RotaryEmbedding, backend: AttentionBackend,
                kv: PagedKVCache, meta: Any):
        t = x.shape[0]
        q, k, v = ops.linear(x, self.qkv_proj).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # (num_tokens, num_heads, head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)  # (num_tokens, num_kv_heads, head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        o = backend.forward(self.layer, q, k, v, kv, meta, rope, positions)  # (num_tokens, num_heads, head_dim)
        return ops.linear(o.reshape(t, self.q_size), self.o_proj)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, ops: LayerOps) -> torch.Tensor:
        return ops.linear(ops.gated(x, self.gate_up_proj), self.down_proj)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, residual, positions, ops: LayerOps, rope, backend, kv, meta):
        # The residual stream is carried separately so a fused kernel can add and normalise in
        # one pass; the sums are the same as Hugging Face's `h = residual + sublayer(norm(h))`.
        x, residual = ops.add_rmsnorm(h, residual, self.input_layernorm)
        h = self.self_attn(x, positions, ops, rope, backend, kv, meta)
        x, residual = ops.add_rmsnorm(h, residual, self.post_attention_layernorm)
        return self.mlp(x, ops), residual


# Hugging Face parameter name suffix -> (our fused parameter, shard index)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg, max_positions)
        self.ops: LayerOps = TorchOps()  # the runner swaps in fused kernels on CUDA
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # (num_tokens,)
        positions: torch.Tensor,  # (num_tokens,)
        backend: AttentionBackend,
        kv: PagedKVCache,
        meta: Any,
    ) -> torch.Tensor:  # (num_tokens, hidden_size), after the final norm
        h = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            h, residual = layer(h, residual, positions, self.ops, self.rope, backend, kv, meta)
        return self.ops.add_rmsnorm(h, residual, self.norm)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (n, vocab_size)
        return self.ops.logits(hidden, self.lm_head_weight)

    # ---- weights -------------------------------------------------------------------------
    def _shard_bounds(self, fused: str, shard: int) -> tuple[int, int]:
        c = self.cfg
        if "qkv_proj" in fused:
            q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)][shard]
        return [(0, c.intermediate_size), (c.intermediate_size, 2 * c.intermediate_size)][shard]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in; raises ValueError naming any tensor that is missing,
        unexpected or of the wrong shape."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        filled: dict[str, set[int]] = {}
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            if "rotary_emb" in name:
                continue
            target, shard = name, None
            for suffix, (fused, idx) in _FUSED.items():
                if f".{suffix}." in f".{name}":
                    target, shard = name.replace(suffix, fused), idx
                    break
            if target not in params:
                raise ValueError(f"unexpected weight {hf_name!r} for a {self.cfg.architecture} model")
            param = params[target]
            with torch.no_grad():
                if shard is None:
                    if tuple(param.shape) != tuple(tensor.shape):
                        raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                    param.copy_(tensor)
                    loaded.add(target)
                else:
                    lo, hi = self._shard_bounds(target, shard)
                    if tuple(param[lo:hi].shape) != tuple(tensor.shape):
                        raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(param[lo:hi].shape)}")
                    param[lo:hi].copy_(tensor)
                    filled.setdefault(target, set()).add(shard)
        for target, shards in filled.items():
            want = 3 if "qkv_proj" in target else 2
            if len(shards) == want:
                loaded.add(target)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    def init_dummy(self, seed: int, std: float) -> None:
        """Random weights (benchmarks on a real architecture without its checkpoint)."""
        device = self.embed_tokens.weight.device
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32, device=device).mul_(std).to(p.dtype))
