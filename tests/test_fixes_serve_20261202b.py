"""Fixes of 2026-12-02 (b), one test per defect:

- `AsyncLLM` streams: a delta's `new_text` held stop strings, and a last character the tokens left incomplete was
  never sent, so a stream's deltas did not join to the final `text` (the server held text back itself; direct AsyncLLM
  users got neither). Now `StreamText` does it for both, once.
- OpenAI chat: the role "developer" (newer clients send it for "system") and an assistant message with
  `"content": null` (OpenAI's own answer for a tool-call turn, sent back as history) were refused with 400.

Text tests run a tiny Llama over the demo tokenizer whose weights are rigged into a "chain" (its greedy next token is
a fixed function of the last one), so the generated text is known exactly; Hugging Face's greedy generate checks the
rigging. Chat tests call the app in process through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from fastllm import LLM, AsyncLLM, SamplingParams
from fastllm.entrypoints.async_llm import StreamOutput, StreamText
from fastllm.serve.engine import ServingEngine
from tests._models import build_over_demo_tokenizer, chain_model

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from fastllm.serve.app import build_app  # noqa: E402
from tests._server import tiny_model_dir  # noqa: E402

# ---------------------------------------------------------------------------------------------- the chain model


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return build_over_demo_tokenizer(tmp_path_factory.mktemp("llama_tok"))


def _chained(tok_path, ids: list[int]):
    """(model, first): greedy decoding from [first] generates `ids`, then repeats its last token."""
    tokenizer, path = tok_path
    first = tokenizer("x", add_special_tokens=False).input_ids[0]
    chain = {}
    for a, b in zip([first, *ids], [*ids, ids[-1]]):
        assert chain.get(a, b) == b, "the tokens must not repeat (but for the last)"
        chain[a] = b
    model = chain_model(path, chain)
    hf = model.generate(torch.tensor([[first]]), max_new_tokens=len(ids) + 1, do_sample=False, eos_token_id=None,
                        pad_token_id=0)
    assert hf[0, 1:].tolist() == ids + [ids[-1]]
    return model, first


@pytest.fixture(scope="module")
def paris(tok_path):
    """An AsyncLLM whose model says " Paris is nice in spring" (one token a step), its prompt and the tokens."""
    tokenizer, _ = tok_path
    ids = tokenizer(" Paris is nice in spring", add_special_tokens=False).input_ids
    model, first = _chained(tok_path, ids)
    engine = AsyncLLM(LLM(model, tokenizer=tokenizer))
    yield engine, [first], ids
    engine.shutdown()


@pytest.fixture(scope="module")
def wide_char(tok_path):
    """An AsyncLLM whose model spells U+20000 with four byte tokens (F0 A0 80 80), then repeats the byte 80."""
    tokenizer, _ = tok_path
    ids = tokenizer("\U00020000", add_special_tokens=False).input_ids
    assert len(ids) == 4 and ids[-1] == ids[-2]
    # the chain cannot hold 80 -> 80 and 80 -> (its next) at once: first -> F0 -> A0 -> 80 -> 80 -> 80 ...
    model, first = _chained(tok_path, ids[:3])
    engine = AsyncLLM(LLM(model, tokenizer=tokenizer))
    yield engine, [first], ids
    engine.shutdown()


def _stream(engine, prompt, params) -> tuple[list[StreamOutput], list[str]]:
    """The request's updates and the text of each (completion 0)."""
    async def run():
        return [u async for u in engine.generate(prompt, params)]

    updates = asyncio.run(run())
    return updates, [u.new_text.get(0, "") for u in updates]


# ------------------------------------------------------------------------------------------- AsyncLLM's streams


@pytest.mark.parametrize("stop", [" is", ["in spring", " is nice"]])
def test_async_llm_deltas_never_hold_a_stop_string_and_join_to_the_text(paris, stop):
    # Symptom: the deltas held the stop string (" Paris is" for stop " is") while the final text was " Paris": a
    # client printing the deltas showed text the answer does not have.
    engine, prompt, _ = paris
    updates, texts = _stream(engine, prompt, SamplingParams(temperature=0, max_tokens=10, stop=stop))
    final = updates[-1].output.outputs[0]
    assert (final.text, final.finish_reason) == (" Paris", "stop")
    assert "".join(texts) == final.text
    assert not any(s in t for t in texts for s in ([stop] if isinstance(stop, str) else stop))


def test_async_llm_holds_back_a_stop_strings_beginning_only_until_it_is_settled(paris, tok_path):
    # " Paris" may begin the stop string "Paris!" and " is" may begin " isn't": each waits for the next text, which
    # settles that it does not, and then goes out; text that cannot begin one is not held at all.
    engine, prompt, ids = paris
    stops = ["Paris!", " isn't"]
    updates, texts = _stream(engine, prompt, SamplingParams(temperature=0, max_tokens=len(ids), stop=stops))
    _check_held_back(tok_path[0], stops, [(u.new_token_ids.get(0, []), t) for u, t in zip(updates[:-1], texts)])
    assert "".join(texts) == updates[-1].output.outputs[0].text == " Paris is nice in spring"


