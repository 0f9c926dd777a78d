"""Turn a step's logits into next tokens: one batched sampler for every entry point.

`sample_tokens()` / `sample_rows()` take one `SamplingParams` per row (vLLM's fields): Hugging Face's logits
processing and order reproduced exactly (HF's generate() maps its generation config onto these rows), vectorized
over the batch with per-row values, plus presence/frequency penalties, bad words, min_tokens masking, per-request
seeds and logprobs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from fastllm.kernels.argmax import argmax_rows
from fastllm.runtime.sampling_params import SamplingParams

# ---- Batched sampler: one SamplingParams per row (vLLM's fields, Hugging Face's processing) ---------------


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


def on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without waiting for the GPU: on CUDA through pinned memory (a copy
    from pageable memory would first wait for every queued kernel, which async scheduling must not)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _has_penalties(params: SamplingParams) -> bool:
    return bool(params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty)


def needs_host_history(row: RowContext) -> bool:
    """Whether sampling this row reads its tokens so far or reports logprobs (asynchronous scheduling samples
    only rows that do not, since their newest token is still on the device)."""
    return bool(row.bad_words_token_ids or row.params.logprobs is not None or _has_penalties(row.params))


# -- masks and penalties: sparse edits of the rows that have any, built on the host, one device op each --


def _entries(scores: torch.Tensor, rows: list[int], ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index [M], token id [M]) on the device, for advanced indexing of scores [N, V]."""
    both = on_device([rows, ids], torch.long, scores.device)
    return both[0], both[1]


def _mask(scores: torch.Tensor, banned: list[list[int]]) -> None:
    """scores [N, V] in place: -inf at each row's banned ids (HF's NoBadWords / MinNewTokensLength masks)."""
    rows = [i for i, ids in enumerate(banned) for _ in ids]
    if rows:
        scores[_entries(scores, rows, [t for ids in banned for t in ids])] = -float("inf")


def _repetition_penalty(scores: torch.Tensor, seen: list[list[int]], penalty: list[float]) -> None:
    """scores [N, V] in place: HF's RepetitionPenaltyLogitsProcessor over each row's distinct `seen` ids:
    a score s becomes s * p when s < 0, else s / p (each token once, however often it occurred)."""
    rows = [i for i, ids in enumerate(seen) for _ in ids]
    if not rows:
        return
    index = _entries(scores, rows, [t for ids in seen for t in ids])
    p = on_device(penalty, scores.dtype, scores.device)[index[0]]  # fp32, as HF's python-float penalty
    values = scores[index]
    scores[index] = torch.where(values < 0, values * p, values / p)


def _presence_frequency(scores: torch.Tensor, counts: list[dict[int, int]], presence: list[float],
                        frequency: list[float]) -> None:
    """scores [N, V] in place, the OpenAI definition over generated tokens: s -= count * frequency
    + (count > 0) * presence. Only tokens with count > 0 change, so only those are touched."""
    rows = [i for i, c in enumerate(counts) for _ in c]
    if not rows:
        return
    index = _entries(scores, rows, [t for c in counts for t in c])
    count = on_device([n for c in counts for n in c.values()], scores.dtype, scores.device)
    per_row = on_device([frequency, presence], scores.dtype, scores.device)[:, index[0]]
    scores[index] = scores[index] - (count * per_row[0] + per_row[1])


def _seen_ids(row: RowContext, vocab: int) -> list[int]:
    """The distinct prompt and output ids the repetition penalty acts on; [] when it is off. Ids past the
    logits' vocabulary are left out (HF drops them too)."""
    if row.params.repetition_penalty == 1.0:
        return []
    return sorted({t for t in (*row.prompt_token_ids, *row.output_token_ids) if 0 <= t < vocab})


def _output_counts(row: RowContext, vocab: int) -> dict[int, int]:
    """How often each id was generated, for the presence/frequency penalties; {} when both are off."""
    if not (row.params.presence_penalty or row.params.frequency_penalty):
        return {}
    return Counter(t for t in row.output_token_ids if 0 <= t < vocab)


def _masked_and_penalized(logits: torch.Tensor, rows: list[RowContext]) -> torch.Tensor:
    """logits [N, V] after masks, repetition penalty, presence/frequency penalties: a copy when any row
    changes, else `logits` itself (never modified: logprobs are taken from the raw logits).

    HF applies its repetition penalty before its masks; a mask sets -inf, which every penalty keeps at -inf
    (-inf * p, -inf - a), so either order gives the same scores.
    """
    vocab = logits.shape[-1]
    # Ids past the model's vocabulary (a config's EOS, a larger tokenizer's word) can never be sampled.
    banned = [sorted({t for t in banned_token_ids(r) if 0 <= t < vocab}) for r in rows]
    seen = [_seen_ids(r, vocab) for r in rows]
    counts = [_output_counts(r, vocab) for r in rows]
    if not (any(banned) or any(seen) or any(counts)):
        return logits
    scores = logits.clone(memory_format=torch.contiguous_format)
    _mask(scores, banned)
    _repetition_penalty(scores, seen, [float(r.params.repetition_penalty) for r in rows])
    _presence_frequency(scores, counts, [float(r.params.presence_penalty) for r in rows],
                        [float(r.params.frequency_penalty) for r in rows])
    return scores


