"""Turn a step's logits into next tokens, with Hugging Face's logits processing and order.

Order (as transformers applies them): repetition penalty, then when sampling temperature, top-k, top-p and
min-p; then argmax (greedy) or a multinomial draw from the softmax. Rows are sampled independently; each
row carries its own parameters, so requests with different settings share one step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
