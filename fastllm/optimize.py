"""`fastllm.optimize(model)`: the one verb of the public API."""

from __future__ import annotations

import warnings

from fastllm.config import OptimizeConfig
from fastllm.entrypoints.model_state import optimize_in_place


def optimize(model, config: OptimizeConfig | None = None, **overrides):
    """Make a Hugging Face causal LM fast in place and return it.

    The model's forward is captured once on the runtime's flattened ragged batch (dynamo, `fullgraph=True`),
    rewritten by the fusion passes onto fastllm's kernels (attention onto paged attention over a block-allocated KV
    cache), and run by the model's engine core (scheduler, KV cache, CUDA graphs). `model.generate(...)` keeps
    Hugging Face's arguments and results; `model(...)` computes plain logits on the same compiled step (other calls,
    e.g. with `past_key_values`, run Hugging Face's forward). fastllm is for inference: the compiled step computes
    no gradients (a backward through `model(ids)`'s logits raises, naming Hugging Face's forward as the way).

    Args:
        model: a `PreTrainedModel` that can generate (e.g. from `AutoModelForCausalLM.from_pretrained`).
        config: an `OptimizeConfig`; keyword overrides (`optimize(model, warmup=False)`) replace its fields.

    Returns:
        The same model object, optimized. If capture fails, a warning says why and the model keeps running
        unoptimized (unless `on_capture_failure="raise"`).

    Raises:
        TypeError: `model` is not a generative HF model, or an unknown option was given.
        ValueError: an option has an invalid value (a `max_model_len` past the model's positions included), the
            model's weights are not float32, float16 or bfloat16, or the model is already optimized.
        An error of the start-up itself (e.g. a KV cache too big to allocate) leaves the model unoptimized, as it
            was but for the layers a `quantization` had already quantized.

    Once compiled, the model stays where it is: after `model.to(another dtype or device)` its calls raise a
    RuntimeError saying so (`fastllm.release(model)`, then optimize it again).
    """
    optimize_in_place(model, OptimizeConfig.resolve(config, overrides))
    return model


def release(model):
    """Undo `fastllm.optimize(model)`: free everything fastllm allocated for it (KV cache, CUDA graphs and their
    memory pool, step buffers, the captured graph) and restore Hugging Face's `forward` and `generate`. Returns the
    model. Dropping the last reference to an optimized model frees the same memory; `release` does it now, keeping
    the model. A quantized model stays quantized: the float weights of its quantized layers were let go when it was
    compiled, and those modules keep running the quantized weights (a warning says so; reload the checkpoint for the
    float model, and do not save this one as if it were); `optimize()` refuses it (reload it to optimize again). With
    the opt-in pass decode_fusion, the RMSNorm weights it folded into the projections stay folded (a warning says so):
    the same function up to one rounding of those weights, not the checkpoint's state_dict.

    Raises:
        ValueError: the model was not optimized by fastllm.
    """
    state = getattr(model, "_fastllm_state", None)
    if state is None:
        raise ValueError(f"{type(model).__name__} was not optimized by fastllm; there is nothing to release")
    folded = state.compiled.merger.folded_norms if state.compiled is not None else 0
    if folded:
        warnings.warn(f"fastllm.release: {type(model).__name__} keeps the weights decode_fusion folded ({folded} "
                      "RMSNorm weights multiplied into the projections that read them, the norms' scales set to 1): it "
                      "computes the same function up to one rounding of those weights, but its state_dict is not the "
                      "checkpoint's. Reload the checkpoint for the original weights (and before save_pretrained())",
                      RuntimeWarning, stacklevel=2)
    if state.float_bytes_released:
        warnings.warn(f"fastllm.release: {type(model).__name__} stays quantized (the float weights of its quantized "
                      "layers were let go when it was compiled; their modules keep the quantized weights). Reload the "
                      "checkpoint for the float model or to optimize it again; save_pretrained() would write empty "
                      "weights for those layers",
                      RuntimeWarning, stacklevel=2)
    state.release()
    return model
