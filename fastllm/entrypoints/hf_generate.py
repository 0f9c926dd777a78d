"""`model.generate(...)` of an optimized model: Hugging Face's drop-in, on the model's engine core.

Same arguments (keywords or a `generation_config`), same output: a `[batch * num_return_sequences, L + n]` tensor of
the (padded) prompts followed by the new tokens, rows that stop early padded with `pad_token_id`; or a
`GenerateDecoderOnlyOutput` with `sequences` (and `scores` / `logits` when asked). Its `past_key_values` is None
where HF's holds the cache: the KV lives in the engine's paged blocks, given back when the call ends. That is safe
to pass on: HF continues from a cache plus the whole sequence, and `generate(sequences, past_key_values=None)`
computes the same tokens from the sequence alone. A row that stopped early has, at each later step, scores (and
logits) of 0 for its pad token and -inf for every other token (HF goes on computing it on pad tokens: values that
mean nothing), so `compute_transition_scores` gives 0 there, as HF's does for a beam that finished.

Each row becomes one engine request whose `SamplingParams` say what HF's logits processors would do (the sampler
applies them in HF's order). Anything it does not implement (beam search, custom logits processors, ...) goes to
HF's own generate with a one-time warning naming it.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from typing import TYPE_CHECKING

import torch

from fastllm._numbers import as_python_number, token_id_list
from fastllm.entrypoints.forward import check_no_marker
from fastllm.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from fastllm.entrypoints.model_state import ModelState

# Generation-config fields this runtime implements; any other field set away from its default → HF fallback.
_SUPPORTED_FIELDS = {
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k", "top_p",
    "min_p", "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id", "stop_strings",
    "num_return_sequences", "return_dict_in_generate", "output_scores", "output_logits", "use_cache",
    "cache_implementation", "decoder_start_token_id", "transformers_version", "_from_model_config",
    "_commit_hash", "_original_object_hash", "generation_kwargs", "compile_config", "is_assistant",
}
# generate() keywords besides the generation config that this runtime takes: its own (set aside before HF's config
# merge, as HF does) and the model inputs it reads. Any other keyword (a typo, position_ids, logits_processor, ...)
# makes the call run HF's generate, which uses it or refuses it as HF does.
_OWN_KWARGS = {"streamer", "tokenizer"}
_MODEL_INPUTS = {"input_ids", "attention_mask"}
# SamplingParams' fields that generate() fills from differently named generation arguments
_HF_NAMES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens", "n": "num_return_sequences",
             "stop_token_ids": "eos_token_id"}


def install_generate(model, state: ModelState) -> None:
    hf_generate = state.original_generate

    @functools.wraps(hf_generate)
    def generate(inputs=None, generation_config=None, **kwargs):
        # NO_KV_CACHE (model(ids)'s past_key_values) stands for no cache: HF's generate would read it as one
        check_no_marker(kwargs.values())
        training = state.training_reason()
        if training is not None:
            on_runtime = state.fallback_reason is None and state.hf_path_reason() is None  # else HF's path anyway
            if on_runtime and ("training",) not in state.warned_generate_args:
                state.warned_generate_args.add(("training",))
                warnings.warn(f"{training}; generate() runs Hugging Face's generate (unfused) while it is",
                              RuntimeWarning, stacklevel=2)
            return hf_generate(inputs, generation_config, **kwargs)
        core = state.engine() if state.hf_path_reason() is None else None
        if core is None:  # a fallback, or Hugging Face's path on the CPU (state.hf_path_reason)
            return hf_generate(inputs, generation_config, **kwargs)
        own = {k: kwargs.pop(k) for k in _OWN_KWARGS if k in kwargs}
        _check_lengths(kwargs)
        default_max_length = _has_default_max_length(model, generation_config, kwargs)
        gc, model_kwargs = prepared_config(model, generation_config, kwargs)
        unsupported = unsupported_arguments(gc, model_kwargs)
        if own.get("streamer") is not None and _num_sequences(inputs, model_kwargs, gc) > 1:
            # HF puts one row per sequence each step; the engine streams one completion's tokens (several were
            # interleaved into one flat stream, and a batch streamed nothing)
            unsupported.append("streamer with several sequences")
        if unsupported:
            if tuple(unsupported) not in state.warned_generate_args:
                state.warned_generate_args.add(tuple(unsupported))
                warnings.warn(f"fastllm's generate() does not implement {', '.join(unsupported)}; this call runs "
                              f"Hugging Face's generate (unfused) instead", RuntimeWarning, stacklevel=2)
            return hf_generate(inputs, generation_config, **kwargs, **own)
        # HF's own resolution of the prompt: `input_ids=` as well as `inputs` is refused (the keyword was silently
        # dropped), and no prompt at all starts from BOS ([[bos_token_id]]; it raised "input_ids must be ...")
        inputs, _, model_kwargs = model._prepare_model_inputs(inputs, gc.bos_token_id, dict(model_kwargs))
        return run_generate(model, core, inputs, model_kwargs.get("attention_mask"), gc=gc,
                            default_max_length=default_max_length, **own)

    model.generate = generate


def prepared_config(model, generation_config, kwargs: dict):
    """(generation config, model kwargs) as Hugging Face's generate builds them: the call's arguments over the
    passed `generation_config`, its unset fields from `model.generation_config`, then HF's global defaults (e.g.
    top_k=50 when sampling); the kwargs that are no config field are returned as model kwargs."""
    return model._prepare_generation_config(generation_config, **kwargs)


def _has_default_max_length(model, generation_config, kwargs: dict) -> bool:
    """HF's test (before its defaults are applied) for "no max_length given": it then generates 20 new tokens."""
    return (kwargs.get("max_length") is None
            and (generation_config is None or generation_config.max_length is None)
            and model.generation_config.max_length is None)


