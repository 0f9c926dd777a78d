"""OpenAI-compatible routes: POST /v1/completions, POST /v1/chat/completions (both streamable), GET /v1/models.

Responses and errors keep OpenAI's shapes (`choices`, `usage`, `finish_reason`; `{"error": {...}}`), streams are
server-sent events ending with `data: [DONE]`. A streaming response starts once the engine has accepted the request
and given its first tokens, so a request it refuses is answered 400 like a non-streaming one; a model step that fails
later ends the stream with an error event (`data: {"error": ...}`, as vLLM does) before `[DONE]`. One prompt list of
a completions request is run as one engine request per prompt, their choices numbered prompt-major as OpenAI does.
Logprobs come with whole (non-streaming) answers only: a streaming request that asks for them is refused (400).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from fastllm._log import logger
from fastllm.serve.engine import EngineFault
from fastllm.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body
from fastllm.serve.server_state import (
    ClosingStreamingResponse,
    MergedStreams,
    ServerState,
    check_model,
    max_tokens_for,
    prompt_token_ids,
    released_after,
    run_to_end,
    sse,
    started_streams,
    until_disconnected,
)

router = APIRouter()


def _prompt_list(prompt) -> list:
    """A completions `prompt` as a list of prompts (strings or token-id lists)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise ValueError("prompt must not be empty")
    return list(prompt)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion_logprobs(tokenizer, entries, token_ids) -> dict | None:
    """OpenAI's legacy logprobs object (tokens, token_logprobs, top_logprobs, text_offset) from the engine's
    per-token dicts. A token's text_offset is where it starts in the completion (the sum of the tokens' lengths
    before it, as vLLM counts without echo)."""
    if entries is None:
        return None
    decode = (lambda t: tokenizer.decode([t])) if tokenizer is not None else str
    tokens = [decode(t) for t in token_ids]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0)) if tokens else []
    return {"tokens": tokens, "token_logprobs": [e[t] for e, t in zip(entries, token_ids)],
            "top_logprobs": [{decode(k): v for k, v in e.items()} for e in entries], "text_offset": offsets}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state: ServerState = request.app.state.fastllm
    check_model(state, body.model)
    serving = state.serving
    if body.logprobs is not None and not 0 <= body.logprobs <= 5:
        raise ValueError(f"logprobs must be between 0 and 5, got {body.logprobs}")
    body.check_stream_fields(logprobs=body.logprobs is not None)
    prompts = [await prompt_token_ids(serving, p) for p in _prompt_list(body.prompt)]
    params = [body.sampling_params(max_tokens_for(serving, body.max_tokens, len(p)), body.logprobs) for p in prompts]
    request_id = serving.new_id("cmpl")
    created = int(time.time())
    admission = serving.admit(body.n * len(prompts))
    if body.stream:
        streams = await started_streams(request, admission, serving, prompts, params, request_id)
        stream = _stream_completions(streams, prompts, params, request_id, created, body.model, body.include_usage)
        return ClosingStreamingResponse(released_after(admission, _ending_with_error_event(stream)),
                                        media_type="text/event-stream")
    with admission:
        outputs = await until_disconnected(request, run_to_end(serving, prompts, params, request_id))
    choices, completion_tokens = [], 0
    for p, output in enumerate(outputs):
        for c in output.outputs:
            completion_tokens += len(c.token_ids)
            choices.append({"index": p * body.n + c.index, "text": c.text, "finish_reason": c.finish_reason,
                            "logprobs": _completion_logprobs(serving.tokenizer, c.logprobs, c.token_ids)})
    return {"id": request_id, "object": "text_completion", "created": created, "model": body.model,
            "choices": choices, "usage": _usage(sum(map(len, prompts)), completion_tokens)}