def _check_held_back(tokenizer, stops, chunks) -> None:
    """Mid-stream, after each chunk (its tokens, its text), what was sent is the tokens' text but for its longest end
    that is a proper beginning of a stop string: that much is held back, no more (updates merge when the reader falls
    behind, so which chunks come is timing's; this holds for any)."""
    tokens, sent = [], ""
    for new_tokens, text in chunks:
        tokens += new_tokens
        sent += text
        decoded = tokenizer.decode(tokens)
        held = max((k for stop in stops for k in range(len(stop)) if decoded.endswith(stop[:k])), default=0)
        assert sent == decoded[:len(decoded) - held], (sent, decoded)


@pytest.mark.parametrize("max_tokens, text", [
    (2, "\ufffd"),                     # F0 A0: the character never completes; the final text spells it U+FFFD
    (4, "\U00020000"),                 # the whole character, once its fourth byte came
    (5, "\U00020000\ufffd"),           # and a stray continuation byte after it
])
def test_async_llm_sends_an_incomplete_last_character_at_the_end(wide_char, max_tokens, text):
    # Symptom: a character still incomplete when the request ended was never sent (the detokenizer holds it back
    # until it completes), so the deltas joined to "" where the final text was "\ufffd".
    engine, prompt, ids = wide_char
    updates, texts = _stream(engine, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    assert updates[-1].output.outputs[0].text == text
    assert "".join(texts) == text
    # mid-stream no half character goes out: U+FFFD only in what the end sends
    assert not any("\ufffd" in t for t in texts[:-1])


def test_stream_text_with_n_completions_sends_each_cut_text_at_the_end():
    # With n > 1 a completion that stopped ends in an update that is not the request's last, its raw text holding the
    # stop string; nothing of it from there on goes out until the request's end sends the cut text.
    from fastllm.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput, RequestUpdate

    text = StreamText(SamplingParams(n=2, stop=["STOP"]))
    sent = {0: "", 1: ""}
    for raw in ({0: "ab", 1: "a"}, {0: "cST", 1: "b"}, {0: "OPxy", 1: "ST"}, {1: "OPz"}):
        for i, t in text.step(RequestUpdate("r", {i: [1] for i in raw}, raw)).items():
            sent[i] += t
            assert "STOP" not in sent[i]
    assert sent == {0: "abc", 1: "ab"}
    out = RequestOutput("r", None, [], [CompletionOutput(0, "abc", [1] * 3, "stop"),
                                        CompletionOutput(1, "abSTOPz", [1] * 4, "length")], True, RequestMetrics(0.0))
    for i, t in text.step(RequestUpdate("r", {}, {}, True, out)).items():
        sent[i] += t
    assert sent == {0: "abc", 1: "abSTOPz"}  # completion 1 ran past "STOP" (min_tokens would let it): sent late


# -------------------------------------------------------------------------------- the server's one hold-back


class _RawEngine:
    """Stands in for EngineClient: streams the core's text as it comes (stop strings included), as the engine process
    does, stepping the core on the event loop's thread."""

    def __init__(self, llm: LLM) -> None:
        self.llm, self.tokenizer = llm, llm.tokenizer
        self.max_num_seqs, self.max_model_len, self.running = llm.scheduler.max_num_seqs, llm.core.max_model_len, True

    async def generate(self, prompt, params, *, request_id=None):
        # The core is shared with the fixture's AsyncLLM, whose step thread may step this request too (and finish it
        # between two of these steps): the stream ends at the update that says finished, not when the request does,
        # or that last update would be lost.
        updates, finished = [], False
        self.llm.add_request(prompt, params, listener=updates.append, request_id=request_id)
        while not finished:
            self.llm.core.step()
            while updates:
                u = updates.pop(0)
                finished = u.finished
                yield StreamOutput(u.request_id, u.new_token_ids, u.finished, u.output if u.finished else None,
                                   u.new_text)
            await asyncio.sleep(0)

    def shutdown(self) -> None:
        pass


@pytest.mark.parametrize("raw", [False, True], ids=["async_llm", "engine_process"])
def test_the_server_holds_text_back_once(paris, tok_path, raw):
    # The server held text back itself; over AsyncLLM (which now does) it must not hold it back twice, and over the
    # engine process (whose streams bring the core's raw text) it holds it back with the same code.
    engine, prompt, ids = paris
    stops = ["Paris!", " isn't"]
    params = SamplingParams(temperature=0, max_tokens=len(ids), stop=stops)
    serving = ServingEngine(_RawEngine(engine.llm) if raw else engine, 4)

    async def run():
        return [deltas async for deltas, _ in serving.stream(prompt, params, serving.new_id("t"))]

    chunks = asyncio.run(run())
    _check_held_back(tok_path[0], stops, [(d.token_ids, d.text) for chunk in chunks[:-1] for d in chunk])
    assert "".join(d.text for chunk in chunks for d in chunk) == " Paris is nice in spring"
    assert chunks[-1][-1].finish_reason == "length"


# ------------------------------------------------------------------------------------------------------- chat


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    serving = ServingEngine(LLM(str(tiny_model_dir(tmp_path_factory.mktemp("chat"))), dtype=torch.float32,
                                max_model_len=512), 8)
    yield serving
    serving.shutdown()


@pytest.fixture(scope="module")
def app(serving):
    return build_app(serving, "tiny")


def _chat(app, messages, **fields) -> httpx.Response:
    async def call():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/v1/chat/completions", timeout=60,
                                     json={"model": "tiny", "messages": messages, "max_tokens": 2, **fields})

    return asyncio.run(call())


