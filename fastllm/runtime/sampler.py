"""Turn a step's logits into next tokens.

Two front ends over the same ideas:
- `sample()` with `SamplingOptions`, for the HF-compatible generate(): Hugging Face's processors and order
  (repetition penalty, then when sampling temperature, top-k, top-p and min-p; then argmax or a
  multinomial draw from the softmax).
- `sample_rows()` with one `SamplingParams` per row, for the `LLM` engine: vLLM's fields and order, per-row
  values in one batch, presence/frequency penalties, bad words, min_tokens masking, per-request seeds and
  logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastllm.runtime.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature <= 0 and self.do_sample:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def needs_history(options: SamplingOptions) -> bool:
    """Whether the tokens seen so far matter (building them costs a host-to-device copy per row and step)."""
    return options.repetition_penalty not in (None, 1.0)


def process_logits(logits: torch.Tensor, options: SamplingOptions, history: torch.Tensor) -> torch.Tensor:
    """One row's scores after the processors: logits [V] fp32, history [n] the tokens seen so far."""
    scores = logits
    if options.repetition_penalty not in (None, 1.0):
        seen = scores.gather(0, history)
        seen = torch.where(seen < 0, seen * options.repetition_penalty, seen / options.repetition_penalty)
        scores = scores.scatter(0, history, seen)
    if not options.do_sample:
        return scores
    if options.temperature not in (None, 1.0):
        scores = scores / options.temperature
    if options.top_k:
        k = min(options.top_k, scores.shape[-1])
        threshold = torch.topk(scores, k).values[-1]
        scores = scores.masked_fill(scores < threshold, -float("inf"))
    if options.top_p is not None and options.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - options.top_p
        remove[-1] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(0, order, remove), -float("inf"))
    if options.min_p:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < options.min_p * probs.max(), -float("inf"))
    return scores


