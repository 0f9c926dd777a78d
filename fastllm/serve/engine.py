"""The server's view of the engine: an `AsyncLLM` behind admission control, with one request's updates as text.

Admission is bounded: at most `max_num_seqs` completions run and `max_queue` more wait; a request that would exceed
that is refused at once (`Overloaded`, answered 503 with Retry-After) instead of growing a queue without bound; one
that asks for more completions than the server ever admits is refused as invalid (ValueError: retrying cannot help).

Text is tokenized off the event loop (a prompt of megabytes takes seconds to tokenize, during which no other request
would be answered), and a text too long to fit the context whatever its tokens is refused before it is tokenized.
A request's deltas concatenate to its final text and never hold a stop string, not even half of one: `StreamText`
holds back what may begin a stop string (AsyncLLM's and EngineClient's streams come so; an engine whose streams
bring the core's raw text is held back here).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastllm.entrypoints.async_llm import AsyncLLM, StreamText
from fastllm.entrypoints.engine_process import EngineClient
from fastllm.entrypoints.llm import LLM
from fastllm.runtime.outputs import RequestOutput
from fastllm.runtime.sampling_params import SamplingParams


class Overloaded(Exception):
    """The server holds as many requests as it admits: the client should retry later."""


class EngineFault(Exception):
    """A model step failed while the request ran (the request ended; the server goes on)."""

    def client_message(self) -> str:
        """What the client is told (a 500's message, or a stream's error event)."""
        return f"the request failed in the engine and was ended ({self}); the server goes on"


@dataclass
class Delta:
    """What one completion produced since the last delta (text, tokens), and how it ended once it did."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