def apply_penalties(scores: torch.Tensor, row: RowContext) -> torch.Tensor:
    """One row's scores [V], in place, after its repetition (prompt + output) and presence and frequency
    (output) penalties; returns `scores`. The same code as `sample_tokens` (the batch of one row)."""
    vocab, p = scores.shape[-1], row.params
    batch = scores[None]  # a view: the edits land in `scores`
    _repetition_penalty(batch, [_seen_ids(row, vocab)], [float(p.repetition_penalty)])
    _presence_frequency(batch, [_output_counts(row, vocab)], [float(p.presence_penalty)],
                        [float(p.frequency_penalty)])
    return scores


# -- warpers (sampled rows only), HF's order and rules: temperature, top-k, top-p, min-p --------------------
# Per-row values go to the device as fp32: HF's processors take python floats, which torch rounds to the
# tensor's fp32 before the op, so the same fp32 values give the same results. Which filters run is decided
# on the host (a device-side `.any()` would wait for the GPU); a row that has a filter off gets a value that
# removes nothing.


def _top_k(scores: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """HF's TopKLogitsWarper per row: remove scores below the k-th largest (ties with it stay).
    scores [N, V]; top_k per row, 0 for off."""
    largest = scores.topk(max(top_k), -1).values  # [N, max k], descending
    # A column of -inf after them: the threshold of a row without top-k, which removes nothing.
    largest = torch.cat([largest, largest.new_full((largest.shape[0], 1), -float("inf"))], dim=-1)
    column = on_device([k - 1 if k else largest.shape[1] - 1 for k in top_k], torch.long, scores.device)
    return scores.masked_fill(scores < largest.gather(1, column[:, None]), -float("inf"))


def _top_p(scores: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """HF's TopPLogitsWarper per row: sort ascending, remove tokens whose cumulative probability (their own
    and every less likely token's) is <= 1 - top_p; the most likely token always stays. So a token that
    brings the kept mass exactly to top_p is the last one kept. scores [N, V]; top_p per row, 1 for off."""
    # 1 - p in double then fp32, as HF's `cumulative <= (1 - top_p)` does. Off (p = 1) gets -1, not 0: a
    # finite score whose probability underflows to 0 must keep its value, as it does when HF skips top-p.
    threshold = on_device([1 - p if p < 1 else -1.0 for p in top_p], scores.dtype, scores.device)
    ordered, order = scores.sort(-1)
    remove = ordered.softmax(-1).cumsum(-1) <= threshold[:, None]
    remove[:, -1] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def _min_p(scores: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """HF's MinPLogitsWarper per row: remove tokens with probability < min_p * the largest probability.
    scores [N, V]; min_p per row, 0 for off."""
    probs = scores.softmax(-1)
    bound = on_device(min_p, scores.dtype, scores.device)[:, None] * probs.amax(-1, keepdim=True)
    return scores.masked_fill(probs < bound, -float("inf"))


def _warp(scores: torch.Tensor, rows: list[RowContext]) -> torch.Tensor:
    """Sampled rows' scores [N, V] after temperature, top-k, top-p, min-p, each row its own values; filtered
    entries -inf. A new tensor when any of them runs, else `scores` itself (never modified)."""
    vocab = scores.shape[-1]
    params = [r.params for r in rows]
    if any(p.temperature != 1.0 for p in params):  # HF skips 1.0; dividing by 1.0 would change nothing
        scores = scores / on_device([float(p.temperature) for p in params], scores.dtype, scores.device)[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]  # k >= V keeps all, as in HF
    if any(top_k):
        scores = _top_k(scores, top_k)
    if any(p.top_p < 1 for p in params):
        scores = _top_p(scores, [float(p.top_p) for p in params])
    if any(p.min_p > 0 for p in params):
        scores = _min_p(scores, [float(p.min_p) for p in params])
    return scores


def _exponential_noise(like: torch.Tensor, rows: list[RowContext]) -> torch.Tensor:
    """E ~ Exp(1) of the shape of `like` [N, V]: a seeded row's from its own generator (V draws per sampled
    token, so its tokens depend only on its seed and its scores, never on the batch), the other rows' from
    the global RNG in one call."""
    noise = torch.empty_like(like)
    unseeded = [j for j, r in enumerate(rows) if r.generator is None]
    if len(unseeded) == len(rows):
        noise.exponential_()
    elif unseeded:
        fresh = torch.empty(len(unseeded), like.shape[-1], dtype=like.dtype, device=like.device).exponential_()
        noise.index_copy_(0, on_device(unseeded, torch.long, like.device), fresh)
    for j, row in enumerate(rows):
        if row.generator is not None:
            noise[j].exponential_(generator=row.generator)
    return noise


# The token a sampled row gets when its distribution is not a number (NaN scores, an fp16 overflow for instance, or
# every token masked): argmax ranked NaN first and gave token 0 every step, where Hugging Face raises. The engine
# fails that request alone (EngineCore._after_tokens); the device feed of the next step never reads it
# (ModelRunner.set_feed clamps it to a valid id, for a row about to be dropped).
NO_TOKEN = -1
NO_TOKEN_ERROR = ("sampling failed: the next-token distribution is not a number (NaN scores, e.g. an fp16 overflow, or "
                  "every token masked); Hugging Face raises \"probability tensor contains either inf, nan or element "
                  "< 0\" here")


def _draw(scores: torch.Tensor, rows: list[RowContext]) -> torch.Tensor:
    """One token per row [N] from softmax(scores [N, V]): argmax(probs / E) with E ~ Exp(1) per token, an
    exact sample of the categorical distribution (token i wins with probability probs_i); NO_TOKEN for a row
    whose probabilities are NaN."""
    noise = _exponential_noise(scores, rows)
    # A +inf score (a repetition penalty that is 0 in fp32, or one small enough to overflow s / p) would make the
    # row's softmax NaN, and argmax ranks NaN first (token 0 every step); at the largest float the +inf tokens share
    # the row's mass, the limit of the penalty. Finite scores are unchanged.
    probs = scores.clamp(max=torch.finfo(scores.dtype).max).softmax(-1)
    # E = 0 would turn a masked token's 0 / E into NaN, which argmax ranks first.
    tokens = argmax_rows(probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny))
    return tokens.masked_fill_(probs[:, 0].isnan(), NO_TOKEN)  # (softmax makes a row with a NaN all NaN)


def sample_tokens(logits: torch.Tensor, rows: list[RowContext], *,
                  return_scores: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Next token [N] (int64, on the device) of each row of `logits` [N, V] fp32 under its own SamplingParams;
    with `return_scores`, (tokens, scores [N, V]).

    Hugging Face's processing, in HF's order (which is also vLLM's): masks (min_tokens stop ids, bad words),
    repetition penalty (prompt + output), presence/frequency penalties (output); then greedy rows
    (temperature 0, or below `GREEDY_TEMPERATURE`) take the argmax, and sampled rows go through temperature,
    top-k, top-p, min-p and a draw (`_draw`; seeded rows from their own generator). `scores` are what HF's
    `generate(output_scores=True)` reports: the penalized logits for greedy rows, the warped ones (filtered
    entries -inf) for sampled rows; `logits` itself when no row changes it. `logits` is never modified.
    No host syncs: per-row values reach the device through `on_device`.
    """
    scores = _masked_and_penalized(logits, rows)
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not drawn:
        tokens = argmax_rows(scores)
        return (tokens, scores) if return_scores else tokens
    drawn_rows = [rows[i] for i in drawn]
    if len(drawn) == len(rows):
        warped = _warp(scores, drawn_rows)
        tokens = _draw(warped, drawn_rows)
        return (tokens, warped) if return_scores else tokens
    index = on_device(drawn, torch.long, scores.device)
    warped = _warp(scores.index_select(0, index), drawn_rows)
    tokens = argmax_rows(scores).index_copy_(0, index, _draw(warped, drawn_rows))
    if not return_scores:
        return tokens
    processed = scores.clone() if scores is logits else scores  # `scores` is ours to edit unless it is logits
    return tokens, processed.index_copy_(0, index, warped)


def sample_rows(logits: torch.Tensor, rows: list[RowContext]) -> SampleOutput:
    """`sample_tokens`, then the tokens on the host and their logprobs where asked."""
    token_ids = sample_tokens(logits, rows).tolist()
    return SampleOutput(token_ids, token_logprobs(logits, rows, token_ids))


def token_logprobs(logits: torch.Tensor, rows: list[RowContext], token_ids: list[int]) -> list[dict[int, float] | None]:
    """Raw-distribution logprobs (log_softmax of the model's logits) of the top-k tokens and the sampled one."""
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None and token_ids[i] != NO_TOKEN]
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