def unsupported_arguments(gc, model_kwargs: dict) -> list[str]:
    """Names of the arguments this runtime does not implement (they make generate() fall back to HF's): config
    fields set away from HF's defaults, and keywords that are not this runtime's model inputs."""
    names = {k for k, v in model_kwargs.items() if k not in _MODEL_INPUTS and v is not None}
    defaults = gc._get_default_generation_params()
    blank = type(gc)()
    for key, value in gc.to_dict().items():
        unset = value is None or value is False or value == {}
        if key not in _SUPPORTED_FIELDS and not unset and value != defaults.get(key, getattr(blank, key, value)):
            names.add(key)
    return sorted(names)


def _num_sequences(inputs, model_kwargs: dict, gc) -> int:
    """Rows of generate()'s output: batch size times num_return_sequences."""
    ids = inputs if inputs is not None else model_kwargs.get("input_ids")
    batch = ids.shape[0] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else 1
    return batch * (gc.num_return_sequences or 1)


def _pad_id(gc) -> int:
    """The id rows that stop early are padded with: pad_token_id, else the first EOS id, else 0. A negative one
    (LLaMA-1's configs say -1) is taken: Hugging Face uses it only once a row stops before the others, where it
    fails (an embedding lookup); `_outputs` refuses it there."""
    pad = _token_ids(gc.pad_token_id, "pad_token_id", allow_negative=True)
    if len(pad) > 1:
        raise ValueError(f"invalid generation argument: pad_token_id must be one token id, got {gc.pad_token_id!r}")
    return (pad or _eos_ids(gc) or [0])[0]


def _eos_ids(gc) -> list[int]:
    return _token_ids(gc.eos_token_id, "eos_token_id")


def _token_ids(value, name: str, allow_negative: bool = False) -> list[int]:
    try:
        return token_id_list(value, name, allow_negative)
    except ValueError as error:  # (worded as the other refused generate() arguments are)
        raise ValueError(f"invalid generation argument: {error}") from None


