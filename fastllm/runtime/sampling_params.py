"""`SamplingParams`: how `LLM.generate` samples one request, with vLLM's field names and meanings."""

from __future__ import annotations

from dataclasses import dataclass


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """Sampling settings of one request (vLLM's names and semantics).

    Args:
        n: completions per prompt, sampled independently (with a seed, completion i uses `seed + i`).
        max_tokens: most new tokens per completion (>= 1); None runs until the context is full.
        min_tokens: new tokens before EOS or a `stop_token_ids` token may end the completion; until then
            those tokens are masked out of the distribution.
        temperature: > 0 samples from softmax(logits / temperature); 0 is greedy (argmax).
        top_k: keep the k most likely tokens; 0 or -1 keeps all.
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p; in (0, 1].
        min_p: drop tokens less likely than min_p times the most likely one; in [0, 1].
        repetition_penalty: > 0; scores of tokens in the prompt or the output are divided by it when
            positive and multiplied when negative (1 = off).
        presence_penalty: in [-2, 2]; subtracted once from the score of every token already generated.
        frequency_penalty: in [-2, 2]; subtracted from a token's score once per time it was generated.
        seed: a per-request random seed: the request draws from its own generator, so its samples do not
            depend on which other requests share its batches.
        stop: string(s) that end the completion; the returned text stops before the stop string.
        stop_token_ids: token ids that end the completion (kept in `token_ids`), even with `ignore_eos`.
        bad_words: words never generated. A word of one token is masked always; for a longer word, its last
            token is masked when the tokens before it end the sequence so far.
        logprobs: return, for each sampled token, the log-probabilities of the `logprobs` most likely tokens
            and of the sampled one, under the model's raw distribution (before penalties, temperature and
            truncation: vLLM's default). None returns none.
        ignore_eos: keep generating after the model's EOS token (until `max_tokens` or a stop condition).
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logprobs: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raises ValueError naming the field and its allowed range.

        `LLM.generate` calls it again per request, so a field changed after construction fails that
        request alone.
        """
        for name, minimum in (("n", 1), ("max_tokens", 1), ("min_tokens", 0)):
            value = getattr(self, name)
            if name == "max_tokens" and value is None:
                continue
            if not _is_int(value) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}"
                                 + (" or None" if name == "max_tokens" else "") + f", got {value!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 1, or 0 / -1 to disable, got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            self.stop = list(self.stop)
            if not all(isinstance(s, str) and s for s in self.stop):
                raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if self.stop_token_ids is not None:
            self.stop_token_ids = list(self.stop_token_ids)
            if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
                raise ValueError(f"stop_token_ids must be integers >= 0, got {self.stop_token_ids!r}")
        if self.bad_words is not None:
            if isinstance(self.bad_words, str):
                raise ValueError(f"bad_words must be a list of strings, got the string {self.bad_words!r}")
            self.bad_words = list(self.bad_words)
            if not all(isinstance(w, str) and w for w in self.bad_words):
                raise ValueError(f"bad_words must be a list of non-empty strings, got {self.bad_words!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    def completion_seed(self, index: int) -> int:
        return (self.seed + index) % 2**64

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
