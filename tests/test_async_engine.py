"""AsyncLLM: concurrent streamed requests on one background step loop (CPU, tiny random Llama)."""

import asyncio
import threading

import pytest
import transformers as T

from fastllm import LLM, AsyncLLM, SamplingParams
from tests._models import VOCAB, build

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=[False, True], ids=["sync_steps", "async_scheduling"])
def engine(tmp_path_factory, request):
    path = tmp_path_factory.mktemp("llama")
    build("llama", path)
    llm = LLM(T.AutoModelForCausalLM.from_pretrained(path).eval(), async_scheduling=request.param)
    engine = AsyncLLM(llm)
    yield engine
    engine.shutdown()


async def _collect(engine, prompt, params):
    tokens, updates, last = [], 0, None
    async for update in engine.generate(prompt, params):
        tokens += update.new_token_ids.get(0, [])
        updates += 1
        last = update
    return tokens, updates, last


def _prompts(n):
    return [[3 + (7 * i + j) % (VOCAB - 3) for j in range(4 + i % 9)] for i in range(n)]


def test_concurrent_streams_match_each_request_alone(engine):
    prompts = _prompts(6)
    params = [SamplingParams(max_tokens=3 + i, **GREEDY) for i in range(6)]

    async def run_all():
        return await asyncio.gather(*(_collect(engine, p, sp) for p, sp in zip(prompts, params)))

    results = asyncio.run(run_all())
    for prompt, sp, (tokens, updates, last) in zip(prompts, params, results):
        # The engine is idle now: the reference runs the request alone on the same LLM (its engine core serves
        # this thread and the step thread alike).
        alone = engine.llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
        assert tokens == alone == last.output.outputs[0].token_ids
        assert updates > 1 and last.finished and last.output.outputs[0].finish_reason == "length"
    pool = engine.llm.runner.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_a_reader_that_falls_behind_gets_the_missed_steps_in_one_update(engine):
    """While the reader sleeps the step thread runs on; the updates queued meanwhile come as one (the tokens in
    order, the finish once), so a slow server falls behind by fewer yields, not more."""
    prompt, params = _prompts(1)[0], SamplingParams(max_tokens=24, **GREEDY)

    async def slow_reader():
        tokens, updates = [], 0
        async for update in engine.generate(prompt, params):
            if updates == 0:
                await asyncio.sleep(1.0)  # the tiny model runs every remaining step meanwhile
            tokens += update.new_token_ids.get(0, [])
            updates += 1
            last = update
        return tokens, updates, last

    tokens, updates, last = asyncio.run(slow_reader())
    assert tokens == engine.llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert len(tokens) == 24 and updates < 24 and last.finished


def test_the_event_loop_never_waits_for_the_core_lock(engine, monkeypatch):
    """Adding a request takes the core's lock, which a running step holds for its whole length: the streams hand
    their requests to the step thread, so the event loop (and every stream a server writes) is never blocked."""
    from fastllm.runtime.engine_core import FairLock

    takers = set()

    class Recording(FairLock):
        def __enter__(self):
            takers.add(threading.get_ident())
            return super().__enter__()

    monkeypatch.setattr(engine.core, "_lock", Recording())

    async def run_all():
        loop_thread = threading.get_ident()
        prompts = _prompts(8)
        await asyncio.gather(*(_collect(engine, p, SamplingParams(max_tokens=4, **GREEDY)) for p in prompts))
        return loop_thread

    loop_thread = asyncio.run(run_all())
    assert takers and loop_thread not in takers


def test_a_stream_closed_before_its_request_was_added_leaves_nothing_running(engine):
    async def open_and_drop():
        stream = engine.generate(_prompts(1)[0], SamplingParams(max_tokens=50, **GREEDY))
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # handed to the step thread, not yet added
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.5)  # the step thread adds it, sees the stream gone, aborts it

    asyncio.run(open_and_drop())
    pool = engine.llm.runner.pool
    assert not engine.core.has_work() and pool.num_free_blocks == pool.num_blocks


def test_abort_mid_flight_frees_blocks(engine):
    async def run():
        stream = engine.generate(_prompts(1)[0], SamplingParams(max_tokens=500, **GREEDY))
        first = await stream.__anext__()
        engine.abort(first.request_id)
        rest = [u async for u in stream]
        return first, rest

    first, rest = asyncio.run(run())
    final = (rest or [first])[-1]
    assert final.finished and final.output.outputs[0].finish_reason == "abort"
    assert len(final.output.outputs[0].token_ids) < 500
    pool = engine.llm.runner.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_bad_request_fails_alone(engine):
    async def run():
        bad = _collect(engine, [], SamplingParams(max_tokens=4))
        good = _collect(engine, _prompts(1)[0], SamplingParams(max_tokens=4, **GREEDY))
        return await asyncio.gather(bad, good)

    (_, _, bad), (good_tokens, _, good) = asyncio.run(run())
    assert bad.finished and bad.output.error and "empty" in bad.output.error
    assert good.output.error is None and len(good_tokens) == 4


def test_requests_after_shutdown_fail_clearly(engine):
    stopped = AsyncLLM(engine.llm)
    stopped.shutdown()

    async def run():
        return [u async for u in stopped.generate(_prompts(1)[0], SamplingParams(max_tokens=2, **GREEDY))]

    with pytest.raises(RuntimeError, match="step loop is not running"):
        asyncio.run(run())
    with pytest.raises(RuntimeError, match="step loop is not running"):
        stopped.abort("0")
