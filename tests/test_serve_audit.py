"""The server's OpenAI semantics and request checks that the other serve tests do not reach, in process.

The app (`build_app`) over a tiny random Llama with the demo tokenizer, called through httpx's ASGI transport: no
server process, so each test takes a fraction of a second.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import fastllm  # noqa: E402
from fastllm.serve.app import build_app  # noqa: E402
from fastllm.serve.engine import ServingEngine  # noqa: E402
from tests._server import tiny_model_dir  # noqa: E402

MAX_MODEL_LEN = 512
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("serve-audit"))
    serving = ServingEngine(fastllm.LLM(str(model_dir), dtype=torch.float32, max_model_len=MAX_MODEL_LEN), 8)
    yield serving
    serving.shutdown()


@pytest.fixture(scope="module")
def app(serving):
    return build_app(serving, "tiny")


def _post(app, path: str, body: dict) -> httpx.Response:
    async def call():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post(path, json=body, timeout=60)

    return asyncio.run(call())


def _completion(**fields) -> dict:
    return {"model": "tiny", "prompt": "hi", "max_tokens": 4, **fields}


def _chat(**fields) -> dict:
    return {"model": "tiny", "messages": HI, "max_tokens": 4, **fields}


def _events(response: httpx.Response) -> list:
    """A stream's events: the JSON ones, then "[DONE]"."""
    datas = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in datas]


def _refused(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert all(w in message for w in words), message


# -------------------------------------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", _completion(stream=True, logprobs=2)),
    ("/v1/chat/completions", _chat(stream=True, logprobs=True, top_logprobs=2)),
], ids=["completions", "chat"])
def test_logprobs_with_stream_are_refused_not_dropped(app, path, body):
    """A stream's chunks carry no logprobs (the engine process sends them only with the final output): asking for
    both was answered 200 with `"logprobs": null` in every chunk."""
    _refused(_post(app, path, body), "logprobs", "stream")


def test_chat_top_logprobs_lists_exactly_the_top_logprobs_most_likely(app):
    """OpenAI's top_logprobs holds the `top_logprobs` most likely tokens, most likely first ([] without it); the
    engine's entries also hold the sampled token, which showed up as one entry too many."""
    sampled = _post(app, "/v1/chat/completions", _chat(max_tokens=8, temperature=1.0, seed=0, logprobs=True,
                                                        top_logprobs=2)).json()
    content = sampled["choices"][0]["logprobs"]["content"]
    assert len(content) == 8
    for entry in content:
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(top) == 2 and top == sorted(top, reverse=True), entry
        assert entry["logprob"] <= top[0]
    plain = _post(app, "/v1/chat/completions", _chat(max_tokens=3, logprobs=True)).json()
    assert [e["top_logprobs"] for e in plain["choices"][0]["logprobs"]["content"]] == [[], [], []]


def test_completion_logprobs_have_one_text_offset_per_token(app):
    """text_offset was an empty list; OpenAI's (and vLLM's) has each token's character offset in the completion."""
    answer = _post(app, "/v1/completions", _completion(max_tokens=5, temperature=0, logprobs=1)).json()
    logprobs = answer["choices"][0]["logprobs"]
    tokens = logprobs["tokens"]
    assert len(tokens) == 5
    assert logprobs["text_offset"] == [sum(map(len, tokens[:i])) for i in range(5)]


# ------------------------------------------------------------------------------------------------- stream_options


@pytest.mark.parametrize("options, words", [
    ({"include_usage": "maybe"}, ("include_usage",)),
    ({"include_usage": [True]}, ("include_usage",)),
    ({"continuous_usage": True}, ("continuous_usage",)),
], ids=["string", "list", "unknown key"])
def test_stream_options_are_checked(app, options, words):
    """stream_options was any JSON object, read with `bool(...)`: {"include_usage": "maybe"} sent usage, an unknown
    key was ignored."""
    _refused(_post(app, "/v1/completions", _completion(stream=True, stream_options=options)), *words)


def test_stream_options_include_usage_false_sends_no_usage(app):
    events = _events(_post(app, "/v1/chat/completions", _chat(stream=True, stream_options={"include_usage": False})))
    assert events[-1] == "[DONE]" and not any("usage" in e for e in events[:-1])


def test_stream_options_without_stream_are_refused(app):
    """OpenAI answers 400: stream_options is only allowed with stream true."""
    _refused(_post(app, "/v1/completions", _completion(stream_options={"include_usage": True})), "stream_options",
             "stream")


# ------------------------------------------------------------------------------------------------- number types


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", _completion(max_tokens=True), "max_tokens"),
    ("/v1/completions", _completion(n=True), "n"),
    ("/v1/completions", _completion(temperature=True), "temperature"),
    ("/v1/completions", _completion(seed=False), "seed"),
    ("/v1/completions", _completion(logprobs=True), "logprobs"),
    ("/v1/completions", _completion(prompt=[True, 2]), "prompt"),
    ("/v1/chat/completions", _chat(max_completion_tokens=True), "max_completion_tokens"),
    ("/v1/chat/completions", _chat(top_p=True), "top_p"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith("/") else None)
