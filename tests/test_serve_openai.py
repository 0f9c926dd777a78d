"""`fastllm serve` answers the `openai` client: completions, chat, streaming, the model list.

One real server process on 127.0.0.1 over a tiny random Llama with the demo model's tokenizer; every answer is
checked against `LLM.generate` of the same request in this process (same weights, same CPU runtime, so greedy and
seeded sampling give the same tokens).
"""

from __future__ import annotations

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import fastllm  # noqa: E402
from tests._server import running_server, tiny_model_dir  # noqa: E402

PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("serve-openai"))


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(model_dir):
    return fastllm.LLM(str(model_dir), dtype=torch.float32)


def _reference(llm, prompt, **params):
    """LLM.generate's output for one prompt: the completions' texts and finish reasons."""
    (output,) = llm.generate([prompt], fastllm.SamplingParams(**params), use_tqdm=False)
    return [c.text for c in output.outputs], [c.finish_reason for c in output.outputs]


def _chat_ids(llm, messages):
    return list(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))


def test_model_list_names_the_served_model(client, server):
    assert [m.id for m in client.models.list().data] == [server.model]


def test_greedy_completion_equals_llm_generate(client, server, llm):
    answer = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0)
    texts, reasons = _reference(llm, PROMPT, max_tokens=12, temperature=0)
    assert [c.text for c in answer.choices] == texts
    assert answer.choices[0].finish_reason == reasons[0] == "length"
    prompt_tokens = len(llm.tokenizer(PROMPT).input_ids)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, 12)


def test_token_id_prompts_and_prompt_lists_keep_openai_choice_order(client, server, llm):
    prompts = [PROMPT, "Once upon a time"]
    answer = client.completions.create(model=server.model, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in answer.choices] == [0, 1]
    assert [c.text for c in answer.choices] == [_reference(llm, p, max_tokens=6, temperature=0)[0][0]
                                                for p in prompts]
    ids = llm.tokenizer(PROMPT).input_ids
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == answer.choices[0].text


def test_seeded_sampling_with_n_equals_llm_generate(client, server, llm):
    answer = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0.9, top_p=0.95,
                                       n=3, seed=1234)
    texts, _ = _reference(llm, PROMPT, max_tokens=8, temperature=0.9, top_p=0.95, n=3, seed=1234)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert [c.text for c in answer.choices] == texts
    assert len(set(texts)) > 1, "three seeded samples of a random model should not all agree"


def test_stop_string_cuts_the_completion_like_llm(client, server, llm):
    full, _ = _reference(llm, PROMPT, max_tokens=16, temperature=0)
    stop = full[0][4:7]  # a piece of what greedy decoding produces, so the stop is reached
    answer = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    texts, reasons = _reference(llm, PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert answer.choices[0].text == texts[0] and stop not in texts[0]
    assert answer.choices[0].finish_reason == reasons[0] == "stop"


def test_streamed_completion_joins_to_the_whole_text(client, server, llm):
    full, _ = _reference(llm, PROMPT, max_tokens=16, temperature=0)
    stop = full[0][4:7]
    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=16, temperature=0,
                                            stop=[stop], stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _reference(llm, PROMPT, max_tokens=16, temperature=0, stop=[stop])[0][0]
    assert stop not in text, "a stop string was sent before the stream was cut"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_chat_uses_the_chat_template_and_equals_llm_generate(client, server, llm):
    answer = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=10, temperature=0)
    ids = _chat_ids(llm, MESSAGES)
    texts, reasons = _reference(llm, ids, max_tokens=10, temperature=0)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == texts[0]
    assert answer.choices[0].finish_reason == reasons[0]
    assert answer.usage.prompt_tokens == len(ids)


def test_streamed_chat_equals_the_whole_answer(client, server, llm):
    stream = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=10, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _reference(llm, _chat_ids(llm, MESSAGES), max_tokens=10, temperature=0)[0][0]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs_are_the_chosen_tokens_log_probabilities(client, server):
    answer = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    for token, chosen, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert chosen <= 0
        # greedy: the chosen token is the most likely one, so it leads the top list
        assert max(top.values()) == pytest.approx(chosen)
    chat = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(entry.top_logprobs) >= 1 for entry in content)


def test_errors_come_back_as_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=server.model, prompt=PROMPT, max_tokens=2, temperature=-1)
    assert server.healthy()


def test_metrics_count_the_requests_served(client, server):
    before = server.metric("fastllm_time_to_first_token_seconds_count")
    client.completions.create(model=server.model, prompt=PROMPT, max_tokens=3, temperature=0)
    client.completions.create(model=server.model, prompt=PROMPT, max_tokens=3, temperature=0, n=2)
    assert server.metric("fastllm_time_to_first_token_seconds_count") == before + 2  # one per request
    assert server.metric("fastllm_time_per_output_token_seconds_count") >= 2
    assert server.metric('fastllm_http_requests_total{route="/v1/completions",status="200"}') >= 2
    assert server.metric("fastllm_kv_blocks_used") == 0 and server.metric("fastllm_requests_admitted") == 0


def test_a_quantized_server_answers_as_the_quantized_llm(model_dir):
    """`fastllm serve --quantization int8`: the engine process quantizes the model it builds; greedy answers equal
    the same quantization run through LLM in this process."""
    with running_server(model_dir, "--quantization", "int8") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        answer = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0)
    with fastllm.LLM(str(model_dir), dtype=torch.float32, quantization="int8") as llm:
        texts, _ = _reference(llm, PROMPT, max_tokens=8, temperature=0)
    assert [c.text for c in answer.choices] == texts


def _engine_pid(server_pid: int) -> int:
    """The server's engine process: its multiprocessing 'spawn' child (not the resource tracker)."""
    import subprocess

    listing = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(server_pid)], capture_output=True,
                             text=True, check=True).stdout  # -ww: the whole command line, however wide
    (pid,) = [int(line.split()[0]) for line in listing.splitlines() if "spawn_main" in line]
    return pid


def test_a_dead_engine_makes_the_server_unhealthy_and_requests_fail_cleanly(model_dir):
    import os
    import signal
    import time

    import httpx

    with running_server(model_dir) as server:
        os.kill(_engine_pid(server.process.pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/health", timeout=5).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and health.json() == {"status": "engine not running"}
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code != 200
        answer = httpx.post(f"{server.url}/v1/completions", json={"model": server.model, "prompt": PROMPT,
                                                                 "max_tokens": 4}, timeout=10)
        assert 500 <= answer.status_code < 600 and "engine" in answer.text
        assert server.process.poll() is None  # the server itself is still up, answering