def _prompts(input_ids, attention_mask, gc, max_context: int) -> list[list[int]]:
    """The prompts without padding, or a ValueError saying what is wrong."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long,
                                                                                                     torch.int):
        raise ValueError("input_ids must be an integer tensor of shape [batch, length]")
    if input_ids.shape[0] == 0:  # else nothing runs and the output's assembly divides by the batch size
        raise ValueError(f"input_ids has no rows (shape {tuple(input_ids.shape)}): give at least one prompt")
    if gc.max_new_tokens is None or gc.max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {gc.max_new_tokens}")
    if attention_mask is None:
        attention_mask = _inferred_mask(input_ids, gc)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    prompts = []
    for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
        tokens = [t for t, m in zip(ids, mask) if m]
        if not tokens:
            raise ValueError(f"row {row} of input_ids is empty (its attention_mask is all zeros)")
        if len(tokens) + gc.max_new_tokens > max_context:
            raise ValueError(f"row {row}: prompt of {len(tokens)} tokens + max_new_tokens={gc.max_new_tokens} exceeds "
                             f"the context of {max_context} tokens a sequence can have here (the model's positions, "
                             "or optimize()'s max_model_len, capped by what the KV cache can hold: num_kv_tokens / "
                             "kv_cache_memory_fraction)")
        prompts.append(tokens)
    return prompts


def _inferred_mask(input_ids: torch.Tensor, gc) -> torch.Tensor:
    """HF's rule without an attention_mask: where the pad token appears in the ids (and differs from EOS, or the
    batch has one row), it is padding; otherwise every token counts."""
    pad = gc.pad_token_id
    if pad is None or input_ids.shape[0] == 0:
        return torch.ones_like(input_ids)
    pad_in_ids = bool((input_ids == pad).any())
    pad_is_eos = pad in _eos_ids(gc)
    if pad_in_ids and not pad_is_eos:
        return (input_ids != pad).long()
    return torch.ones_like(input_ids)


def sampling_params(gc, eos: list[int]) -> SamplingParams:
    """One row's SamplingParams from HF's generation config: the processors HF would build, in HF's order."""
    sampling = bool(gc.do_sample)
    # HF takes a minimum past max_new_tokens (a model's generation_config may set a min_length for longer calls than
    # this one): EOS stays masked to the end. SamplingParams refuses min_tokens > max_tokens, so it is capped.
    min_tokens = gc.min_new_tokens or 0
    if isinstance(min_tokens, int) and isinstance(gc.max_new_tokens, int):
        min_tokens = min(min_tokens, gc.max_new_tokens)
    kwargs = dict(max_tokens=gc.max_new_tokens, min_tokens=min_tokens, temperature=0.0,
                  repetition_penalty=gc.repetition_penalty if gc.repetition_penalty is not None else 1.0,
                  ignore_eos=True, stop_token_ids=eos or None, n=gc.num_return_sequences or 1)
    if sampling:
        # HF refuses to sample at temperature 0 (the SamplingParams meaning, greedy, would change the call's).
        # numpy's numbers as Python's first: the checks below test int and float (np.int64(-1) passed them and
        # sampled the whole vocabulary as vLLM's "off")
        temperature = as_python_number(gc.temperature)
        if isinstance(temperature, (int, float)) and temperature <= 0:
            raise ValueError(f"invalid generation argument: temperature (={temperature}) must be > 0 with "
                             "do_sample=True; for greedy decoding set do_sample=False")
        top_k = as_python_number(gc.top_k or 0)
        top_p = as_python_number(gc.top_p) if gc.top_p is not None else 1.0
        if type(top_k) is int and top_k < 0:
            # HF's top-k filter refuses it; SamplingParams took -1 as vLLM's "off" and sampled the whole vocabulary
            raise ValueError(f"invalid generation argument: top_k must be a positive integer (0 = off), got {top_k}")
        if type(top_p) in (int, float) and 1 < top_p < float("inf"):
            # HF applies top-p below 1 only: above it nothing is filtered (SamplingParams refused it: "top_p must be
            # in (0, 1]"); inf stays refused as not finite (tests/test_robustness.py)
            top_p = 1.0
        if type(top_p) in (int, float) and top_p == 0:
            # HF's top-p range is [0, 1]; at 0 its filter keeps the one most likely token (min_tokens_to_keep), which
            # is top_k=1 (SamplingParams takes top_p in (0, 1], vLLM's range)
            top_k, top_p = 1, 1.0
        kwargs.update(temperature=temperature if temperature is not None else 1.0,
                      top_k=top_k, top_p=top_p, min_p=gc.min_p or 0.0)
    try:
        return SamplingParams(**kwargs)
    except ValueError as error:
        # SamplingParams' messages start with its field's name (vLLM's); the caller wrote Hugging Face's
        message = str(error)
        field = message.split(" ", 1)[0]
        if field in _HF_NAMES:
            message = _HF_NAMES[field] + message[len(field):]
        raise ValueError(f"invalid generation argument: {message}") from None


def run_generate(model, core, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, *, gc,
                 default_max_length: bool, streamer=None, tokenizer=None):
    """HF-compatible generate over the model's engine core, with `gc` from `prepared_config`."""
    if gc.max_new_tokens is None and input_ids is not None:
        gc.max_new_tokens = _max_new_tokens(model, gc, input_ids.shape[1], default_max_length)
        if gc.max_new_tokens <= 0 and not default_max_length:  # else HF's message names max_new_tokens, not given
            raise ValueError(f"max_length={gc.max_length} leaves no new token after the prompt of "
                             f"{input_ids.shape[1]} tokens (max_length counts the prompt); give a larger max_length "
                             f"or max_new_tokens")
        if gc.max_new_tokens <= 0:  # no length given, the prompt fills the positions: the same wrong name
            raise ValueError(f"the prompt of {input_ids.shape[1]} tokens leaves no room for a new token in "
                             f"{type(model).__name__}'s {model.config.max_position_embeddings} positions "
                             f"(config.max_position_embeddings)")
    if gc.min_new_tokens is None and gc.min_length:
        gc.min_new_tokens = max(0, gc.min_length - input_ids.shape[1])
    gc.validate()  # HF's own checks and messages (e.g. num_return_sequences > 1 needs sampling)
    pad = _pad_id(gc)  # (checks pad_token_id and eos_token_id before any work)
    prompts = _prompts(input_ids, attention_mask, gc, core.max_model_len)
    eos = _eos_ids(gc)
    params = sampling_params(gc, eos)
    if gc.stop_strings is not None:  # "" too: HF asks for the tokenizer whenever stop_strings is given
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: call generate(..., tokenizer=tokenizer)")
    if gc.stop_strings:
        params.stop = [gc.stop_strings] if isinstance(gc.stop_strings, str) else list(gc.stop_strings)
    want_scores = bool(gc.return_dict_in_generate and (gc.output_scores or gc.output_logits))
    listener = _streamer_listener(streamer, input_ids) if streamer is not None else None
    requests = []
    try:
        for prompt in prompts:
            requests.append(core.add(prompt, params, tokenizer=tokenizer, return_scores=want_scores,
                                     listener=listener if len(prompts) == 1 else None,
                                     stop_on_special_tokens_text=True))
        core.run_until(lambda: all(r.finished for r in requests))
    finally:
        for r in requests:
            if not r.finished:
                core.abort(r.request_id)
        if streamer is not None:
            streamer.end()
    for r in requests:
        if r.listener_error is not None:  # the caller's streamer raised: its own exception, as HF lets it through
            raise r.listener_error
        if r.fault is not None:
            raise RuntimeError(r.output.error) from r.fault
        if r.output.error is not None:
            raise RuntimeError(r.output.error)
    return _outputs(input_ids, [c for r in requests for c in r.completions], pad, gc)


