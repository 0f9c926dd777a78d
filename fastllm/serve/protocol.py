"""OpenAI-compatible request bodies (pydantic: types checked, unknown fields refused) and their SamplingParams.

Only what fastllm implements is accepted; a field it does not (`best_of`, `suffix`, `echo`, tools, ...) is refused
with a 400 naming it, never silently ignored. Numbers are range-checked by `SamplingParams` (NaN and Inf included).
Text must be valid Unicode: JSON can carry a lone surrogate ("\\ud800"), which no tokenizer can encode.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

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


def not_bool(value: Any) -> Any:
    """`value` unless it is JSON's true or false, which pydantic's lax mode reads as the numbers 1 and 0
    (`max_tokens: true` ran one token, `prompt: [true]` token id 1)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


Int = Annotated[int, BeforeValidator(not_bool)]
Number = Annotated[float, BeforeValidator(not_bool)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields the two OpenAI endpoints share."""

    # Fields OpenAI types "... or null" whose null means the default (vLLM declares them Optional with these
    # defaults): a client that sends every field, null for the unset ones, was refused with 400.
    _NULL_IS_DEFAULT: ClassVar[tuple[str, ...]] = ("n", "stream")

    model: Text
    n: Int = 1
    temperature: Number | None = None
    top_p: Number | None = None
    stop: Text | list[Text] | None = None
    seed: Int | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    user: Text | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extensions to OpenAI's fields, for exact-length completions (benchmarks, evaluations)
    ignore_eos: bool = False
    min_tokens: Int = 0

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in cls._NULL_IS_DEFAULT)}
        return data

    def check_stream_fields(self, logprobs: bool) -> None:
        """ValueError for streaming fields that cannot go together (OpenAI refuses stream_options without stream)."""
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        # A stream's chunks carry no logprobs (the engine's process sends them with the final output only): refused,
        # not answered with `"logprobs": null` in every chunk.
        if self.stream and logprobs:
            raise ValueError("logprobs are not supported with stream true; send the request without stream to get "
                             "them")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

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

    prompt: Text | list[Int] | list[Text] | list[list[Int]]
    max_tokens: Int | None = 16
    logprobs: Int | None = Field(default=None, description="top log-probabilities per token (0-5)")


class ChatMessage(_Strict):
    # "developer" is what newer OpenAI clients send in place of "system" (o1 and later); the chat template gets it as
    # "system" unless it knows the role (ServingEngine.tokenize_chat).
    role: Literal["system", "developer", "user", "assistant"]
    # OpenAI answers `"content": null` for an assistant turn of tool calls, and clients send their history back as
    # they got it: an assistant's null (or missing) content is its empty text. Any other role must have content.
    content: Text | list[dict[str, Any]] | None = None
    name: Text | None = None
    # What OpenAI's responses put on an assistant message beside its content, null when unused: a client that sends
    # its history back as it got it (openai-python's message objects) sends them. Null is taken as absent; a value
    # is refused (no tools, no audio here).
    refusal: None = None
    tool_calls: None = None
    function_call: None = None
    audio: None = None
    annotations: None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported_fields_null(cls, data: Any) -> Any:
        if isinstance(data, dict):
            used = sorted(k for k in ("refusal", "tool_calls", "function_call", "audio", "annotations")
                          if data.get(k) is not None)
            if used:
                raise ValueError(f"message field(s) {', '.join(used)} are not supported (no tools, audio or "
                                 f"refusals here); send them as null or leave them out")
        return data

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or a list of text parts); only an "
                             f"assistant message may have null content")
        return self

    def text(self) -> str:
        """The message's text: a string, or the text parts of a content list (other part types are refused); ""
        for an assistant message without content."""
        if self.content is None:
            return ""
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

    _NULL_IS_DEFAULT: ClassVar[tuple[str, ...]] = (*_Sampling._NULL_IS_DEFAULT, "logprobs")

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: bool = False
    top_logprobs: Int | None = None

    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them; a `name` goes with its message (templates that tell
        participants apart render it, the others ignore it)."""
        return [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name is not None else {})}
                for m in self.messages]


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
