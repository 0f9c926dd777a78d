"""What fastllm attaches to an optimized model (`model._fastllm_state`): its options, its one compiled step, its one
engine core, and which way its forward ran.

    state = optimize_in_place(model, OptimizeConfig(...))   # what fastllm.optimize() and LLM(model) do
    core = state.engine()        # the engine core (built on first use unless warmed up): None if the model falls back

A model that cannot be captured, or whose attention cannot be paged, falls back: it runs Hugging Face's own forward
and generate, correct and unfused, with one warning saying why (`explain()` shows it).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastllm.capture import CAPTURE_ERRORS
from fastllm.capture.step import CompiledStep, UnpageableModel, compile_step
from fastllm.config import OptimizeConfig, resolve_scheduling
from fastllm.entrypoints.forward import install_forward
from fastllm.entrypoints.hf_generate import install_generate
from fastllm.kernels._registry import FLOAT_DTYPES, FP8_KV_DTYPE
from fastllm.passes import resolve_passes
from fastllm.quant.config import QuantConfig, check_device_supports, slow_path_warning
from fastllm.quant.kv_scales import calibration_ids, scales_from_amax
from fastllm.quant.resident import quantized_module_names, release_float_weights
from fastllm.runtime.engine_core import EngineCore
from fastllm.runtime.kv_cache import KVCacheConfig
from fastllm.runtime.model_runner import ModelRunner


@dataclass(eq=False)
class ModelState:
    """Everything fastllm attaches to an optimized model."""

    model: torch.nn.Module
    config: OptimizeConfig
    original_forward: Callable
    original_generate: Callable
    compiled: CompiledStep | None = None
    core: EngineCore | None = None
    fallback_reason: str | None = None
    # How model(...) calls ran: "compiled" (the compiled step) or "eager" (HF's forward), and the latest reason
    # for an eager one.
    forward_routes: Counter = field(default_factory=Counter)
    eager_forward_reason: str | None = None
    warned_generate_args: set = field(default_factory=set)
    startup_seconds: dict[str, float] = field(default_factory=dict)
    float_bytes_released: int = 0  # float weights of quantized layers let go after compiling (quant/resident.py)
    # (device, dtype) of the weights when the step was compiled: the graph holds tensors made from them (merged or
    # quantized weights) and the KV cache is allocated to match, so a model moved or cast after that cannot run it.
    placement: tuple[torch.device, torch.dtype] | None = None
    # Every parameter's and buffer's tensor (name, storage address, shape, dtype) once the step was compiled: the
    # step reads those tensors (or merged ones they are views of), so a tensor replaced since is one it never sees.
    weights: tuple[tuple, ...] | None = None
    # The model's own instance attributes fastllm's forward/generate replaced (e.g. accelerate's hooked forward of a
    # device_map model, a user's wrapper): release() puts them back rather than falling back to the class's methods.
    own_methods: dict[str, Callable] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return type(self.model).__name__

    @property
    def status(self) -> str:
        if self.fallback_reason is not None:
            return "fallback"
        return "optimized" if self.compiled is not None else "not captured yet"

    def training_reason(self) -> str | None:
        """Why a call runs Hugging Face's path in training mode, or None: after `model.train()` (optimize() put the
        model in eval mode) a model with dropout computes something else in Hugging Face's forward and generate,
        which apply the dropout, than on the compiled step, which is inference-only (passes/dropout.py removed it)."""
        if not self.model.training or not has_dropout(self.model):
            return None
        return ("the model is in training mode (model.train()) and has dropout, which Hugging Face's forward applies "
                "and fastllm's inference-only step does not; model.eval() returns to fastllm's step")

    def hf_path_reason(self) -> str | None:
        """Why model.generate() and model(...) run Hugging Face's own path although the model is optimized (on the CPU
        unless `cpu_runtime`), or None when they run on fastllm's runtime."""
        if self.config.cpu_runtime or self.config.quantization is not None or self.fallback_reason is not None \
                or next(self.model.parameters()).device.type != "cpu":
            return None  # (a fallback's calls run HF's path too, for its own reason: cpu_runtime would not change it)
        return ("on the CPU Hugging Face's own path is faster than fastllm's runtime (its fused ops run the same "
                "PyTorch math there); optimize(model, cpu_runtime=True) runs the runtime, fastllm.LLM always does")

    def compile(self) -> CompiledStep | None:
        """The compiled step, capturing it on first use; None (with one warning) if the model falls back."""
        if self.compiled is not None or self.fallback_reason is not None:
            return self.compiled
        try:
            self.compiled = compile_step(self.model, resolve_passes(self.config.passes),
                                         hf_forward=self.original_forward, use_graph_cache=self.config.graph_cache,
                                         quantization=self.config.quantization,
                                         prequantized=getattr(self.model, "_fastllm_prequantized", None),
                                         max_positions=_max_model_len(self.model, self.config))
        except (*CAPTURE_ERRORS, UnpageableModel) as error:
            if self.config.on_capture_failure == "raise":
                raise
            self.fall_back(error)
            return None
        self.startup_seconds["capture"] = self.compiled.seconds
        if self.config.quantization is not None:  # the graph reads the quantized tensors: the float ones can go
            merger = self.compiled.merger
            self.float_bytes_released = release_float_weights(self.model, merger.quantized_rows, merger.merged)
            if torch.cuda.is_available() and next(self.model.parameters()).is_cuda:
                torch.cuda.empty_cache()  # so the KV cache, sized from the card's free memory, can take it
        param = next(self.model.parameters())
        self.placement = (param.device, param.dtype)
        self.weights = weight_tensors(self.model)
        return self.compiled

    def quantized_modules(self) -> None:
        """With quantization: compile now if not yet, so that Hugging Face's own forward (the calls fastllm hands
        to it) runs the quantized modules, never float weights the compiled step does not use."""
        if self.config.quantization is not None:
            self.compile()

    def engine(self) -> EngineCore | None:
        """The engine core (runner, KV pool, scheduler), built on first use; None if the model falls back."""
        self.check_placement()
        if self.core is not None:
            return self.core
        compiled = self.compile()
        if compiled is None:
            return None
        model = self.model
        param = next(model.parameters())
        c = self.config = resolve_scheduling(self.config, param.device)
        runner = ModelRunner(compiled, param.device, param.dtype,
                             kv_cache=KVCacheConfig(c.block_size, c.kv_cache_memory_fraction, c.num_kv_tokens),
                             max_num_seqs=c.max_num_seqs, max_model_len=_max_model_len(model, c),
                             use_cuda_graph=c.cuda_graphs and param.is_cuda,
                             max_num_batched_tokens=c.max_num_batched_tokens,
                             kv_cache_dtype=FP8_KV_DTYPE if c.quantization and c.quantization.kv_cache == "fp8"
                             else None, kv_scales=_checkpoint_kv_scales(model))
        if c.quantization is not None and c.quantization.kv_scales == "auto":
            start = time.perf_counter()
            runner.set_kv_scales(scales_from_amax(runner.measure_kv_amax(_calibration_ids(model, c.quantization))))
            runner.startup_seconds["kv_scales"] = time.perf_counter() - start
        self.startup_seconds.update(runner.startup_seconds)
        self.core = EngineCore(runner, vocab_size=model.get_input_embeddings().weight.shape[0],
                               eos_token_ids=model_eos_ids(model), max_num_seqs=c.max_num_seqs,
                               max_num_batched_tokens=c.max_num_batched_tokens,
                               enable_prefix_caching=c.enable_prefix_caching, async_scheduling=c.async_scheduling)
        return self.core

    def check_placement(self) -> None:
        """RuntimeError if the model was moved or cast (`model.to(...)`), or any of its parameters or buffers
        replaced by another tensor, since its step was compiled: the step would mix the new weights with tensors made
        from the old ones (a dtype error deep in a kernel) or compute with the old ones (wrong logits, no error).
        Updates in place (`load_state_dict` without assign, `param.data.copy_(...)`) reach the step."""
        if self.placement is None:
            return
        param = next(self.model.parameters())
        if (param.device, param.dtype) != self.placement:
            device, dtype = self.placement
            raise RuntimeError(f"{self.model_name} was moved to {param.device} / {param.dtype} after "
                               f"fastllm.optimize() compiled it on {device} / {dtype}; call fastllm.release(model) "
                               "and optimize it again")
        now = weight_tensors(self.model)
        if now != self.weights:
            before, after = {e[0]: e for e in self.weights}, {e[0]: e for e in now}
            name = next(n for n in (*after, *before) if before.get(n) != after.get(n))
            what = ("was replaced by another tensor" if name in before and name in after
                    else "was added" if name in after else "was removed")
            raise RuntimeError(f"{self.model_name}: its {name} {what} after fastllm.optimize() "
                               "compiled it (load_state_dict(assign=True), resize_token_embeddings, a new "
                               "nn.Parameter, a cast and back), which the compiled step would not see; call "
                               "fastllm.release(model) and optimize it again (updates in place, such as "
                               "load_state_dict without assign=True, reach the compiled step as they are)")

    def close_engine(self) -> None:
        """Let go of the engine core (KV cache, CUDA graphs, step buffers); the next call builds a small one again
        (the compiled step is kept: nothing is captured twice)."""
        if self.core is not None:
            self.core.close()
            self.core = None

    def release(self) -> None:
        """Return the model to plain Hugging Face: the engine core and the compiled step let go, `forward` and
        `generate` restored, `_fastllm_state` removed. Merged weights stay merged (the parameters are views of them:
        the same memory as before optimize()); a quantized model's linears stay quantized (their float weights were
        let go: quant/resident.py)."""
        self.close_engine()
        self.compiled = None
        for name in ("forward", "generate", "__deepcopy__"):
            self.model.__dict__.pop(name, None)  # the instance attributes fastllm installed; the class's return
            if name in self.own_methods:  # ... unless the model had its own
                self.model.__dict__[name] = self.own_methods[name]
        self.model.__dict__.pop("_fastllm_state", None)

    def fall_back(self, error: BaseException) -> None:
        self.fallback_reason = first_line(error)
        what = ("cannot run on fastllm's paged runtime" if isinstance(error, UnpageableModel)
                else "could not be captured")
        warnings.warn(f"fastllm: {self.model_name} {what} and runs unoptimized (Hugging Face's forward and "
                      f"generate, still correct): {self.fallback_reason}", RuntimeWarning, stacklevel=4)


