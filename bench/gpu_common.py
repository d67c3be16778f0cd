"""Measurements shared by the GPU benchmarks: the card's ceilings, measured in the same process,
and transformers' model over Ember's own weight tensors (no second copy of an 8B model)."""
from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = ROOT / "bench" / "configs" / "llama-3-8b.json"
RESULTS = ROOT / "bench" / "results"


def cuda_time_ms(fn: Callable[[], Any], iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_time_ms(fn: Callable[[], Any], reps: int = 10) -> float:
    """GPU milliseconds of one fn() with launch costs removed: `reps` calls captured in a CUDA
    graph, the replay timed (median) and divided by reps."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return cuda_time_ms(graph.replay, iters=10) / reps


def copy_bandwidth(gib: float = 4.0) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read and written."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * n * 2 / (ms / 1e3)


def matmul_peak(n: int = 8192) -> float:
    """bf16 matrix-multiply FLOP/s on random data."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = cuda_time_ms(lambda: a @ b, iters=10)
    return 2 * n**3 / (ms / 1e3)


def card() -> dict[str, Any]:
    p = torch.cuda.get_device_properties(0)
    info = {"name": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=5).stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


def hf_over_ember_weights(model: Any, config_path: Path, device: str = "cuda") -> Any:
    """transformers' LlamaForCausalLM whose parameters are views of Ember's fused tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = AutoConfig.from_pretrained(config_path)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    c = model.cfg
    q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size

    def put(module: torch.nn.Module, name: str, t: torch.Tensor) -> None:
        module._parameters[name] = torch.nn.Parameter(t, requires_grad=False)

    put(hf.model.embed_tokens, "weight", model.embed_tokens.weight)
    put(hf.model.norm, "weight", model.norm.weight)
    put(hf.lm_head, "weight", model.lm_head_weight)
    for ours, theirs in zip(model.layers, hf.model.layers):
        w = ours.self_attn.qkv_proj.weight
        put(theirs.self_attn.q_proj, "weight", w[:q])
        put(theirs.self_attn.k_proj, "weight", w[q : q + kv])
        put(theirs.self_attn.v_proj, "weight", w[q + kv :])
        put(theirs.self_attn.o_proj, "weight", ours.self_attn.o_proj.weight)
        gu = ours.mlp.gate_up_proj.weight
        put(theirs.mlp.gate_proj, "weight", gu[:inter])
        put(theirs.mlp.up_proj, "weight", gu[inter:])
        put(theirs.mlp.down_proj, "weight", ours.mlp.down_proj.weight)
        put(theirs.input_layernorm, "weight", ours.input_layernorm.weight)
        put(theirs.post_attention_layernorm, "weight", ours.post_attention_layernorm.weight)
    hf.model.rotary_emb = LlamaRotaryEmbedding(cfg, device=torch.device(device))
    return hf.eval()


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter, the embedding included (the floor's numerator)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def write(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
