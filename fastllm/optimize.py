"""`fastllm.optimize(model)`: capture, fuse, and install the fused forward on the model."""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from fastllm.capture import CAPTURE_ERRORS, capture
from fastllm.config import OptimizeConfig
from fastllm.explain import GraphReport, Report
from fastllm.passes import op_histogram, run_passes
from fastllm.passes._context import WeightMerger
from fastllm.runtime.generate import generate as runtime_generate
from fastllm.runtime.generate import unsupported_arguments, warn_fallback
from fastllm.runtime.kv_cache import KVCacheConfig
from fastllm.runtime.model_runner import ModelRunner
from fastllm.runtime.runtime import Runtime


@dataclass
class OptimizationState:
    """Everything fastllm attaches to an optimized model (as `model._fastllm_state`)."""

    config: OptimizeConfig
    model_name: str
    original_forward: Callable
    merger: WeightMerger = field(default_factory=WeightMerger)
    graphs: list[GraphReport] = field(default_factory=list)
    fallback_reason: str | None = None
    capture_seconds: float = 0.0
    runtime: Runtime | None = None
    runtime_error: str | None = None      # why generate() runs HF's loop instead of the runtime
    warned_generate_args: set = field(default_factory=set)

    def transform(self, gm: fx.GraphModule, tensors: dict, passes: tuple[str, ...] | None = None,
                  model_config: object | None = None) -> fx.GraphModule:
        """Run the passes on a captured graph and record what they did (for explain())."""
        start = time.perf_counter()
        before = len(gm.graph.nodes)
        matches = run_passes(gm, tensors, self.merger, passes or self.config.passes, model_config)
        fused, unfused = op_histogram(gm)
        self.graphs.append(GraphReport(matches, dict(fused), dict(unfused), before, len(gm.graph.nodes)))
        self.capture_seconds += time.perf_counter() - start
        return gm

    def fall_back(self, error: BaseException) -> None:
        self.fallback_reason = _first_line(error)
        warnings.warn(f"fastllm could not capture {self.model_name} and runs it unoptimized (still correct): "
                      f"{self.fallback_reason}", RuntimeWarning, stacklevel=3)

    def report(self) -> Report:
        if self.fallback_reason is not None:
            status = "fallback"
        else:
            status = "optimized" if self.graphs else "not captured yet"
        startup = {}
        if self.runtime is not None:
            runner = self.runtime.runner
            startup = {**runner.startup_seconds, "graph_from_cache": runner.graph_from_cache}
        return Report(self.model_name, status, self.fallback_reason, list(self.graphs), startup)


def _first_line(error: BaseException) -> str:
    # dynamo wraps an error raised inside the backend (our passes); the inner one says what went wrong.
    error = getattr(error, "inner_exception", None) or error
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:300] if text else ""


def _check_model(model) -> None:
    from transformers import PreTrainedModel

    if getattr(model, "_fastllm_state", None) is not None:
        raise ValueError(f"{type(model).__name__} is already optimized by fastllm; optimize() takes the original "
                         "model (reload it to change options)")
    if not isinstance(model, PreTrainedModel) or not callable(getattr(model, "generate", None)) \
            or not model.can_generate():
        raise TypeError(f"fastllm.optimize() takes a Hugging Face causal language model (a PreTrainedModel that "
                        f"can generate, e.g. from AutoModelForCausalLM), got {type(model).__name__}")