def _check_lengths(kwargs: dict) -> None:
    """The length arguments are integers (HF's own checks crash on a string with a bare TypeError); numpy's are taken
    as HF takes them, as Python ints (SamplingParams refuses other types)."""
    for name in ("max_new_tokens", "max_length", "min_new_tokens", "min_length"):
        value = kwargs.get(name)
        if value is None:
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        kwargs[name] = int(value)


def _max_new_tokens(model, gc, prompt_length: int, default_max_length: bool) -> int:
    """New tokens from max_length, as HF counts them: max_length includes the (padded) prompt; without any length
    argument, HF's default max_length of 20 counts new tokens only, capped at the model's positions."""
    if not default_max_length:
        return gc.max_length - prompt_length
    max_length = gc.max_length + prompt_length
    positions = getattr(model.config, "max_position_embeddings", None)
    return (max_length if positions is None else min(max_length, positions)) - prompt_length


def _streamer_listener(streamer, input_ids):
    """HF streamers take the prompt once, then each step's new token (batch of one only, as in HF)."""
    streamer.put(input_ids.cpu())

    def listen(update) -> None:
        for tokens in update.new_token_ids.values():
            for token in tokens:
                streamer.put(torch.tensor([token]))

    return listen


def _outputs(input_ids, completions, pad: int, gc):
    tokens = [c.request.output_token_ids for c in completions]
    n_return = len(completions) // input_ids.shape[0]
    new = max(len(t) for t in tokens)
    # int64 whatever the prompt's integer dtype: HF appends its int64 next tokens to the prompt (torch.cat promotes
    # int32 input_ids to int64); the int32 prompt's dtype was kept
    prompt = input_ids.repeat_interleave(n_return, dim=0).long()
    if pad < 0 and any(len(t) < new for t in tokens):  # (the ids came back as they were: -5 in the sequences)
        raise ValueError(f"pad_token_id={pad} is negative, and a row that stopped before the others is padded with "
                         "it: give generate() a pad_token_id >= 0 (e.g. the tokenizer's eos_token_id)")
    generated = torch.full((len(completions), new), pad, dtype=torch.long, device=input_ids.device)
    for i, t in enumerate(tokens):
        generated[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    sequences = torch.cat([prompt, generated], dim=1)
    if not gc.return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    def per_step(per_completion: list[list[torch.Tensor]]):
        # A row that stopped runs no more steps (HF keeps computing it on pad tokens, scores that mean nothing). Its
        # later steps score the pad token it gets 0 and every other token -inf: the pad is certain, log-probability 0,
        # as HF's compute_transition_scores gives the steps of a finished beam. A row of -inf only made
        # compute_transition_scores(normalize_logits=True) NaN there (log_softmax of -inf everywhere), and a sum over
        # the steps, masked or not, NaN or -inf where HF's is finite.
        done = torch.full_like(per_completion[0][0], -float("inf"))
        if 0 <= pad < done.shape[-1]:
            done[pad] = 0.0
        steps = []
        for t in range(new):
            rows = [steps_of[t] if t < len(steps_of) else done for steps_of in per_completion]
            steps.append(torch.stack(rows))
        return tuple(steps)

    scores = per_step([c.scores for c in completions]) if gc.output_scores else None
    logits = per_step([c.raw_logits for c in completions]) if gc.output_logits else None
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=logits)
