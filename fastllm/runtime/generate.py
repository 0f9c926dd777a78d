"""`model.generate(...)` on fastllm's runtime, as a drop-in for Hugging Face's.

Same arguments (keywords or a `generation_config`), same output: a `[batch * num_return_sequences, L + n]`
tensor of the (padded) prompts followed by the new tokens, rows that stop early padded with `pad_token_id`;
or a `GenerateDecoderOnlyOutput` with `sequences` (and `scores` when asked). Anything it does not implement
(beam search, custom logits processors, ...) goes to HF's own generate with a one-time warning naming it.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import torch

from fastllm.runtime.overlap import OverlappedSteps
from fastllm.runtime.sampler import SamplingOptions, needs_history, sample
from fastllm.runtime.scheduler import Request, Scheduler

# Generation-config fields this runtime implements; any other field set away from its default → HF fallback.
_SUPPORTED_FIELDS = {
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k", "top_p",
    "min_p", "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id", "stop_strings",
    "num_return_sequences", "return_dict_in_generate", "output_scores", "output_logits", "use_cache",
    "cache_implementation", "decoder_start_token_id", "transformers_version", "_from_model_config",
    "_commit_hash", "_original_object_hash", "generation_kwargs", "compile_config", "is_assistant",
}
_UNSUPPORTED_KWARGS = {"logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                       "negative_prompt_ids", "synced_gpus", "inputs_embeds", "past_key_values", "custom_generate"}
_request_ids = itertools.count()


def unsupported_arguments(generation_config, kwargs: dict) -> list[str]:
    """Names of the arguments this runtime does not implement (they make generate() fall back to HF's)."""
    names = {k for k in kwargs if k in _UNSUPPORTED_KWARGS and kwargs[k] is not None}
    gc = copy.deepcopy(generation_config)
    gc.update(**{k: v for k, v in kwargs.items() if k not in _UNSUPPORTED_KWARGS})
    default = type(gc)()
    for key, value in gc.to_dict().items():
        unset = value is None or value is False or value == {}
        if key not in _SUPPORTED_FIELDS and not unset and value != getattr(default, key, value):
            names.add(key)
    return sorted(names)


def _first(ids) -> int | None:
    if ids is None:
        return None
    return ids[0] if isinstance(ids, (list, tuple)) else int(ids)


def _eos_ids(gc) -> frozenset[int]:
    eos = gc.eos_token_id
    if eos is None:
        return frozenset()
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _validate(input_ids: torch.Tensor, attention_mask, gc, vocab: int, max_context: int) -> list[list[int]]:
    """The prompts without padding, or a ValueError saying what is wrong."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long,
                                                                                                     torch.int):
        raise ValueError("input_ids must be an integer tensor of shape [batch, length]")
    if gc.max_new_tokens is None or gc.max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {gc.max_new_tokens}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    prompts = []
    for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
        tokens = [t for t, m in zip(ids, mask) if m]
        if not tokens:
            raise ValueError(f"row {row} of input_ids is empty (its attention_mask is all zeros)")
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"row {row} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if len(tokens) + gc.max_new_tokens > max_context:
            raise ValueError(f"row {row}: prompt of {len(tokens)} tokens + max_new_tokens={gc.max_new_tokens} exceeds "
                             f"the model's context of {max_context} tokens")
        prompts.append(tokens)
    return prompts


class _StopStrings:
    """HF's stop_strings: stop once the text of a sequence contains a stop string ending in its newest token."""

    def __init__(self, stop_strings, tokenizer):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: call generate(..., tokenizer=tokenizer)")
        self.stops, self.tokenizer = list(stop_strings), tokenizer
        # Enough trailing tokens to hold the longest stop string (every token decodes to ≥ 1 char, but
        # some decode to an empty prefix: keep a margin).
        self.window = max(len(s) for s in self.stops) + 2

    def hit(self, tokens: list[int]) -> bool:
        tail = tokens[-self.window:]
        text = self.tokenizer.decode(tail)
        before = self.tokenizer.decode(tail[:-1])
        return any(s in text and s not in before for s in self.stops)


def generate(runtime, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
             generation_config=None, streamer=None, tokenizer=None, **kwargs):
    """HF-compatible generate over `runtime` (a `Runtime`: model runner + its block pool)."""
    model = runtime.model
    gc = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    model_kwargs = gc.update(**kwargs)
    if input_ids is None:
        input_ids = model_kwargs.pop("input_ids", None)
    model_kwargs.pop("use_cache", None)
    if attention_mask is None:
        attention_mask = model_kwargs.pop("attention_mask", None)
    if gc.max_new_tokens is None and gc.max_length is not None and input_ids is not None:
        gc.max_new_tokens = gc.max_length - input_ids.shape[1]
    if gc.min_new_tokens is None and gc.min_length:
        gc.min_new_tokens = max(0, gc.min_length - input_ids.shape[1])
    gc.validate()  # HF's own checks and messages (e.g. num_return_sequences > 1 needs sampling)
    runner = runtime.runner
    prompts = _validate(input_ids, attention_mask, gc, model.get_input_embeddings().weight.shape[0],
                        runner.max_model_len)
    pad = gc.pad_token_id if gc.pad_token_id is not None else _first(gc.eos_token_id)
    if pad is None:
        pad = 0
    options = SamplingOptions(do_sample=bool(gc.do_sample), temperature=gc.temperature, top_k=gc.top_k,
                              top_p=gc.top_p, min_p=gc.min_p, repetition_penalty=gc.repetition_penalty)
    stop = _StopStrings(gc.stop_strings, tokenizer) if gc.stop_strings else None
    n_return = gc.num_return_sequences or 1
    scheduler = Scheduler(runner.pool, max_num_seqs=runner.max_num_seqs,
                          max_num_batched_tokens=runtime.max_num_batched_tokens, max_model_len=runner.max_model_len)
    requests = []
    for prompt in prompts:
        for _ in range(n_return):
            req = Request(request_id=next(_request_ids), prompt_token_ids=prompt, max_new_tokens=gc.max_new_tokens,
                          min_new_tokens=gc.min_new_tokens or 0, eos_token_ids=_eos_ids(gc))
            scheduler.add(req)
            requests.append(req)
    want_scores = gc.return_dict_in_generate and (gc.output_scores or gc.output_logits)
    scores: dict[int, list[torch.Tensor]] = {r.request_id: [] for r in requests} if want_scores else {}
    raw_logits: dict[int, list[torch.Tensor]] = {r.request_id: [] for r in requests} if want_scores else {}
    if streamer is not None:
        streamer.put(input_ids.cpu())

    def record(sampled_reqs, tokens):
        """Per-step bookkeeping once a step's tokens are known on the host."""
        if stop is not None:
            for req in sampled_reqs:
                if not req.is_finished and stop.hit(req.all_token_ids):
                    scheduler.finish(req, "stop")
        if streamer is not None and sampled_reqs:
            streamer.put(torch.tensor(tokens[:1] if len(requests) == 1 else tokens))

    def keep_scores(sampled_reqs, processed, logits):
        if want_scores:
            for i, req in enumerate(sampled_reqs):
                scores[req.request_id].append(processed[i])
                raw_logits[req.request_id].append(logits[i])

    try:
        if runtime.async_scheduling and not needs_history(options):
            _run_overlapped(scheduler, runner, options, keep_scores, record)
        else:
            while scheduler.has_unfinished():
                out = scheduler.schedule()
                logits = runner.execute(out.chunks)
                sampled_reqs = [c.request for c in out.chunks if c.samples]
                histories = [torch.tensor(r.all_token_ids, device=logits.device) if needs_history(options) else None
                             for r in sampled_reqs]
                tokens, processed = sample(logits, [options] * len(sampled_reqs), histories)
                token_list = tokens.tolist()
                keep_scores(sampled_reqs, processed, logits)
                scheduler.update(out, {r.request_id: t for r, t in zip(sampled_reqs, token_list)})
                record(sampled_reqs, token_list)
    finally:
        for req in requests:
            if not req.is_finished:
                scheduler.abort(req.request_id)
        if streamer is not None:
            streamer.end()
    return _outputs(input_ids, n_return, requests, pad, gc, scores, raw_logits)


def _run_overlapped(scheduler, runner, options, keep_scores, record) -> None:
    """The step loop with the host a step ahead of the GPU (runtime/overlap.py), sampling as HF does."""
    from fastllm.runtime.scheduler import SchedulerOutput

    overlap = OverlappedSteps(scheduler, runner, lambda req: req.request_id)
    while scheduler.has_unfinished() or overlap.inflight is not None:
        out = scheduler.schedule() if scheduler.has_unfinished() else SchedulerOutput([], [])
        logits = overlap.launch(out)
        collected, token_list = overlap.collect()
        if collected:
            record(collected, token_list)
        if logits is None:
            continue
        sampling = [c.request for c in out.chunks if c.samples]
        logits, sampled_reqs = overlap.live_rows(logits, sampling, lambda req: not req.is_finished)
        tokens, processed = sample(logits, [options] * len(sampled_reqs), [None] * len(sampled_reqs))
        keep_scores(sampled_reqs, processed, logits)
        overlap.start(out, sampled_reqs, tokens)


def _outputs(input_ids, n_return, requests, pad, gc, scores, raw_logits):
    new = max(len(r.output_token_ids) for r in requests)
    prompt = input_ids.repeat_interleave(n_return, dim=0)
    generated = torch.full((len(requests), new), pad, dtype=input_ids.dtype, device=input_ids.device)
    for i, req in enumerate(requests):
        generated[i, :len(req.output_token_ids)] = torch.tensor(req.output_token_ids, dtype=input_ids.dtype)
    sequences = torch.cat([prompt, generated], dim=1)
    if not gc.return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    def per_step(per_request):
        if not per_request:
            return None
        vocab = next(iter(per_request.values()))[0].shape[-1]
        steps = []
        for t in range(new):
            rows = [per_request[r.request_id][t] if t < len(per_request[r.request_id]) else
                    torch.full((vocab,), -float("inf")).to(per_request[r.request_id][0]) for r in requests]
            steps.append(torch.stack(rows))
        return tuple(steps)

    return GenerateDecoderOnlyOutput(sequences=sequences, scores=per_step(scores) if gc.output_scores else None,
                                     logits=per_step(raw_logits) if gc.output_logits else None)


def warn_fallback(names: list[str]) -> None:
    warnings.warn(f"fastllm's generate() does not implement {', '.join(names)}; this call runs Hugging Face's "
                  f"generate on the fused model instead", RuntimeWarning, stacklevel=3)