def test_true_and_false_are_not_numbers(app, path, body, field):
    """JSON true was read as 1 (max_tokens=true ran 1 token, prompt [true, 2] ran token 1): a number field takes a
    number."""
    _refused(_post(app, path, body), field, "not true or false")


# --------------------------------------------------------------------------------------------------- chat template


def test_a_chat_the_template_refuses_is_a_400(app, serving, monkeypatch):
    """Templates of Llama 2, Mistral and Gemma raise on roles that do not alternate (or a system message): the
    TemplateError was a 500 "internal server error"; it is what the client sent."""
    monkeypatch.setattr(serving.tokenizer, "chat_template", "{% for m in messages %}{% if loop.index0 > 0 and "
                        "m.role == messages[loop.index0 - 1].role %}{{ raise_exception('Conversation roles must "
                        "alternate user/assistant/user/assistant/...') }}{% endif %}{{ m.content }}{% endfor %}")
    response = _post(app, "/v1/chat/completions", _chat(messages=HI + HI))
    _refused(response, "chat template", "Conversation roles must alternate")
    assert _post(app, "/v1/chat/completions", _chat()).status_code == 200


def test_a_message_name_reaches_the_chat_template(app, serving, monkeypatch):
    """A message's `name` (OpenAI: tells participants of one role apart) was accepted and dropped before the chat
    template rendered the prompt."""
    monkeypatch.setattr(serving.tokenizer, "chat_template",
                        "{% for m in messages %}{{ m.name ~ ': ' if m.name else '' }}{{ m.content }}\n{% endfor %}")
    named = [{"role": "user", "content": "hi", "name": "Alice Wonderland Smith"}]
    with_name = _post(app, "/v1/chat/completions", _chat(messages=named)).json()["usage"]["prompt_tokens"]
    without = _post(app, "/v1/chat/completions", _chat()).json()["usage"]["prompt_tokens"]
    assert with_name == len(serving.tokenizer("Alice Wonderland Smith: hi\n").input_ids) > without


# --------------------------------------------------------------------------------------------- lost requests


def test_a_refused_prompt_of_a_list_ends_the_others(app, serving):
    """One prompt of a completions list refused by the engine (a token id outside the vocabulary) answers 400 at
    once; the other prompts' requests ran on to max_tokens for nobody, outside admission control (the server had
    already given their slots back)."""
    vocab = len(serving.tokenizer)
    before = serving.metrics()["num_finished_requests"]

    async def refused_then_idle():
        # one event loop throughout: asyncio.run's exit would cancel what the request left running
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            response = await client.post("/v1/completions", json=_completion(
                prompt=[[1, 2, 3], [vocab]], max_tokens=400, min_tokens=400), timeout=60)
            _refused(response, "vocabulary")
            deadline = time.monotonic() + 5
            while serving.metrics()["num_running"] or serving.metrics()["kv_blocks_used"]:
                assert time.monotonic() < deadline, "the other prompt's request still runs"
                await asyncio.sleep(0.05)

    asyncio.run(refused_then_idle())
    assert serving.metrics()["num_finished_requests"] == before, "the other prompt's request ran to its end"
    assert serving.admitted == 0


# ------------------------------------------------------------------------------------------------ stop strings


def _joined(response: httpx.Response) -> dict[int, str]:
    """A completions stream's text per choice."""
    texts: dict[int, str] = {}
    for event in _events(response)[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


def test_a_stop_string_is_never_streamed_when_n_is_over_1(app):
    """With n > 1, a completion that reaches a stop string while the others run on ended in an update that was not
    the request's last: its stop string (and the rest of that token) was streamed, and the cut final text could not
    take it back."""
    body = _completion(prompt="Once upon", max_tokens=40, temperature=1.0, seed=8, n=2)
    first = _post(app, "/v1/completions", body).json()["choices"][0]["text"]
    stop = first[20:23]  # reached by choice 0 halfway; choice 1 (another seed) runs on
    whole = _post(app, "/v1/completions", {**body, "stop": [stop]}).json()["choices"]
    assert whole[0]["finish_reason"] == "stop" and whole[1]["text"] != whole[0]["text"]
    streamed = _joined(_post(app, "/v1/completions", {**body, "stop": [stop], "stream": True}))
    assert streamed == {c["index"]: c["text"] for c in whole}
    assert stop not in streamed[0]


def test_a_stop_string_that_min_tokens_lets_pass_is_streamed_in_full(app):
    """A stop string reached before min_tokens does not end the completion: the stream holds it back (it cannot tell)
    but sends it, and the rest, by the end: the streamed text is the whole answer's."""
    body = _completion(prompt="Once upon", max_tokens=30, temperature=1.0, seed=8)
    early = _post(app, "/v1/completions", body).json()["choices"][0]["text"][5:8]  # in the first few tokens
    whole = _post(app, "/v1/completions", {**body, "stop": [early], "min_tokens": 20}).json()["choices"][0]["text"]
    assert early in whole  # let pass
    streamed = _joined(_post(app, "/v1/completions", {**body, "stop": [early], "min_tokens": 20, "stream": True}))
    assert streamed == {0: whole}
