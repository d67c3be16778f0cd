"""The offline API, as vLLM users know it: `LLM(model=...).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Sequence

from runtime.config import CacheConfig, EngineConfig, SchedulerConfig, TierConfig
from runtime.engine import LLMEngine, Prompt
from runtime.outputs import RequestOutput
from runtime.sampling_params import SamplingParams

Message = dict[str, Any]


def build_config(model: str, **kwargs: Any) -> EngineConfig:
    """An EngineConfig from flat keyword arguments (`block_size=`, `max_num_seqs=`, ...)."""
    groups = {"cache": CacheConfig, "scheduler": SchedulerConfig, "tiers": TierConfig}
    nested: dict[str, dict[str, Any]] = {g: {} for g in groups}
    top: dict[str, Any] = {}
    for key, value in kwargs.items():
        for g, cls in groups.items():
            if key in {f.name for f in fields(cls)}:
                nested[g][key] = value
                break
        else:
            top[key] = value
    base = EngineConfig.from_env(model=model, **top)
    return replace(
        base,
        cache=replace(base.cache, **nested["cache"]),
        scheduler=replace(base.scheduler, **nested["scheduler"]),
        tiers=replace(base.tiers, **nested["tiers"]),
    )


class LLM:
    def __init__(self, model: str = "smollm2-135m", **kwargs: Any) -> None:
        self.engine = LLMEngine(build_config(model, **kwargs))

    def close(self) -> None:
        self.engine.close()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion in one continuous batch; outputs in prompt order.

        A prompt is a string or a list of token ids. All prompts are validated before any runs.
        """
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
        batch: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item, arg-type]
        params = sampling_params or SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(batch)
        if len(plist) != len(batch):
            raise ValueError(f"{len(batch)} prompts but {len(plist)} sampling params")
        tokenized = [self.engine.tokenize(p) for p in batch]
        for token_ids, p in zip(tokenized, plist):
            self.engine.validate_prompt(token_ids, p)
        rids = [self.engine.add_request(t, p).request_id for t, p in zip(tokenized, plist)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(rids):
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[r] for r in rids]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template (with a generation prompt) and generate."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            list(self.tokenizer.apply_chat_template(c, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False))
            for c in convs  # type: ignore[union-attr]
        ]
        return self.generate(prompts, sampling_params)
