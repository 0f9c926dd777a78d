"""`SamplingParams`: how `LLM.generate` samples one request, with vLLM's field names and meanings."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastllm._numbers import as_python_number

MAX_N = 128  # completions per prompt (OpenAI's bound)
MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's bound, vLLM's default)
MAX_STOP_STRINGS = 64
MAX_STOP_TOKEN_IDS = 64
MAX_BAD_WORDS = 64
MAX_STRING_LENGTH = 1024  # characters of one stop string or bad word
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
# Temperatures below this are greedy (vLLM's rule): dividing fp32 logits by them overflows to inf (or, under
# ~1e-45, divides by an fp32 zero), and softmax of inf is NaN.
GREEDY_TEMPERATURE = 1e-5


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    """A number that is neither NaN nor infinite, nor an int too large to become a float."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _as_list(name: str, value: object, allowed: str) -> list:
    """`value` as a list; a non-iterable (stop=5) is refused naming the field, not with list()'s TypeError."""
    try:
        return list(value)
    except TypeError:
        raise ValueError(f"{name} must be {allowed}, got {value!r}") from None


def _check_strings(name: str, strings: list[str], most: int) -> None:
    if len(strings) > most:
        raise ValueError(f"{name} must have at most {most} entries, got {len(strings)}")
    longest = max(strings, key=len, default="")
    if len(longest) > MAX_STRING_LENGTH:
        raise ValueError(f"{name} entries must be at most {MAX_STRING_LENGTH} characters each, "
                         f"got one of {len(longest)}")


@dataclass
class SamplingParams:
    """Sampling settings of one request (vLLM's names and semantics).

    Args:
        n: completions per prompt, in [1, MAX_N], sampled independently (with a seed, completion i uses
            `completion_seed(i)`: `seed + i` modulo 2**64).
        max_tokens: most new tokens per completion (>= 1); None runs until the context is full.
        min_tokens: new tokens before EOS or a `stop_token_ids` token may end the completion; until then
            those tokens are masked out of the distribution.
        temperature: > 0 samples from softmax(logits / temperature); 0 is greedy (argmax), and so is any
            temperature below GREEDY_TEMPERATURE (vLLM's rule: the division would overflow).
        top_k: keep the k most likely tokens; 0 or -1 keeps all.
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p; in (0, 1]
            (Hugging Face's rule at the boundary: see `sampler._top_p`).
        min_p: drop tokens less likely than min_p times the most likely one; in [0, 1].
        repetition_penalty: > 0; scores of tokens in the prompt or the output are divided by it when
            positive and multiplied when negative (1 = off).
        presence_penalty: in [-2, 2]; subtracted once from the score of every token already generated.
        frequency_penalty: in [-2, 2]; subtracted from a token's score once per time it was generated.
        seed: a per-request random seed in [0, 2**64 - 1]: the request draws from its own generator, so its
            samples do not depend on which other requests share its batches.
        stop: string(s) that end the completion; the returned text stops before the stop string. At most
            MAX_STOP_STRINGS strings of at most MAX_STRING_LENGTH characters.
        stop_token_ids: token ids that end the completion (kept in `token_ids`), even with `ignore_eos`; at most
            MAX_STOP_TOKEN_IDS.
        bad_words: words never generated (at most MAX_BAD_WORDS, each at most MAX_STRING_LENGTH characters).
            A word of one token is masked always; for a longer word, its last token is masked when the tokens
            before it end the sequence so far.
        logprobs: in [0, MAX_LOGPROBS]: return, for each sampled token, the log-probabilities of the `logprobs`
            most likely tokens and of the sampled one, under the model's raw distribution (before penalties,
            temperature and truncation: vLLM's default). None returns none.
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
        """Check every field; raises ValueError naming the field, what was wrong and what is allowed.

        `LLM.generate` calls it again per request, so a field changed after construction fails that
        request alone. The bounds on `n`, `logprobs`, `stop`, `stop_token_ids` and `bad_words` keep one request
        from asking for unbounded work (this is also what the HTTP server validates against).
        """
        self._numbers_as_python()
        self._validate_counts()
        self._validate_floats()
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 1, or 0 / -1 to disable, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be None or an integer in [0, 2**64 - 1], got {self.seed!r}")
        self._validate_lists()
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    def _numbers_as_python(self) -> None:
        """numpy's numbers (temperature=np.float32(0.7), max_tokens=np.int64(8)) as Python's: the checks below take
        int and float only, and refused them with a message that read as a valid value. Bools stay as they are
        (refused: np.bool_ is no number to `numbers`)."""
        for name in ("n", "max_tokens", "min_tokens", "top_k", "seed", "logprobs", "temperature", "top_p", "min_p",
                     "repetition_penalty", "presence_penalty", "frequency_penalty"):
            setattr(self, name, as_python_number(getattr(self, name)))

    def _validate_counts(self) -> None:
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")

    def _validate_floats(self) -> None:
        """Every float field must be a finite number in its range: NaN compares False with everything, so a
        plain range check lets it through (temperature=nan would sample from NaN scores)."""
        for name, allowed, ok in (
            ("temperature", ">= 0 (0 = greedy)", lambda v: v >= 0),
            ("top_p", "in (0, 1]", lambda v: 0 < v <= 1),
            ("min_p", "in [0, 1]", lambda v: 0 <= v <= 1),
            ("repetition_penalty", "> 0 (1 = off)", lambda v: v > 0),
            ("presence_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2),
            ("frequency_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2),
        ):
            value = getattr(self, name)
            if not _is_finite_number(value) or not ok(value):
                raise ValueError(f"{name} must be {allowed} and finite, got {value!r}")

    def _validate_lists(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            self.stop = _as_list("stop", self.stop, "a non-empty string or a list of them")
            if not all(isinstance(s, str) and s for s in self.stop):
                raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
            _check_strings("stop", self.stop, MAX_STOP_STRINGS)
        if self.stop_token_ids is not None:
            self.stop_token_ids = [as_python_number(t) for t in
                                   _as_list("stop_token_ids", self.stop_token_ids, "a list of integers >= 0")]
            if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
                raise ValueError(f"stop_token_ids must be integers >= 0, got {self.stop_token_ids!r}")
            if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
                raise ValueError(f"stop_token_ids must have at most {MAX_STOP_TOKEN_IDS} entries, "
                                 f"got {len(self.stop_token_ids)}")
        if self.bad_words is not None:
            if isinstance(self.bad_words, str):
                raise ValueError(f"bad_words must be a list of strings, got the string {self.bad_words!r}")
            self.bad_words = _as_list("bad_words", self.bad_words, "a list of non-empty strings")
            if not all(isinstance(w, str) and w for w in self.bad_words):
                raise ValueError(f"bad_words must be a list of non-empty strings, got {self.bad_words!r}")
            _check_strings("bad_words", self.bad_words, MAX_BAD_WORDS)

    def completion_seed(self, index: int) -> int:
        """The seed of completion `index` (0 <= index < n): `seed + index`, wrapped into [0, 2**64 - 1] so that
        `torch.Generator.manual_seed` accepts it for every valid seed."""
        if self.seed is None:
            raise ValueError("completion_seed needs a seed; this SamplingParams has seed=None")
        if not _is_int(index) or index < 0:
            raise ValueError(f"index must be an integer >= 0, got {index!r}")
        return (self.seed + index) % (MAX_SEED + 1)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