async def _ending_with_error_event(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """`stream`, or, if it fails once under way (its 200 sent), an error event in OpenAI's shape and `[DONE]`."""
    try:
        async for chunk in stream:
            yield chunk
    except EngineFault as error:
        logger.error("fastllm serve: a stream ended: %s", error)
        yield sse(error_body(error.client_message(), "engine_error"))
        yield "data: [DONE]\n\n"
    except Exception as error:
        logger.error("fastllm serve: a stream failed", exc_info=error)
        yield sse(error_body(f"internal server error ({type(error).__name__}); the server goes on", "server_error"))
        yield "data: [DONE]\n\n"
    finally:
        await stream.aclose()


async def _stream_completions(streams: MergedStreams, prompts, params, request_id: str, created: int, model: str,
                              include_usage: bool) -> AsyncIterator[str]:
    n = params[0].n
    totals = [0]
    async with contextlib.aclosing(streams):
        async for p, deltas, _ in streams:
            for d in deltas:
                totals[0] += len(d.token_ids)
                choice = {"index": p * n + d.index, "text": d.text, "finish_reason": d.finish_reason,
                          "logprobs": None}
                yield sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                           "choices": [choice]})
    if include_usage:
        yield sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                   "choices": [], "usage": _usage(sum(map(len, prompts)), totals[0])})
    yield "data: [DONE]\n\n"


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state: ServerState = request.app.state.fastllm
    check_model(state, body.model)
    serving = state.serving
    if body.top_logprobs is not None and (not body.logprobs or not 0 <= body.top_logprobs <= 20):
        raise ValueError("top_logprobs needs logprobs=true and must be between 0 and 20")
    body.check_stream_fields(logprobs=body.logprobs)
    prompt = await serving.tokenize_chat(body.chat())
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = body.sampling_params(max_tokens_for(serving, getattr(body, field), len(prompt), field),
                                  (body.top_logprobs or 0) if body.logprobs else None)
    request_id = serving.new_id("chatcmpl")
    created = int(time.time())
    admission = serving.admit(body.n)
    if body.stream:
        streams = await started_streams(request, admission, serving, [prompt], [params], request_id)
        stream = _stream_chat(streams, prompt, params, request_id, created, body.model, body.include_usage)
        return ClosingStreamingResponse(released_after(admission, _ending_with_error_event(stream)),
                                        media_type="text/event-stream")
    with admission:
        (output,) = await until_disconnected(request, run_to_end(serving, [prompt], [params], request_id))
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": _chat_logprobs(serving.tokenizer, c, body.top_logprobs or 0)}
               for c in output.outputs]
    return {"id": request_id, "object": "chat.completion", "created": created, "model": body.model,
            "choices": choices, "usage": _usage(len(prompt), sum(len(c.token_ids) for c in output.outputs))}


def _chat_logprobs(tokenizer, completion, top: int) -> dict | None:
    """OpenAI's chat logprobs: per token, its logprob and the `top` most likely tokens, most likely first. The
    engine's entry also holds the sampled token when it is not among them (the legacy completions format keeps it,
    the chat format does not)."""
    if completion.logprobs is None:
        return None
    content = []
    for entry, token in zip(completion.logprobs, completion.token_ids):
        most_likely = sorted(entry.items(), key=lambda item: item[1], reverse=True)[:top]
        content.append({"token": tokenizer.decode([token]), "logprob": entry[token],
                        "top_logprobs": [{"token": tokenizer.decode([t]), "logprob": v} for t, v in most_likely]})
    return {"content": content}


async def _stream_chat(streams: MergedStreams, prompt, params, request_id: str, created: int, model: str,
                       include_usage: bool) -> AsyncIterator[str]:
    head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                                   for i in range(params.n)]})
    generated = 0
    async with contextlib.aclosing(streams):
        async for _, deltas, _ in streams:
            for d in deltas:
                generated += len(d.token_ids)
                delta = {"content": d.text} if d.text else {}
                yield sse({**head, "choices": [{"index": d.index, "delta": delta,
                                                "finish_reason": d.finish_reason}]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": _usage(len(prompt), generated)})
    yield "data: [DONE]\n\n"


@router.get("/v1/models")
async def models(request: Request):
    state: ServerState = request.app.state.fastllm
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.started,
                                        "owned_by": "fastllm"}]}

