"""`model(...)` of an optimized model: the compiled step for plain logits, Hugging Face's forward otherwise.

A call with `input_ids` (and optionally `attention_mask`, `position_ids`, `logits_to_keep`, `return_dict`,
`use_cache=False`) runs on the model's compiled step through its engine core: each row's unmasked tokens become one
sequence of a ragged batch, computed in one step over KV blocks taken for it and given back after (teacher-forced
logits, e.g. for scoring or perplexity). Positions are HF's: `position_ids` if given, else 0..S-1 over the padded
row. Logits at masked positions are 0 (HF returns values there that attend to nothing real). No KV cache is
returned (`past_key_values` is None).

Anything else — `past_key_values`, `inputs_embeds`, `labels`, `use_cache=True`, `output_hidden_states`, ... — runs
Hugging Face's own forward, unfused (Hugging Face's generate fallback does this). `fastllm.explain(model)` counts
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


def install_forward(model, state: ModelState) -> None:
    signature = inspect.signature(state.original_forward)

    @functools.wraps(state.original_forward)
    def forward(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            bound = None  # let HF's forward raise its own message
        # The forward's **kwargs (return_dict, ...) flattened into its named arguments: _eager_reason read them, but
        # popped them from bound.arguments, so the compiled step never saw them (return_dict=False was ignored)
        arguments = None if bound is None else _flat_arguments(bound.arguments)
        reason = "arguments that do not bind to the forward" if bound is None else _eager_reason(arguments)
        reason = reason or state.hf_path_reason()
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


def _eager_reason(arguments: dict) -> str | None:
    """Why a call must run HF's forward, or None if the compiled step can take it."""
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
    return None


@torch.no_grad()
def _compiled_forward(model, core, arguments: dict):
    from transformers.modeling_outputs import CausalLMOutputWithPast

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
    keep = arguments.get("logits_to_keep")
    if isinstance(keep, int) and keep > 0:
        logits = logits[:, -keep:]
    elif isinstance(keep, torch.Tensor):
        logits = logits[:, keep.to(logits.device)]
    if arguments.get("return_dict") is False:
        return (logits,)
    return CausalLMOutputWithPast(logits=logits)
