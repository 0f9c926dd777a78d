"""`model(...)` of an optimized model: the compiled step for plain logits, Hugging Face's forward otherwise.

A call with `input_ids` (and optionally `attention_mask`, `position_ids`, `logits_to_keep`, `return_dict`,
`use_cache`) runs on the model's compiled step through its engine core: each row's unmasked tokens become one sequence
of a ragged batch, computed in one step over KV blocks taken for it and given back after (teacher-forced logits, e.g.
for scoring or perplexity). Positions are HF's: `position_ids` if given, else 0..S-1 over the padded row. Logits at
masked positions are 0 (HF returns values there that attend to nothing real).

No KV cache survives the call. Where Hugging Face would return one (`use_cache=True`, or left out with the config's
`use_cache` on: HF's default), the output's cache field (`past_key_values`, `cache` in recent transformers) holds
`NO_KV_CACHE`, a `NoKVCache` marker, in place of a cache; `return_dict=False` gives `(logits, NO_KV_CACHE)`, the
two values HF's tuple has. Passing the marker back (`model(next_ids, past_key_values=out.past_key_values)`, the
hand-written decode loop) raises a ValueError: with None there (what this returned before) the call ran as a fresh
sequence without its context and gave wrong tokens silently. `model(ids, use_cache=True)` runs HF's forward, which
returns a real cache; `model.generate` decodes on the runtime. With `use_cache=False` (or the config's off) the field
is None, as in HF.

The logits carry no gradients: with autograd on (no `torch.no_grad()` / `torch.inference_mode()`) and parameters that
require grad they require grad as HF's do, but their backward raises a RuntimeError saying how to get gradients (HF's
forward: `use_cache=True`, `labels=...`, or `fastllm.release(model)`); it was "element 0 of tensors does not require
grad". The call stays on the compiled step: scoring without `no_grad` is common and keeps its speed and memory.

Anything else — `past_key_values`, `inputs_embeds`, `labels`, `use_cache=True`, `output_hidden_states`, ... — runs
Hugging Face's own forward, unfused (Hugging Face's generate fallback does this), as does every call while a model with
dropout is in training mode (`ModelState.training_reason`). `fastllm.explain(model)` counts
the calls of each kind and gives the latest reason for an eager one.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fastllm.entrypoints.model_state import ModelState

# Arguments the compiled path handles (others, when not None, send the call to HF's forward).
_HANDLED = {"input_ids", "attention_mask", "position_ids", "logits_to_keep", "return_dict", "use_cache"}

_NO_CACHE_HELP = ("fastllm's compiled forward keeps no KV cache: model(input_ids) returns NO_KV_CACHE in place of "
                  "past_key_values. For a hand-written decode loop call model(input_ids, use_cache=True) (Hugging "
                  "Face's forward, which returns a real cache) and pass that cache on; or use model.generate(...)")


class NoKVCache:
    """What `model(input_ids)` of an optimized model returns as `past_key_values` (`cache`) where Hugging Face would
    return a KV cache: the compiled step keeps its KV in the engine's paged blocks, given back when the call ends.

    Returning a real HF cache is not cheap: the paged blocks hold each layer's keys and values in the runtime's
    layout (possibly FP8, per-family head layouts), and copying them out into a `DynamicCache` would cost every
    scoring call memory and time for the few callers that decode by hand. A marker keeps scoring fast and makes
    the hand-written decode loop fail loudly: passed back to the model (or to `generate`) it raises a ValueError.
    Any use as a cache (`.get_seq_length()`, `past[0]`) raises too, naming the way out.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_KV_CACHE"

    def __getattr__(self, name: str):
        # AttributeError (not ValueError): hasattr(), getattr(x, name, default) and copy's probes keep working
        raise AttributeError(f"'NoKVCache' has no attribute {name!r}: {_NO_CACHE_HELP}")

    def __getitem__(self, index):  # a legacy tuple cache: past[layer][0]
        raise TypeError(_NO_CACHE_HELP)

    def __iter__(self):
        raise TypeError(_NO_CACHE_HELP)

    def __reduce__(self):  # pickling and deepcopy give the one marker back
        return "NO_KV_CACHE"


NO_KV_CACHE = NoKVCache()


def check_no_marker(values) -> None:
    """ValueError if NO_KV_CACHE is among `values` (a call's arguments): it stands for a cache that does not exist."""
    if any(isinstance(value, NoKVCache) for value in values):
        raise ValueError(f"past_key_values is NO_KV_CACHE, the output of a call without a cache; {_NO_CACHE_HELP}")


def install_forward(model, state: ModelState) -> None:
    signature = inspect.signature(state.original_forward)

    @functools.wraps(state.original_forward)
    def forward(*args, **kwargs):
        check_no_marker((*args, *kwargs.values()))
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            bound = None  # let HF's forward raise its own message
        # The forward's **kwargs (return_dict, ...) flattened into its named arguments: _eager_reason read them, but
        # popped them from bound.arguments, so the compiled step never saw them (return_dict=False was ignored)
        arguments = None if bound is None else _flat_arguments(bound.arguments)
        reason = ("arguments that do not bind to the forward" if bound is None
                  else _eager_reason(arguments, getattr(model.config, "use_cache", False)))
        reason = reason or state.training_reason() or state.hf_path_reason()
        core = state.engine() if reason is None else None
        if core is None:
            state.quantized_modules()
            state.forward_routes["eager"] += 1
            state.eager_forward_reason = reason or state.fallback_reason
            return state.original_forward(*args, **kwargs)
        state.forward_routes["compiled"] += 1
        return _compiled_forward(model, core, arguments)

    model.forward = forward