def weight_tensors(model: torch.nn.Module) -> tuple[tuple, ...]:
    """(name, storage address, shape, dtype) of each parameter and buffer: what tells a tensor replaced from one
    updated in place, in one pass over the model (~0.1 ms for a 30-layer model on a CPU)."""
    tensors = (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    return tuple((name, t.data_ptr(), t.shape, t.dtype) for name, t in tensors)


def first_line(error: BaseException) -> str:
    # dynamo wraps an error raised inside the backend (our passes); the inner one says what went wrong.
    error = getattr(error, "inner_exception", None) or error
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:300] if text else ""


def model_eos_ids(model) -> frozenset[int]:
    """The model's own EOS ids: its generation config's, else its config's."""
    gc = getattr(model, "generation_config", None)
    for eos in (gc.eos_token_id if gc is not None else None, getattr(model.config, "eos_token_id", None)):
        if eos is not None:
            return frozenset([eos] if isinstance(eos, int) else eos)
    return frozenset()


def _max_model_len(model, config: OptimizeConfig) -> int:
    return config.max_model_len or getattr(model.config, "max_position_embeddings", None) or 4096


def check_model(model) -> None:
    from transformers import PreTrainedModel

    if getattr(model, "_fastllm_state", None) is not None:
        raise ValueError(f"{type(model).__name__} is already optimized by fastllm; optimize() takes the original "
                         "model (reload it to change options)")
    if not isinstance(model, PreTrainedModel) or not callable(getattr(model, "generate", None)) \
            or not model.can_generate():
        raise TypeError(f"fastllm.optimize() takes a Hugging Face causal language model (a PreTrainedModel that "
                        f"can generate, e.g. from AutoModelForCausalLM), got {type(model).__name__}")
    quantized = quantized_module_names(model)
    if quantized:  # its capture would fail (the quantized forwards are not traceable) and silently fall back
        raise ValueError(f"{type(model).__name__} was quantized by an earlier optimize() and released: "
                         f"{len(quantized)} of its linear layers (e.g. {quantized[0]}) hold only their quantized "
                         f"weights now, their float weights freed; reload the model to optimize it again")


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether `model` drops anything in training mode: a dropout module with p > 0, or a config's dropout rate above 0
    (e.g. Llama's attention_dropout, applied inside its attention function rather than by a module). The rates of
    heads a causal LM does not have (GPT-NeoX's classifier_dropout 0.1, GPT-2's summary_first_dropout) do not count."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    rates = (value for key, value in model.config.to_dict().items()
             if ("dropout" in key or "pdrop" in key) and not key.startswith(("classifier", "summary")))
    return any(isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0 for rate in rates)