class Admission:
    """Admission slots held by one request; `release()` (or the end of a `with`) gives them back, once."""

    def __init__(self, serving: ServingEngine, completions: int) -> None:
        self._serving, self._completions = serving, completions

    def release(self) -> None:
        if self._serving is not None:
            self._serving.admitted -= self._completions
            self._serving = None

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ServingEngine:
    """Admission control and text streaming over one model's engine.

    Args:
        engine: an `EngineClient` (the engine in its own process: what `fastllm serve` runs), an `AsyncLLM`, or an
            `LLM` (served through an `AsyncLLM` in this process). Its tokenizer is the server's.
        max_queue: completions that may wait beyond the `max_num_seqs` that run.
    """

    def __init__(self, engine: EngineClient | AsyncLLM | LLM, max_queue: int) -> None:
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.engine = AsyncLLM(engine) if isinstance(engine, LLM) else engine
        self.tokenizer = self.engine.tokenizer
        self.max_running = self.engine.max_num_seqs
        self.max_queue = max_queue
        self.admitted = 0  # completions of admitted, unfinished requests (the event loop's thread only)
        self._ids = itertools.count()
        self.finished_listeners: list = []  # called with each request's final RequestOutput (the server's metrics)
        # No token is longer than the vocabulary's longest entry (in characters: a byte-level entry spells each byte
        # as one character), so a text of more than max_model_len * that many characters has more tokens than the
        # context holds. Twice that, for normalizers that shorten text before it is split (NFC composes "e" + U+0301).
        longest = max(map(len, self.tokenizer.get_vocab()), default=1) if self.tokenizer is not None else 1
        self.max_text_chars = 2 * self.max_model_len * max(longest, 1)

    @property
    def ready(self) -> bool:
        """Whether requests can run: the engine's step loop is alive and not shut down."""
        return self.engine.running

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def metrics(self) -> dict:
        """The engine core's counters (queues, KV blocks, tokens)."""
        return self.engine.metrics()

    def admit(self, completions: int) -> Admission:
        """Take `completions` admission slots for a request (released by `Admission.release`, or leaving its `with`);
        Overloaded if they are not free, ValueError if they never can be."""
        if completions > self.max_running + self.max_queue:
            raise ValueError(f"the request asks for {completions} completions (n times the prompts) and this server "
                             f"holds at most {self.max_running + self.max_queue} at once; send fewer")
        if self.admitted + completions > self.max_running + self.max_queue:
            raise Overloaded(f"the server holds {self.admitted} running or queued completions and admits at most "
                             f"{self.max_running + self.max_queue}; retry later")
        self.admitted += completions
        return Admission(self, completions)

    def token_ids(self, text: str) -> list[int]:
        """The token ids of a text prompt, on the calling thread (ValueError if there is no tokenizer or the text
        cannot fit the context)."""
        if self.tokenizer is None:
            raise ValueError("this server has no tokenizer: send token ids")
        self._check_text_length(len(text))
        return list(self.tokenizer(text).input_ids)

    async def tokenize(self, text: str) -> list[int]:
        """`token_ids(text)` on a worker thread, so the event loop answers other requests meanwhile."""
        self._check_text_length(len(text))  # refused without a thread hop
        return await asyncio.to_thread(self.token_ids, text)

    async def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids of a chat, rendered by the tokenizer's chat template with the assistant's turn opened
        (ValueError if the template refuses the messages)."""
        if self.tokenizer is None or getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template: use /v1/completions")
        self._check_text_length(sum(len(m["content"]) for m in messages))
        return await asyncio.to_thread(self._render_chat, self._template_roles(messages))

    def _template_roles(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """`messages` with OpenAI's "developer" role as "system", unless the chat template names "developer" itself
        (gpt-oss's does). transformers passes roles through as they are, and a template that knows only "system"
        rendered the developer's instructions as a turn of an unknown role (SmolLM2's: "<|im_start|>developer"),
        with its default system prompt put before them."""
        if "developer" in str(self.tokenizer.chat_template):
            return messages
        return [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]

    def _render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        from jinja2 import TemplateError  # transformers renders chat templates with jinja2

        try:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        except TemplateError as error:
            # Templates refuse chats they cannot render (`raise_exception("Conversation roles must alternate ...")`
            # in Llama 2's, Mistral's, Gemma's): what the client sent, a 400, not a server error.
            raise ValueError(f"this model's chat template refused the messages: {error}") from None

    def _check_text_length(self, chars: int) -> None:
        if chars > self.max_text_chars:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens; a prompt of "
                             f"{chars} characters cannot fit (no text of that many tokens is longer than "
                             f"{self.max_text_chars} characters)")

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def stream(self, prompt, params: SamplingParams, request_id: str) -> AsyncIterator[tuple[list[Delta],
                                                                                                    RequestOutput]]:
        """Run one request; yields (deltas of the completions that moved, the request's output so far) until it
        ends. Raises ValueError for a request the engine refuses (its message says why), EngineFault if a model
        step failed under it. Closing the iterator aborts the request."""
        # AsyncLLM and EngineClient hold their streams' text back themselves; an engine that sends the core's text as it
        # comes (stop strings and all) is held back here, by the same code.
        held = None if getattr(self.engine, "holds_back_text", False) else StreamText(params)
        try:
            async for update in self.engine.generate(prompt, params, request_id=request_id):
                output = update.output
                # (mid-stream, `output` may be None: an engine in its own process sends it only at the end)
                if update.finished and output.error is not None and not output.outputs[0].token_ids \
                        and output.prompt_token_ids is None:
                    raise ValueError(output.error.split(": ", 1)[-1])  # refused before it ran
                text = update.new_text if held is None else held.step(update)
                deltas = []
                for index in sorted(set(text) | set(update.new_token_ids)
                                    | (set(range(len(output.outputs))) if update.finished else set())):
                    reason = output.outputs[index].finish_reason if update.finished else None
                    deltas.append(Delta(index, text.get(index, ""), update.new_token_ids.get(index, []), reason))
                if update.finished:
                    for listener in self.finished_listeners:
                        listener(output)
                yield [d for d in deltas if d.text or d.token_ids or d.finish_reason], output
        except RuntimeError as error:  # a model step failed under this request (AsyncLLM raises it at the end)
            raise EngineFault(str(error)) from error

    def shutdown(self) -> None:
        self.engine.shutdown()
