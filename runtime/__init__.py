"""Ember's runtime: the composition root (config, models, runner, scheduler, engine, APIs)."""
from __future__ import annotations

from runtime.llm import LLM
from runtime.outputs import RequestOutput
from runtime.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