def optimize_in_place(model, config: OptimizeConfig) -> ModelState:
    """Attach fastllm to `model` (see `fastllm.optimize`): its forward and generate() now run on the compiled step
    and the engine core. With `config.warmup`, capture and build the engine now."""
    check_model(model)
    _check_dtype(model)
    _check_max_model_len(model, config)
    config = _with_checkpoint_quantization(model, config)
    if config.quantization is not None:  # before anything is attached: a card without FP8 is refused at once
        check_device_supports(config.quantization, next(model.parameters()).device)
        slow = slow_path_warning(config.quantization, next(model.parameters()).device)
        if slow is not None:
            warnings.warn(slow, stacklevel=3)
    model.eval()
    state = ModelState(model, config, model.forward, model.generate,
                       own_methods={name: vars(model)[name] for name in ("forward", "generate") if name in vars(model)})
    install_forward(model, state)
    install_generate(model, state)
    model.__deepcopy__ = functools.partial(_plain_deepcopy, model, state)
    model._fastllm_state = state
    if config.warmup and state.hf_path_reason() is None:  # HF's path on the CPU: captured when an LLM needs it
        start = time.perf_counter()
        try:
            state.engine()
        except BaseException:
            # optimize() failed (a capture error with on_capture_failure="raise", a cache too big to allocate, ...):
            # detach, so the model is not left half-optimized (refused by a second optimize() with other options)
            # and what was allocated for it goes now.
            state.release()
            raise
        state.startup_seconds["optimize"] = time.perf_counter() - start
    return state


