"""What the engine core hands back: per request, its completions, metrics and error (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One completion of a prompt.

    Args:
        index: which of the request's `n` completions this is.
        text: the generated text (cut before a stop string); "" without a tokenizer.
        token_ids: the generated tokens.
        finish_reason: "stop" (EOS, stop token or stop string), "length" (max_tokens or the context) or
            "abort" (the request failed or was cancelled: see `RequestOutput.error`).
        logprobs: per generated token, {token id: logprob} for the top `SamplingParams.logprobs` tokens and
            the sampled one (raw model distribution); None unless asked.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestMetrics:
    """`time.perf_counter()` stamps of one request; `first_token_time` is None if it generated nothing."""

    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_generated_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean time between output tokens after the first (None with fewer than two tokens)."""
        if self.first_token_time is None or self.finish_time is None or self.num_generated_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_generated_tokens - 1)


@dataclass
class RequestOutput:
    """The result of one prompt.

    Args:
        request_id: the engine's id for it (unique per model), or the caller's own.
        prompt: the prompt string, or None when token ids were given.
        prompt_token_ids: the tokens the model saw (None if the prompt could not be tokenized).
        outputs: `SamplingParams.n` completions, by index.
        finished: whether every completion has ended (always True from `LLM.generate`).
        metrics: arrival, first-token and finish times; TTFT and time per output token.
        error: why the request was aborted ("ValueError: ..."), or None.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None


@dataclass
class RequestUpdate:
    """One step's news about a request: the tokens (and text) each completion produced since the last update."""

    request_id: str
    new_token_ids: dict[int, list[int]]      # completion index -> new tokens
    new_text: dict[int, str] = field(default_factory=dict)  # completion index -> new text (with a tokenizer)
    finished: bool = False
    output: RequestOutput | None = None      # the whole request so far (final when `finished`)
