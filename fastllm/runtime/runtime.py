"""A model's runtime: its model runner (cache, graphs) and the settings its generate() schedules with."""

from __future__ import annotations

from dataclasses import dataclass

from fastllm.runtime.model_runner import ModelRunner


@dataclass
class Runtime:
    model: object
    runner: ModelRunner
    max_num_batched_tokens: int
    async_scheduling: bool = True
