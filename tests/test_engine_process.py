"""EngineClient: the engine core in a child process, streamed to the parent (CPU, tiny random Llama)."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time

import pytest
import transformers as T

from fastllm import LLM, SamplingParams
from fastllm.entrypoints.engine_process import EngineClient
from tests import _engine_builders
from tests._models import VOCAB, build

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build("llama", path)
    return str(path)


@pytest.fixture(scope="module")
def client(model_dir):
    client = EngineClient(functools.partial(_engine_builders.tiny_llm, model_dir))
    yield client
    client.shutdown()


def _prompts(n):
    return [[3 + (5 * i + j) % (VOCAB - 3) for j in range(3 + i % 7)] for i in range(n)]


async def _collect(client, prompt, params):
    tokens, last = [], None
    async for update in client.generate(prompt, params):
        tokens += update.new_token_ids.get(0, [])
        last = update
    return tokens, last


def test_concurrent_streams_equal_offline_llm(client, model_dir):
    prompts = _prompts(8)
    params = [SamplingParams(max_tokens=4 + i, **GREEDY) for i in range(8)]

    async def run():
        return await asyncio.gather(*(_collect(client, p, q) for p, q in zip(prompts, params)))

    streamed = asyncio.run(run())
    with LLM(T.AutoModelForCausalLM.from_pretrained(model_dir).eval()) as llm:
        expected = llm.generate(prompts, params, use_tqdm=False)
    for (tokens, last), want in zip(streamed, expected):
        assert tokens == want.outputs[0].token_ids
        assert last.finished and last.output.outputs[0].token_ids == tokens  # the whole output, at the end
        assert last.output.outputs[0].finish_reason == "length"
    assert client.max_num_seqs >= 1 and client.max_model_len > 0


def test_a_refused_request_ends_with_its_reason(client):
    async def run():
        return [u async for u in client.generate([VOCAB + 5], SamplingParams(max_tokens=3))]

    (update,) = asyncio.run(run())
    assert update.finished and "vocab" in update.output.error.lower()


def test_a_stream_left_early_is_aborted_and_frees_its_blocks(client):
    async def run():
        stream = client.generate([1, 2, 3], SamplingParams(max_tokens=100_000, **GREEDY))
        seen = 0
        async for update in stream:
            seen += len(update.new_token_ids.get(0, []))
            if seen >= 2:
                break
        await stream.aclose()

    aborted = client.metrics()["num_aborted_requests"]
    asyncio.run(run())
    deadline = time.monotonic() + 10
    while client.metrics()["num_aborted_requests"] == aborted and time.monotonic() < deadline:
        time.sleep(0.05)  # the child reports its counters once it goes idle
    metrics = client.metrics()
    assert metrics["num_aborted_requests"] == aborted + 1
    assert metrics["kv_blocks_used"] == 0 and metrics["num_running"] == 0


def test_duplicate_request_id_is_refused(client):
    async def run():
        first = client.generate([1, 2], SamplingParams(max_tokens=50, **GREEDY), request_id="same")
        await anext(first)
        with pytest.raises(ValueError, match="already streaming"):
            await anext(client.generate([1, 2], SamplingParams(max_tokens=2), request_id="same"))
        await first.aclose()

    asyncio.run(run())


def test_a_failed_build_raises_the_childs_error():
    with pytest.raises(ValueError, match="the builder refused"):
        EngineClient(_engine_builders.refusing_build)


def test_a_step_fault_fails_its_request_and_the_engine_goes_on(model_dir):
    client = EngineClient(functools.partial(_engine_builders.faulty_llm, model_dir))
    try:
        async def run():
            with pytest.raises(RuntimeError, match="injected fault"):
                await _collect(client, _engine_builders.FAULT_PROMPT, SamplingParams(max_tokens=4, **GREEDY))
            return await _collect(client, [1, 2, 3], SamplingParams(max_tokens=4, **GREEDY))

        tokens, last = asyncio.run(run())
        assert len(tokens) == 4 and last.finished and client.running
    finally:
        client.shutdown()


def test_a_dead_engine_fails_open_streams_and_stops_running(model_dir):
    client = EngineClient(functools.partial(_engine_builders.tiny_llm, model_dir))
    try:
        async def run():
            stream = client.generate([1, 2, 3], SamplingParams(max_tokens=100_000, **GREEDY))
            await anext(stream)
            os.kill(client._process.pid, signal.SIGKILL)
            with pytest.raises(RuntimeError, match="engine process died"):
                async for _ in stream:
                    pass

        asyncio.run(asyncio.wait_for(run(), 30))
        assert not client.running
        with pytest.raises(RuntimeError, match="engine process died"):
            asyncio.run(anext(client.generate([1], SamplingParams(max_tokens=1))))
    finally:
        client.shutdown()


def test_shutdown_ends_the_child(model_dir):
    client = EngineClient(functools.partial(_engine_builders.tiny_llm, model_dir))
    client.shutdown()
    assert not client.running and not client._process.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(anext(client.generate([1], SamplingParams(max_tokens=1))))


@pytest.mark.gpu
def test_on_cuda_streams_equal_an_in_process_llm(model_dir):
    """The engine process on the GPU (spawned: CUDA cannot be forked), CUDA graphs, fp32: greedy streams from 16
    concurrent requests equal the same LLM run in this process."""
    import torch

    prompts = _prompts(16)
    params = [SamplingParams(max_tokens=8 + i, **GREEDY) for i in range(16)]
    client = EngineClient(functools.partial(_engine_builders.tiny_llm_cuda, model_dir))
    try:
        async def run():
            return await asyncio.gather(*(_collect(client, p, q) for p, q in zip(prompts, params)))

        streamed = asyncio.run(run())
    finally:
        client.shutdown()
    model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to("cuda")
    with LLM(model) as llm:
        expected = llm.generate(prompts, params, use_tqdm=False)
    assert [tokens for tokens, _ in streamed] == [want.outputs[0].token_ids for want in expected]


def test_a_client_dropped_without_shutdown_stops_its_engine(model_dir):
    """Nothing of fastllm's keeps a client alive (its threads hold no strong reference): dropping it runs its
    finalizer, which stops the engine process and the model it holds. The finalizer runs in whichever thread lets
    go of the client last, at times the reader thread (it holds the client while handing over a message): then it
    reaps the process while this thread watches, and a join() here racing it can see the reaped child as alive
    (its waitpid finds nothing to wait for before the other thread records the exit code: seen once in CI). So
    this thread polls until the exit is recorded, within the same 15 s."""
    import gc
    import weakref

    client = EngineClient(functools.partial(_engine_builders.tiny_llm, model_dir))
    process, ref = client._process, weakref.ref(client)
    asyncio.run(_collect(client, [1, 2, 3], SamplingParams(max_tokens=2, **GREEDY)))
    del client
    gc.collect()
    assert ref() is None
    deadline = time.monotonic() + 15
    while process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process.is_alive()


def test_a_stream_never_sends_a_stop_string_and_its_deltas_make_the_final_text(tmp_path):
    """The child sends the core's text as it comes; the client holds back what may begin a stop string
    (StreamText, as AsyncLLM does), so a direct EngineClient user gets deltas that concatenate to the final text,
    which is cut before the stop string."""
    from tests._models import build_over_demo_tokenizer

    tokenizer, path = build_over_demo_tokenizer(tmp_path / "model")
    tokenizer.save_pretrained(path)
    prompt = tokenizer("The capital of France is")["input_ids"]
    with LLM(str(path)) as llm:
        free = llm.generate([prompt], SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)[0].outputs[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]  # a stop string the greedy text reaches half-way
    assert len(stop) == 3
    client = EngineClient(functools.partial(_engine_builders.tiny_llm, str(path), tokenizer=str(path)))
    try:
        async def run():
            pieces, last = [], None
            async for update in client.generate(prompt, SamplingParams(max_tokens=24, stop=[stop], **GREEDY)):
                pieces.append(update.new_text.get(0, ""))
                last = update
            return pieces, last

        pieces, last = asyncio.run(run())
    finally:
        client.shutdown()
    final = last.output.outputs[0]
    assert final.finish_reason == "stop" and final.text == free[:free.index(stop)]
    assert "".join(pieces) == final.text
    assert not any(stop in "".join(pieces[:i + 1]) for i in range(len(pieces)))
