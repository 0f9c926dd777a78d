"""fastllm: PyTorch-native JIT acceleration for Hugging Face causal language models.

    model = fastllm.optimize(AutoModelForCausalLM.from_pretrained(...))
    model.generate(...)            # same call, same result
    fastllm.LLM(model).generate(prompts, fastllm.SamplingParams(temperature=0))   # offline batches
    print(fastllm.explain(model))  # what was fused
    fastllm.release(model)         # back to plain HF, fastllm's memory freed

Importing fastllm does not initialise CUDA.
"""

from fastllm._version import __version__
from fastllm.config import ALL_PASSES, DEFAULT_PASSES, OptimizeConfig, QuantConfig
from fastllm.entrypoints.async_llm import AsyncLLM
from fastllm.entrypoints.forward import NO_KV_CACHE, NoKVCache
from fastllm.entrypoints.llm import LLM
from fastllm.explain import Report, explain
from fastllm.optimize import optimize, release
from fastllm.runtime.sampling_params import SamplingParams

__all__ = [
    "ALL_PASSES", "AsyncLLM", "DEFAULT_PASSES", "LLM", "NO_KV_CACHE", "NoKVCache", "OptimizeConfig", "QuantConfig",
    "Report", "SamplingParams",
    "explain", "optimize", "release",
    "__version__",
]
