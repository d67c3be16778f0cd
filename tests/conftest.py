"""Shared fixtures: the embedded model (Ember and the transformers reference) and tiny random
Llama-family checkpoints written to disk as real Hugging Face directories."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU (must be set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The embedded model converted to a Hugging Face directory (Ember's own cache)."""
    from runtime.config import EngineConfig
    from runtime.models.loader import convert_gguf, embedded_gguf_path

    directory, _ = convert_gguf(embedded_gguf_path(), EngineConfig.from_env().cache_dir)
    return directory


@pytest.fixture(scope="session")
def smol_hf() -> Any:
    """transformers' own model, loaded straight from the GGUF file, float32 on CPU."""
    from transformers import AutoModelForCausalLM

    from runtime.models.loader import embedded_gguf_path

    path = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smol_prompts(smol_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    convs = json.loads((DATA / "prompts.json").read_text())
    return [list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)) for c in convs]


TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # Tied embeddings and Llama-3 RoPE scaling.
    "llama": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
        max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    ),
    # Untied embeddings, qkv bias.
    "qwen2": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, vocab_size=300,
        max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1e6,
    ),
    # Mistral without a sliding window (the window would be refused).
    "mistral": dict(
        model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=280, head_dim=16,
        max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5, sliding_window=None,
    ),
}


# Seeds whose references keep every greedy decision clear of a near-tie (test_parity asserts it).
TINY_SEEDS = {"llama": 0, "qwen2": 2, "mistral": 1}


def make_tiny(kind: str, path: Path, seed: int | None = None) -> Path:
    """Write a random tiny checkpoint (config.json + model.safetensors) with transformers itself."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[kind])
    model_type = spec.pop("model_type")
    # A wide initialisation keeps logits far from ties, so greedy comparisons are meaningful.
    cfg = AutoConfig.for_model(model_type, initializer_range=0.25, eos_token_id=None, bos_token_id=None, pad_token_id=None, **spec)
    torch.manual_seed(TINY_SEEDS[kind] if seed is None else seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny("llama", tmp_path_factory.mktemp("tiny-llama-shared"))