def optimize(model, config: OptimizeConfig | None = None, **overrides):
    """Make a Hugging Face causal LM fast in place and return it.

    The model's forward is captured as torch.fx graphs (dynamo, `fullgraph=True`), rewritten by the fusion
    passes onto fastllm's kernels, and installed as `model.forward`; `model(...)` and `model.generate(...)`
    keep their arguments and results. fastllm is for inference: the optimized forward runs under
    `torch.no_grad()`.

    Args:
        model: a `PreTrainedModel` that can generate (e.g. from `AutoModelForCausalLM.from_pretrained`).
        config: an `OptimizeConfig`; keyword overrides (`optimize(model, warmup=False)`) replace its fields.

    Returns:
        The same model object, optimized. If capture fails, a warning says why and the model keeps running
        unoptimized (unless `on_capture_failure="raise"`).

    Raises:
        TypeError: `model` is not a generative HF model, or an unknown option was given.
        ValueError: an option has an invalid value, or the model is already optimized.
    """
    config = OptimizeConfig.resolve(config, overrides)
    _check_model(model)
    model.eval()
    state = OptimizationState(config=config, model_name=type(model).__name__, original_forward=model.forward)
    compiled = capture(state.original_forward, state.transform, dynamic=config.dynamic)

    @functools.wraps(state.original_forward)
    def forward(*args, **kwargs):
        if state.fallback_reason is not None:
            return state.original_forward(*args, **kwargs)
        with torch.no_grad():
            try:
                return compiled(*args, **kwargs)
            except CAPTURE_ERRORS as error:
                if config.on_capture_failure == "raise":
                    raise
                # A bad input also fails inside dynamo; only if eager succeeds was it the capture.
                result = state.original_forward(*args, **kwargs)
                state.fall_back(error)
                return result

    model.forward = forward
    model._fastllm_state = state
    if config.paged_generate:
        _install_generate(model, state)
        if config.warmup:
            _build_runtime(model, state)
    elif config.warmup:
        _warmup(model)
    return model


def _build_runtime(model, state: OptimizationState) -> Runtime | None:
    """The paged runtime for generate(), built once; None (with one warning) if this model cannot use it."""
    if state.runtime is not None or state.runtime_error is not None:
        return state.runtime
    c = state.config
    runtime_passes = (*c.passes, "attention", "skinny_linear")
    try:
        runner = ModelRunner(model, kv_cache=KVCacheConfig(c.block_size, c.kv_cache_memory_fraction, c.num_kv_tokens),
                             max_num_seqs=c.max_num_seqs, max_model_len=c.max_model_len,
                             use_cuda_graph=c.cuda_graphs and next(model.parameters()).is_cuda,
                             transform=lambda gm, tensors: state.transform(gm, tensors, runtime_passes, model.config),
                             hf_forward=state.original_forward, max_num_batched_tokens=c.max_num_batched_tokens,
                             graph_cache=c.graph_cache)
    except CAPTURE_ERRORS as error:
        if c.on_capture_failure == "raise":
            raise
        state.fall_back(error)  # what the runtime cannot capture, the drop-in forward cannot either
        return None
    except NotImplementedError as error:
        if c.on_capture_failure == "raise":
            raise
        state.runtime_error = _first_line(error)
        warnings.warn(f"fastllm's paged runtime does not support {state.model_name} yet, so generate() runs Hugging "
                      f"Face's loop on the fused model: {state.runtime_error}", RuntimeWarning, stacklevel=3)
        return None
    state.runtime = Runtime(model, runner, c.max_num_batched_tokens, c.async_scheduling)
    return state.runtime


def _install_generate(model, state: OptimizationState) -> None:
    hf_generate = model.generate

    @functools.wraps(hf_generate)
    def generate(inputs=None, generation_config=None, **kwargs):
        runtime = _build_runtime(model, state) if state.fallback_reason is None else None
        if runtime is None:
            return hf_generate(inputs, generation_config, **kwargs)
        unsupported = unsupported_arguments(generation_config or model.generation_config, kwargs)
        if unsupported:
            if tuple(unsupported) not in state.warned_generate_args:
                state.warned_generate_args.add(tuple(unsupported))
                warn_fallback(unsupported)
            return hf_generate(inputs, generation_config, **kwargs)
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        return runtime_generate(runtime, inputs, generation_config=generation_config, **kwargs)

    model.generate = generate


def _warmup(model) -> None:
    """Short greedy generations that capture every graph generate() needs and merge weights now.

    A batch of 1 and one of 2: dynamo specializes sizes equal to 1, so both are distinct captures; with
    symbolic sizes (`dynamic=True`) no other prompt length, batch size or cache length needs one.
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    for batch, length in ((1, 3), (2, 5)):
        input_ids = torch.arange(batch * length, device=device).remainder(vocab).view(batch, length)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*generation flags.*")
            model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=3,
                           min_new_tokens=3, do_sample=False, pad_token_id=pad)