def sample(logits: torch.Tensor, options: list[SamplingOptions], histories: list[torch.Tensor | None],
           generators: list[torch.Generator | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(next tokens [N], processed scores [N, V]) for logits [N, V]; histories only where `needs_history`."""
    if not any(o.do_sample or needs_history(o) for o in options):
        return logits.argmax(-1), logits  # plain greedy: one kernel for the whole batch
    scores = torch.stack([process_logits(logits[i], options[i], histories[i]) for i in range(len(options))])
    tokens = scores.argmax(-1)
    for i, opt in enumerate(options):
        if opt.do_sample:
            probs = scores[i].softmax(-1)
            generator = generators[i] if generators else None
            tokens[i] = torch.multinomial(probs, 1, generator=generator)[0]
    return tokens, scores


# ---- LLM engine: per-request SamplingParams (vLLM semantics) ---------------------------------------------


@dataclass
class RowContext:
    """What the sampler needs to know about one sampled row besides its logits.

    Args:
        params: the request's SamplingParams.
        prompt_token_ids, output_token_ids: the request's tokens so far (not copied; read only).
        generator: the request's own generator when it has a seed, else None (the global RNG).
        bad_words_token_ids: token sequences of `params.bad_words`.
        masked_token_ids: ids masked this step (EOS and stop ids while fewer than `min_tokens` are out).
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    masked_token_ids: frozenset[int] = frozenset()


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: token id -> logprob, or None if not asked


def banned_token_ids(row: RowContext) -> list[int]:
    """Token ids this row must not sample now: min_tokens stops, and bad words whose prefix just occurred."""
    banned = list(row.masked_token_ids)
    for word in row.bad_words_token_ids:
        prefix = word[:-1]
        if not prefix:
            banned.append(word[-1])
            continue
        # The word's last token is banned when the sequence so far ends with the rest of the word; look at
        # the prompt too, so a word split between prompt and output is caught.
        history = row.output_token_ids
        if len(history) < len(prefix):
            history = row.prompt_token_ids[-(len(prefix) - len(history)):] + history
        if history[-len(prefix):] == prefix:
            banned.append(word[-1])
    return banned


def apply_penalties(scores: torch.Tensor, row: RowContext) -> torch.Tensor:
    """One row's scores [V] after repetition (prompt + output), presence and frequency (output) penalties.

    The OpenAI / vLLM definition: score -= presence * (count > 0) + frequency * count, counts over the
    generated tokens; repetition divides positive scores and multiplies negative ones (HF, CTRL paper).
    """
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(row.prompt_token_ids + row.output_token_ids, device=scores.device).unique()
        values = scores[seen]
        scores[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
        counts = torch.bincount(torch.tensor(row.output_token_ids, device=scores.device), minlength=scores.shape[-1])
        scores -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return scores


def on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without waiting for the GPU: on CUDA through pinned memory (a copy
    from pageable memory would first wait for every queued kernel, which async scheduling must not)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _truncate(scores: torch.Tensor, rows: list[RowContext]) -> torch.Tensor:
    """Top-k, then top-p, then min-p over already temperature-scaled scores [N, V], each row its own values.
    Which filters run is decided on the host (a device-side `.any()` would wait for the GPU)."""
    vocab = scores.shape[-1]
    k_values = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    p_values = [float(r.params.top_p) for r in rows]
    min_values = [float(r.params.min_p) for r in rows]
    if any(k < vocab for k in k_values) or any(p < 1 for p in p_values):
        top_k = on_device(k_values, torch.long, scores.device)
        top_p = on_device(p_values, scores.dtype, scores.device)
        ordered, order = scores.sort(-1, descending=True)
        rank = torch.arange(vocab, device=scores.device)
        remove = rank >= top_k[:, None]
        ordered = ordered.masked_fill(remove, -float("inf"))
        probs = ordered.softmax(-1)
        # Drop a token once the tokens ranked above it already hold top_p of the mass (the top one never is).
        remove |= (probs.cumsum(-1) - probs) >= top_p[:, None]
        remove[:, 0] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    if any(m > 0 for m in min_values):
        min_p = on_device(min_values, scores.dtype, scores.device)
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, -float("inf"))
    return scores


def needs_host_history(row: RowContext) -> bool:
    """Whether sampling this row reads its tokens so far or reports logprobs (asynchronous scheduling samples
    only rows that do not, since their newest token is still on the device)."""
    p = row.params
    return bool(row.bad_words_token_ids or p.logprobs is not None or p.repetition_penalty != 1.0
                or p.presence_penalty or p.frequency_penalty)


def sample_tokens(logits: torch.Tensor, rows: list[RowContext], *, return_scores: bool = False):
    """Next token of each row of `logits` [N, V] fp32 under its own SamplingParams.

    Order (vLLM's): masks (bad words, min_tokens), penalties, temperature, top-k, top-p, min-p, then argmax
    for greedy rows (temperature 0) or a draw for the others. A draw is argmax(probs / E) with E ~ Exp(1)
    per token (an exact sample of the categorical distribution); a seeded row draws its E from its own
    generator, once per sampled token, so its tokens depend only on its seed and its logits, never on the
    batch it shares. Unseeded rows draw theirs from the global RNG in one call.
    """
    vocab = logits.shape[-1]
    edited = any(r.masked_token_ids or r.bad_words_token_ids or r.params.repetition_penalty != 1.0
                 or r.params.presence_penalty or r.params.frequency_penalty for r in rows)
    scores = logits.clone() if edited else logits  # logits stay raw for logprobs; a large batch's copy costs
    for i, row in enumerate(rows):
        # Ids past the model's vocabulary (a config's EOS, a larger tokenizer's word) can never be sampled.
        banned = [t for t in banned_token_ids(row) if t < vocab]
        if banned:
            scores[i].index_fill_(0, on_device(banned, torch.long, scores.device), -float("inf"))
        p = row.params
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            apply_penalties(scores[i], row)
    greedy = [r.params.temperature == 0 for r in rows]
    tokens = scores.argmax(-1)
    drawn = [i for i, g in enumerate(greedy) if not g]
    processed = scores.clone() if return_scores else None
    if drawn:
        drawn_rows = on_device(drawn, torch.long, scores.device)
        sub = scores.index_select(0, drawn_rows)
        temperature = on_device([float(rows[i].params.temperature) for i in drawn], sub.dtype, sub.device)
        sub = _truncate(sub / temperature[:, None], [rows[i] for i in drawn])
        if processed is not None:
            processed.index_copy_(0, drawn_rows, sub)
        noise = torch.empty_like(sub)
        unseeded = [j for j, i in enumerate(drawn) if rows[i].generator is None]
        if len(unseeded) == len(drawn):
            noise.exponential_()
        elif unseeded:
            noise.index_copy_(0, on_device(unseeded, torch.long, sub.device),
                              torch.empty(len(unseeded), sub.shape[-1], device=sub.device).exponential_())
        for j, i in enumerate(drawn):
            if rows[i].generator is not None:
                noise[j].exponential_(generator=rows[i].generator)
        # E = 0 would turn a masked token's 0 / E into NaN, which argmax ranks first.
        picked = (sub.softmax(-1) / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(-1)
        tokens.index_copy_(0, drawn_rows, picked)
    return (tokens, processed) if return_scores else tokens


def sample_rows(logits: torch.Tensor, rows: list[RowContext]) -> SampleOutput:
    """`sample_tokens`, then the tokens on the host and their logprobs where asked."""
    token_ids = sample_tokens(logits, rows).tolist()
    return SampleOutput(token_ids, token_logprobs(logits, rows, token_ids))


def token_logprobs(logits: torch.Tensor, rows: list[RowContext], token_ids: list[int]) -> list[dict[int, float] | None]:
    """Raw-distribution logprobs (log_softmax of the model's logits) of the top-k tokens and the sampled one."""
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list[dict[int, float] | None] = [None] * len(rows)
    if not wanted:
        return out
    logp = logits[wanted].log_softmax(-1)
    k = min(max(rows[i].params.logprobs for i in wanted), logp.shape[-1])
    top_values, top_ids = logp.topk(k, -1) if k else (logp[:, :0], logp[:, :0].long())
    chosen = logp.gather(1, torch.tensor([token_ids[i] for i in wanted], device=logp.device)[:, None])[:, 0]
    for j, i in enumerate(wanted):
        n = rows[i].params.logprobs
        entry = dict(zip(top_ids[j, :n].tolist(), top_values[j, :n].tolist()))
        entry[token_ids[i]] = chosen[j].item()
        out[i] = entry
    return out