def _plain_deepcopy(model, state: ModelState, memo: dict):
    """`copy.deepcopy(model)` of an optimized model: a plain Hugging Face copy (as `release()` leaves a model), with its
    own weights. Copying fastllm's attributes too gave a copy whose forward and generate were the original's closures,
    running the original's weights (HF's path; on the runtime, its engine's lock could not be copied: "cannot pickle
    '_thread.lock' object"). `fastllm.optimize(copy)` optimizes the copy on its own."""
    clone = type(model).__new__(type(model))
    memo[id(model)] = clone
    attributes = {name: value for name, value in vars(model).items()
                  if name not in ("forward", "generate", "__deepcopy__", "_fastllm_state")}
    attributes.update(state.own_methods)  # the model's own forward/generate (bound methods: rebound to the clone)
    clone.__dict__.update(copy.deepcopy(attributes, memo))
    return clone


def _check_dtype(model) -> None:
    """ValueError unless the model's weights are in a dtype fastllm's kernels run (else a kernel refuses it later,
    naming its own argument, not the model)."""
    dtype = next(model.parameters()).dtype
    if dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise ValueError(f"fastllm runs models in {names}; {type(model).__name__}'s weights are "
                         f"{str(dtype).removeprefix('torch.')} (convert it first, e.g. model.to(torch.float32))")


