"""User-facing configuration dataclasses, validated on construction."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Every user-selectable fusion pass, in the order they run: each pass module declares what it must run
# after or before (fastllm/passes/registry.py sorts them); e.g. gated_mlp runs before qkv, because gate/up
# projections also share an input and must become one gate_up GEMM with a fused activation, not a plain
# merged linear.
from fastllm._numbers import as_python_number
from fastllm.passes.registry import ALL_PASSES, DEFAULT_PASSES, select_passes
from fastllm.quant.config import QuantConfig, resolve_quantization

__all__ = ["ALL_PASSES", "DEFAULT_PASSES", "OptimizeConfig", "QuantConfig"]

ON_CAPTURE_FAILURE = ("fallback", "raise")
# The step's buffers hold sequence lengths, positions and token offsets as int32 (runtime/step_inputs.py): larger
# counts would overflow them (10**20 failed inside torch.zeros with a TypeError and C++ frames).
MAX_STEP_COUNT = 2**31 - 1
# A block of more tokens than this is no use (a block is the unit the cache is shared and freed in; a sequence's last
# block is mostly empty) and one of 10**9 failed in the allocator with a message that named nothing.
MAX_BLOCK_SIZE = 1024


@dataclass
class OptimizeConfig:
    """How `fastllm.optimize()` transforms a model.

    Args:
        passes: names of the fusion passes to run (default: `DEFAULT_PASSES`, which is `ALL_PASSES` but the
            opt-in "decode_fusion"; fastllm/passes/decode_fusion.py says why). The order they are given in
            does not matter: they always run in `ALL_PASSES`' order, which the passes' declared dependencies
            fix (gated_mlp before qkv, ...), and `passes` holds them in that order. The runtime's graph adds
            the passes it requires ("attention", "skinny_linear"), which cannot be selected. What no pass
            matches still runs, unfused and correct.
        on_capture_failure: "fallback" warns once and keeps the model running unoptimized (correct);
            "raise" re-raises the capture error (useful when adding support for a new architecture).
        warmup: capture, size the KV cache and record the CUDA graphs at `optimize()` time, so capture errors
            surface there and the first real call runs at full speed. False does it at the first call.
        kv_cache_memory_fraction: share of the GPU memory free after weights and a profiling forward that
            the KV cache takes. num_kv_tokens: an explicit cache size in tokens instead (CPU default: 65536).
        block_size: KV-cache tokens per block.
        max_num_seqs: most sequences decoded in one step (also the largest CUDA-graph batch). None: sized from the
            card (`scheduling_defaults`). More than the KV cache's blocks is capped there (each running sequence
            holds a block at least).
        max_num_batched_tokens: most tokens computed in one step (longer prompts are prefilled in chunks). None:
            sized from the card. More than the KV cache's tokens is capped there.
        max_model_len: longest sequence (prompt + new tokens); default: the model's max_position_embeddings.
        cuda_graphs: replay decode steps, and prefill/mixed steps of up to 1024 tokens, from CUDA graphs (CUDA only).
        async_scheduling: generate() and `fastllm.LLM` schedule and launch each step while the GPU still samples
            the one before (the sampled tokens reach the next step on the device). On by default: on an H100 it
            kept the GPU 96% busy in offline batching (75% without) and made batch-1 decode 10% faster.
        enable_prefix_caching: the scheduler reuses the K/V of full prompt blocks computed before (same tokens).
        cpu_runtime: on the CPU, run `model.generate()` and `model(...)` on fastllm's runtime. Off by default: there
            the fused ops run their PyTorch references, the same math as Hugging Face's forward through more Python,
            and HF's own path was faster (SmolLM2-135M on 2 cores: the runtime took 1.06-1.09x HF eager's time), so
            on the CPU those calls run Hugging Face's path, as `explain()` says. `fastllm.LLM` always runs the
            runtime (continuous batching has no HF equivalent to defer to). The tests turn it on.
        graph_cache: keep the runtime's captured graph on disk (`$FASTLLM_CACHE_DIR/graphs`, default
            `~/.cache/fastllm/graphs`), so a later process starting the same model skips dynamo's trace.
        quantization: None (the model's dtype), "fp8" (W8A8, needs FP8 tensor cores on CUDA), "int8" or "int4"
            (weight-only), or a `fastllm.QuantConfig` (group size, excluded layers; `fastllm/quant/config.py`).
            Weights are quantized once, when the step is compiled; `explain()` lists each layer's scheme. A quantized
            model runs on fastllm's runtime on the CPU too (Hugging Face's path would ignore the quantization).
    """

    passes: tuple[str, ...] = field(default=DEFAULT_PASSES)
    on_capture_failure: str = "fallback"
    warmup: bool = True
    kv_cache_memory_fraction: float = 0.9
    num_kv_tokens: int | None = None
    block_size: int = 16
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    cuda_graphs: bool = True
    async_scheduling: bool = True
    graph_cache: bool = True
    enable_prefix_caching: bool = False
    cpu_runtime: bool = False
    quantization: Any = None

    def __post_init__(self) -> None:
        # Into canonical order; a string, an unknown name or a runtime-only pass is refused, naming the allowed ones.
        if not isinstance(self.passes, Iterable):  # None or a number would fail as "not iterable", naming nothing
            raise ValueError(f"passes must be a sequence of pass names, got {self.passes!r}; "
                             f"allowed names: {', '.join(ALL_PASSES)}")
        self.passes = select_passes(self.passes)
        self.quantization = resolve_quantization(self.quantization)
        if self.on_capture_failure not in ON_CAPTURE_FAILURE:
            raise ValueError(f"on_capture_failure must be one of {ON_CAPTURE_FAILURE}, "
                             f"got {self.on_capture_failure!r}")
        if not isinstance(self.warmup, bool):
            raise ValueError(f"warmup must be True or False, got {self.warmup!r}")
        for name in ("cuda_graphs", "async_scheduling", "graph_cache", "enable_prefix_caching", "cpu_runtime"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_kv_tokens", "max_model_len"):
            value = getattr(self, name)
            if value is None and name != "block_size":
                continue
            value = as_python_number(value)
            setattr(self, name, value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if name == "block_size" and value > MAX_BLOCK_SIZE:
                raise ValueError(f"block_size must be a positive integer of at most {MAX_BLOCK_SIZE} (KV-cache tokens "
                                 f"a block: 16 is the default, vLLM's too), got {value!r}")
            if name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len") and value > MAX_STEP_COUNT:
                raise ValueError(f"{name} must be a positive integer of at most 2**31 - 1 (the step's buffers are "
                                 f"int32), got {value!r}")
        fraction = self.kv_cache_memory_fraction = as_python_number(self.kv_cache_memory_fraction)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {fraction!r}")

    @classmethod
    def resolve(cls, config: OptimizeConfig | None, overrides: dict[str, Any]) -> OptimizeConfig:
        """Combine an optional config with keyword overrides (`optimize(model, warmup=False)`)."""
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a fastllm.OptimizeConfig, got {type(config).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)} for fastllm.optimize(); "
                            f"allowed: {', '.join(allowed)}")
        base = config if config is not None else cls()
        return dataclasses.replace(base, **overrides)


# Scheduling defaults by the card's memory (vLLM's offline defaults on large cards: 1024 sequences and 16,384 tokens a
# step where the card has 70 GiB or more), and for the CPU.
_CARD_DEFAULTS = ((70, 1024, 16384), (32, 512, 8192), (0, 256, 4096))
CPU_DEFAULTS = (64, 8192)


def scheduling_defaults(device) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) for a model on `device` when the config leaves them None."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return CPU_DEFAULTS
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return next((seqs, tokens) for gib, seqs, tokens in _CARD_DEFAULTS if total_gib >= gib)


def resolve_scheduling(config: OptimizeConfig, device) -> OptimizeConfig:
    """`config` with max_num_seqs and max_num_batched_tokens filled in from the card where they are None."""
    seqs, tokens = scheduling_defaults(device)
    return dataclasses.replace(config, max_num_seqs=config.max_num_seqs or seqs,
                               max_num_batched_tokens=config.max_num_batched_tokens or tokens)