def _prompt_tokens(serving, messages) -> int:
    return len(serving.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False))


def test_a_developer_message_is_the_chat_templates_system_message(app, serving):
    # Symptom: 400 "messages.0.role: Input should be 'system', 'user' or 'assistant'" for what newer OpenAI clients
    # send. Given to SmolLM2's template as it is, it would render "<|im_start|>developer" after the template's
    # default system prompt, which a "system" first message replaces.
    user = {"role": "user", "content": "Name a colour."}
    expected = _prompt_tokens(serving, [{"role": "system", "content": "Be terse."}, user])
    messages = [{"role": "developer", "content": "Be terse."}, user]
    response = _chat(app, messages)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == expected
    response = _chat(app, messages, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200, response.text
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["usage"]["prompt_tokens"] == expected
    as_is = _prompt_tokens(serving, [{"role": "developer", "content": "Be terse."}, user])
    as_system = _prompt_tokens(serving, [{"role": "system", "content": "Be terse."}, user])
    assert as_is != as_system  # the check above tells the two apart


def test_a_template_that_knows_the_developer_role_gets_it(app, serving, monkeypatch):
    # gpt-oss's template names "developer" itself: it gets the role as sent, not folded into "system".
    template = "{% for m in messages %}{{ 'D' if m.role == 'developer' else m.role }}: {{ m.content }}\n{% endfor %}"
    monkeypatch.setattr(serving.tokenizer, "chat_template", template)
    response = _chat(app, [{"role": "developer", "content": "hi"}])
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(serving.tokenizer("D: hi\n").input_ids)


@pytest.mark.parametrize("assistant", [{"role": "assistant", "content": None}, {"role": "assistant"}],
                         ids=["null", "missing"])
def test_an_assistant_message_without_content_is_empty_text(app, serving, assistant):
    # Symptom: 400 "messages.1.content: Input should be a valid string" for the history OpenAI clients send back
    # after a tool-call turn (OpenAI answers it with `"content": null`).
    messages = [{"role": "user", "content": "hi"}, assistant, {"role": "user", "content": "and?"}]
    response = _chat(app, messages)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == _prompt_tokens(
        serving, [messages[0], {"role": "assistant", "content": ""}, messages[2]])


@pytest.mark.parametrize("message, words", [
    ({"role": "user", "content": None}, ["messages.0", "user message needs content"]),
    ({"role": "developer"}, ["messages.0", "developer message needs content"]),
    ({"role": "system", "content": None}, ["messages.0", "system message needs content"]),
    ({"role": "tool", "content": "x"}, ["messages.0.role", "'developer'"]),
    ({"role": "assistant", "content": 5}, ["messages.0.content"]),
])
def test_other_messages_without_text_are_still_refused(app, message, words):
    response = _chat(app, [message])
    assert response.status_code == 400, response.text
    text = response.json()["error"]["message"]
    assert all(w in text for w in words), text


def test_an_assistant_message_sent_back_as_openai_returned_it_is_taken(app, serving):
    # openai-python's message objects carry refusal / tool_calls / function_call / audio / annotations, null when
    # unused; a client that appends them to its history sent fields this server refused as unknown (400).
    returned = {"role": "assistant", "content": "Paris.", "refusal": None, "tool_calls": None, "function_call": None,
                "audio": None, "annotations": None}
    messages = [{"role": "user", "content": "hi"}, returned, {"role": "user", "content": "and?"}]
    response = _chat(app, messages)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == _prompt_tokens(
        serving, [messages[0], {"role": "assistant", "content": "Paris."}, messages[2]])


def test_a_tool_call_or_refusal_with_a_value_is_refused_by_name(app):
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    response = _chat(app, [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": None, "tool_calls": calls}])
    assert response.status_code == 400, response.text
    text = response.json()["error"]["message"]
    assert "tool_calls" in text and "not supported" in text, text
