"""Fixes of 2026-12-03, one test per defect (found by a bug hunt over the engine API and the server):

- `LLM` matched stop strings against the text with special tokens spelled out, but returns (and streams) the text
  decoded with skip_special_tokens: a stop string whose pieces a special token separated was never caught, and the
  returned text held it (finish_reason "length"). `generate()` keeps matching the spelled-out text, as Hugging Face's
  StopStringCriteria does.
- Triton `generate` / `generate_stream`: a lone surrogate in `text_input` (or in a word list) was a 500 (the
  tokenizer's TypeError); now a 400 naming the input, as the OpenAI routes answer.
- OpenAI routes refused an explicit null for `n`, `stream` and chat `logprobs`, which OpenAI types "... or null"
  (null: the default).
- Chat `max_completion_tokens: 0` was refused with a message naming `max_tokens`.

Text tests run a tiny Llama over the demo tokenizer whose weights are rigged into a "chain" (its greedy next token is
a fixed function of the last one); server tests call the app in process through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from fastllm import LLM, SamplingParams
from fastllm.serve.engine import ServingEngine
from tests._models import build_over_demo_tokenizer, chain_model

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from fastllm.serve.app import build_app  # noqa: E402
from tests._server import tiny_model_dir  # noqa: E402

# --------------------------------------------------------------------------------- stop strings and special tokens


@pytest.fixture(scope="module")
def saved_over_demo_tokenizer(tmp_path_factory):
    return build_over_demo_tokenizer(tmp_path_factory.mktemp("special_chain"))


@pytest.fixture
def special_chain(saved_over_demo_tokenizer):
    """(model, tokenizer, a), a fresh model each test: greedy decoding from [a] gives <|im_start|> b a <|im_start|>
    b a ... (in text, with special tokens skipped: "baba...": the stop string "ab" is there, split by a special
    token)."""
    tokenizer, path = saved_over_demo_tokenizer
    a, b = (tokenizer(t, add_special_tokens=False).input_ids[0] for t in ("a", "b"))
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert special in tokenizer.all_special_ids
    return chain_model(path, {a: special, special: b, b: a}), tokenizer, a


def test_llm_stops_at_a_stop_string_that_a_special_token_splits(special_chain):
    model, tokenizer, a = special_chain
    llm = LLM(model, tokenizer=tokenizer, max_model_len=64)
    try:
        out = llm.generate([[a]], SamplingParams(max_tokens=8, temperature=0, stop=["ab"]), use_tqdm=False)[0]
    finally:
        llm.close()
    completion = out.outputs[0]
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    b = completion.token_ids[1]
    # Before the fix: 8 tokens, text "babab", finish_reason "length" (the raw text "<|im_start|>ba<|im_start|>b"
    # never holds "ab").
    assert completion.token_ids == [special, b, a, special, b]  # stopped at the token that completes "ab"
    assert completion.finish_reason == "stop"
    assert completion.text == "b"  # cut before the stop string, in the text returned
    assert tokenizer.decode(completion.token_ids, skip_special_tokens=True) == "bab"


def test_a_special_token_alone_completes_no_stop_string(special_chain):
    # The stop string is the special token's own spelling: with skip_special_tokens it is never in the text (as in
    # vLLM; stop_token_ids is how to stop at it), so the completion runs to its length.
    model, tokenizer, a = special_chain
    llm = LLM(model, tokenizer=tokenizer, max_model_len=64)
    try:
        out = llm.generate([[a]], SamplingParams(max_tokens=6, temperature=0, stop=["<|im_start|>"]),
                           use_tqdm=False)[0]
    finally:
        llm.close()
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 6
    assert out.outputs[0].text == "baba"


def test_generate_matches_stop_strings_as_hugging_face_does(special_chain, tmp_path):
    # Hugging Face's StopStringCriteria reads the vocabulary's token strings, special ones included: "ab" split by
    # <|im_start|> does not stop it, and "<|im_start|>b" does. generate() on the runtime stops where it stops.
    import fastllm

    model, tokenizer, a = special_chain
    ids = torch.tensor([[a]])
    kwargs = dict(max_new_tokens=7, do_sample=False, pad_token_id=0, eos_token_id=None, tokenizer=tokenizer)
    expected = {stop: model.generate(ids, stop_strings=[stop], **kwargs)[0].tolist()
                for stop in ("ab", "<|im_start|>b")}
    assert len(expected["ab"]) == 8 and len(expected["<|im_start|>b"]) == 3
    fastllm.optimize(model, cpu_runtime=True)
    try:
        for stop, tokens in expected.items():
            assert model.generate(ids, stop_strings=[stop], **kwargs)[0].tolist() == tokens, stop
    finally:
        fastllm.release(model)


# ----------------------------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    serving = ServingEngine(LLM(str(tiny_model_dir(tmp_path_factory.mktemp("server"))), dtype=torch.float32,
                                max_model_len=64), 8)
    yield build_app(serving, "tiny")
    serving.shutdown()


def _post(app, path: str, body: dict) -> httpx.Response:
    """POST `body` as JSON; json.dumps escapes a lone surrogate as JSON allows ("\\ud800"), where httpx's json=
    cannot encode it."""
    async def call():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"},
                                     timeout=60)

    return asyncio.run(call())


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
@pytest.mark.parametrize("field, value", [("text_input", "Hi \ud800"), ("bad_words", ["\udfff"]),
                                          ("stop_words", "x\ud800")])
def test_triton_generate_answers_400_for_a_lone_surrogate(app, route, field, value):
    body = {"text_input": "Hi", "max_tokens": 3, field: value}
    response = _post(app, f"/v2/models/tiny/{route}", body)
    assert response.status_code == 400, response.text  # was a 500 (the tokenizer's TypeError) for text_input
    assert field in response.json()["error"] and "lone surrogate" in response.json()["error"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
])
def test_openai_null_n_stream_and_logprobs_are_their_defaults(app, path, body):
    nulls = {"n": None, "stream": None, "logprobs": None}
    response = _post(app, path, {"model": "tiny", "max_tokens": 2, **body, **nulls})
    assert response.status_code == 200, response.text  # was 400 "n: Input should be a valid integer"
    answer = response.json()
    assert len(answer["choices"]) == 1 and answer["choices"][0]["logprobs"] is None
    assert answer["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_chat_max_tokens_error_names_the_field_given(app, field):
    response = _post(app, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                                   field: 0})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == f"{field} must be an integer >= 1, got 0"
    too_many = _post(app, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                                   field: 10_000})
    assert too_many.status_code == 400 and too_many.json()["error"]["message"].endswith(f"the prompt or {field}.")