def _check_max_model_len(model, config: OptimizeConfig) -> None:
    """ValueError for a max_model_len past the model's positions (config.max_position_embeddings), unless its rotary
    embedding is scaled to reach further: learned position embeddings would be indexed out of range (a device-side
    assert on CUDA), plain rotary ones would run positions the model was never trained on."""
    context = getattr(model.config, "max_position_embeddings", None)
    if config.max_model_len is None or not isinstance(context, int) or config.max_model_len <= context:
        return
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None)
    if _rope_types(rope) - {"default"}:
        return
    raise ValueError(f"max_model_len={config.max_model_len} exceeds {type(model).__name__}'s context of {context} "
                     f"positions (config.max_position_embeddings); allowed: 1..{context}")


def _rope_types(rope) -> set[str]:
    """The rope types of a config's rope_parameters / rope_scaling: one dict, or one per layer type (Gemma 3)."""
    if not isinstance(rope, dict):
        return set()
    nested = [value for value in rope.values() if isinstance(value, dict)]
    if nested:
        return set().union(*map(_rope_types, nested))
    return {rope.get("rope_type", rope.get("type", "default"))}


def _calibration_ids(model, quantization: QuantConfig) -> list[int]:
    """kv_scales="auto"'s calibration prompt: the user's token ids (checked against the vocabulary), or the
    default pseudo-random ones."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = quantization.kv_calibration_ids
    if ids is None:
        return calibration_ids(vocab)
    if max(ids) >= vocab:
        raise ValueError(f"kv_calibration_ids holds token id {max(ids)}, outside the model's vocabulary "
                         f"(0..{vocab - 1})")
    return list(ids)


def _checkpoint_kv_scales(model) -> list[tuple[float, float]] | None:
    """A quantized checkpoint's FP8 KV cache scales, per layer (None: the cache is unscaled, or not FP8)."""
    prequantized = getattr(model, "_fastllm_prequantized", None)
    return prequantized.kv_scales if prequantized is not None else None


def _with_checkpoint_quantization(model, config: OptimizeConfig) -> OptimizeConfig:
    """A model loaded from a quantized checkpoint (`fastllm.quant.load_prequantized`) runs its checkpoint's scheme on
    the checkpoint's quantized layers; asking for another scheme is refused."""
    prequantized = getattr(model, "_fastllm_prequantized", None)
    if prequantized is None:
        return config
    if config.quantization is not None and config.quantization.weights not in (None, prequantized.scheme):
        raise ValueError(f"the model was loaded from a {prequantized.scheme} checkpoint ({prequantized.source}); "
                         f"quantization={config.quantization.weights!r} cannot re-quantize it: leave quantization out")
    asked = config.quantization
    if asked is not None and asked.weights is not None and asked.exclude not in ((), QuantConfig.exclude):
        # The checkpoint holds those layers' quantized weights only: no float weights to keep them in
        raise ValueError(f"the model was loaded from a {prequantized.scheme} checkpoint ({prequantized.source}), "
                         f"whose quantized layers run as stored; exclude={asked.exclude!r} cannot keep any in the "
                         f"model's dtype (the checkpoint has no float weights for them): leave exclude out")
    kv_cache, kv_scales = (asked.kv_cache, asked.kv_scales) if asked is not None else (None, None)
    if prequantized.kv_scales is not None:  # the checkpoint's FP8 KV cache, with its scales
        if kv_scales is not None:
            raise ValueError(f"the checkpoint ({prequantized.source}) carries its own FP8 KV cache scales; "
                             f"kv_scales={kv_scales!r} cannot replace them: leave kv_scales out")
        kv_cache = "fp8"
    return dataclasses.replace(config, quantization=QuantConfig(
        prequantized.scheme, prequantized.group_size, exclude=(), kv_cache=kv_cache,
        zero_point=prequantized.zero_point, kv_scales=kv_scales,
        kv_calibration_ids=asked.kv_calibration_ids if asked is not None else None))
