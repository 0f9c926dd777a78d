"""OpenAI-compatible request bodies (pydantic: types checked, unknown fields refused) and their SamplingParams.

Only what fastllm implements is accepted; a field it does not (`best_of`, `suffix`, `echo`, tools, ...) is refused
with a 400 naming it, never silently ignored. Numbers are range-checked by `SamplingParams` (NaN and Inf included).
Text must be valid Unicode: JSON can carry a lone surrogate ("\\ud800"), which no tokenizer can encode.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from fastllm.runtime.sampling_params import SamplingParams

# Most chat messages, and most characters of one message's text: bounds against inputs that crashed other servers.
MAX_MESSAGES = 1024


def unicode_text(text: str) -> str:
    """`text` if it is valid Unicode; ValueError naming the first lone surrogate otherwise (the tokenizer would raise
    a TypeError on it: a 500 before this check)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"text must be valid Unicode; it has a lone surrogate {text[error.start]!r} at character "
                         f"{error.start}") from None
    return text


Text = Annotated[str, AfterValidator(unicode_text)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Sampling(_Strict):
    """Fields the two OpenAI endpoints share."""

    model: Text
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: Text | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # vLLM's extensions to OpenAI's fields, for exact-length completions (benchmarks, evaluations)
    ignore_eos: bool = False
    min_tokens: int = 0

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's SamplingParams (ValueError, naming the field, for a value out of range)."""
        kwargs = dict(n=self.n, max_tokens=max_tokens, stop=self.stop, seed=self.seed, logprobs=logprobs,
                      ignore_eos=self.ignore_eos, min_tokens=self.min_tokens)
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return SamplingParams(**kwargs)


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Text | list[int] | list[Text] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, description="top log-probabilities per token (0-5)")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text | list[dict[str, Any]]
    name: Text | None = None

    def text(self) -> str:
        """The message's text: a string, or the text parts of a content list (other part types are refused)."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise ValueError("message content parts must be {\"type\": \"text\", \"text\": ...}; other part types "
                                 "(images, audio) are not supported")
            parts.append(unicode_text(part["text"]))
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