def _flat_arguments(arguments: dict) -> dict:
    """The bound arguments with the forward's **kwargs merged in (a new dict: the bound one is left as it is)."""
    arguments = dict(arguments)
    extra = dict(arguments.pop("kwargs", {}) or {})
    return {**arguments, **extra}


def _eager_reason(arguments: dict, config_use_cache: bool = False) -> str | None:
    """Why a call must run HF's forward, or None if the compiled step can take it (`config_use_cache`: the model
    config's use_cache, what HF's forward takes for use_cache=None)."""
    used = sorted(name for name, value in arguments.items() if name not in _HANDLED and value is not None)
    if used:
        return f"called with {', '.join(used)}"
    if arguments.get("use_cache"):
        return "called with use_cache=True (the compiled step returns no KV cache)"
    ids = arguments.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        return "input_ids is not an integer tensor of shape [batch, length]"
    for name in ("attention_mask", "position_ids"):
        value = arguments.get(name)
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != ids.shape):
            return f"{name} is not a tensor of input_ids' shape"
    keep = arguments.get("logits_to_keep")
    if keep is not None and not isinstance(keep, (int, torch.Tensor)):
        return "logits_to_keep is neither an int nor a tensor"
    use_cache = config_use_cache if arguments.get("use_cache") is None else arguments["use_cache"]
    positions = arguments.get("position_ids")
    if (positions is not None and arguments.get("attention_mask") is None and not use_cache
            and bool((positions.diff(dim=-1) != 1).any())):
        # Packed sequences (padding-free batches): with no mask and no cache, Hugging Face's masks (transformers 5's
        # masking_utils) keep each run of consecutive positions to itself; the compiled step scores a row as one
        # sequence. Where a family's mask does not do so, its own forward is still what it computes.
        return "position_ids restart within a row (packed sequences) with no attention_mask and no cache"
    return None


def _compiled_forward(model, core, arguments: dict):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    compute = functools.partial(_logits, model, core, arguments)
    # Only with autograd on: the common no_grad / inference_mode scoring call pays one is_grad_enabled() for this
    weight = _parameter_requiring_grad(model) if torch.is_grad_enabled() else None
    logits = compute() if weight is None else _NoGradients.apply(weight, compute)
    keep = arguments.get("logits_to_keep")
    if isinstance(keep, int) and keep != 0:  # HF's slice(-keep, None): a negative count drops the first -keep
        logits = logits[:, -keep:]
    elif isinstance(keep, torch.Tensor):
        logits = logits[:, keep.to(logits.device)]
    # HF's use_cache: the argument, else the config's (its forward fills None from the config, as here)
    use_cache = arguments.get("use_cache")
    if use_cache is None:
        use_cache = getattr(model.config, "use_cache", False)
    cache = NO_KV_CACHE if use_cache else None
    if arguments.get("return_dict") is False:
        return (logits,) if cache is None else (logits, cache)  # HF's to_tuple() drops the None fields
    # transformers renamed the field past_key_values to cache (5.2x; `.past_key_values` still reads it)
    field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    return CausalLMOutputWithPast(logits=logits, **{field: cache})


def _parameter_requiring_grad(model) -> torch.nn.Parameter | None:
    return next((p for p in model.parameters() if p.requires_grad), None)


class _NoGradients(torch.autograd.Function):
    """The compiled step's logits in a graph whose backward raises a clear error. The step computes no gradients
    (fused kernels, paged KV: inference only); without this node the logits did not require grad and `.backward()`
    raised PyTorch's "element 0 of tensors does not require grad". `weight` (a parameter that requires grad) is
    only there to put the node in the graph; the logits are computed inside, so they are a fresh tensor that can be
    written in place (an input returned as it is would be a view that cannot)."""

    @staticmethod
    def forward(ctx, weight, compute):
        return compute()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("fastllm's compiled forward computes no gradients (model(input_ids) ran the compiled step, "
                           "which is for inference). To backpropagate through the model run Hugging Face's forward: "
                           "model(input_ids, use_cache=True) or model(input_ids, labels=...), or "
                           "fastllm.release(model); for scoring, wrap the call in torch.no_grad()")


@torch.no_grad()
def _logits(model, core, arguments: dict) -> torch.Tensor:
    """The compiled step's logits, [batch, length, vocab], 0 at masked positions."""
    ids = arguments["input_ids"]
    batch, length = ids.shape
    mask = arguments.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    positions = arguments.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=ids.device).expand(batch, length)
    rows, sequences = [], []
    for row, (tokens, keep, pos) in enumerate(zip(ids.tolist(), mask.tolist(), positions.tolist())):
        kept = [(t, p) for t, p, k in zip(tokens, pos, keep) if k]
        if kept:
            rows.append(row)
            sequences.append(([t for t, _ in kept], [p for _, p in kept]))
    param = next(model.parameters())
    vocab = model.get_output_embeddings().weight.shape[0]
    logits = torch.zeros(batch, length, vocab, dtype=param.dtype, device=param.device)
    if sequences:
        for row, values in zip(rows, core.score(sequences)):
            logits[row, mask[row].to(param.device)] = values.to(param.dtype)
    return logits
