"""The in-flight batching runtime under the conditions an audit found mishandled: request ids reused while a step is
in flight, a KV cache that cannot grow, a failed step under asynchronous scheduling, AsyncLLM shut down while a request
is being handed to its stream. Tiny random-weight Qwen2 models; every test checks that the KV blocks all come back."""

import asyncio
import time

import pytest
import torch
import transformers as T

from fastllm import LLM, AsyncLLM, SamplingParams
from tests._models import build, optimize

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
MAX_STEPS = 100  # a bounded loop: a request that would never finish fails the test instead of hanging it


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_audit")
    build("qwen2", path)
    return path


def _load(path):
    return T.AutoModelForCausalLM.from_pretrained(path).eval()


def _no_leaks(core) -> bool:
    pool = core.runner.pool
    return pool.num_free_blocks == pool.num_blocks and not core.has_work()


def _step_until(core, done) -> None:
    for _ in range(MAX_STEPS):
        if done():
            return
        core.step()
    raise AssertionError(f"not finished after {MAX_STEPS} steps")


def _alone(model, prompt, params=GREEDY) -> list[int]:
    """The tokens of `prompt` run by itself on the synchronous step loop (the reference)."""
    out = LLM(model, async_scheduling=False).generate([prompt], params, use_tqdm=False)[0]
    assert out.error is None
    return out.outputs[0].token_ids


def test_a_request_id_reused_while_its_aborted_step_is_in_flight(qwen_path):
    """A caller aborts request "a" while its step is in flight and adds a new "a" at once (a retry): the tokens of the
    old step must not end the new request, which used to lose its bookkeeping and never finish (each later step then
    failed every request it ran)."""
    model = _load(qwen_path)
    prompt = [1, 2, 3, 4]
    expected = _alone(model, prompt)
    core = LLM(model, async_scheduling=True).core
    before = core.metrics()
    old = core.add(prompt, GREEDY, request_id="a")
    core.step()
    core.step()
    assert core._overlap.inflight is not None  # the old request's step is in flight
    assert core.abort("a")
    new = core.add(prompt, GREEDY, request_id="a")
    _step_until(core, lambda: new.finished)
    assert new.output.error is None
    assert new.output.outputs[0].token_ids == expected and new.output.outputs[0].finish_reason == "length"
    assert old.output.outputs[0].finish_reason == "abort"
    after = core.metrics()
    assert after["num_aborted_requests"] - before["num_aborted_requests"] == 1
    assert after["num_finished_requests"] - before["num_finished_requests"] == 1
    assert _no_leaks(core)


def test_generated_request_ids_skip_ids_callers_picked(qwen_path):
    """A caller's own request id that equals the core's next counter id must not get a later caller's request
    refused ("already in the scheduler")."""
    llm = LLM(_load(qwen_path), async_scheduling=False)
    core = llm.core
    taken = str(int(core.new_request_id()) + 1)  # the id the next request without one would get
    mine = core.add([5, 6, 7], GREEDY, request_id=taken)
    out = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]
    assert out.error is None and out.request_id != taken
    assert out.outputs[0].token_ids == _alone(llm.model, [1, 2, 3])
    _step_until(core, lambda: mine.finished)
    assert mine.output.error is None and _no_leaks(core)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_request_the_cache_cannot_grow_for_fails_alone(qwen_path, async_scheduling):
    """When the device has no memory for the KV cache to grow into, a request longer than the cache holds now must
    end with an error saying so (model.generate used to step forever), and the requests around it must run."""
    model = optimize(_load(qwen_path), async_scheduling=async_scheduling)
    core = model._fastllm_state.engine()
    pool = core.runner.pool
    assert pool.num_blocks < pool.max_num_blocks  # a cache that may grow, ...
    pool._grow = lambda target: pool.num_blocks  # ... on a device that has no memory left for it
    small = core.add([1, 2, 3], GREEDY)
    big = core.add([7] * (pool.num_blocks * pool.block_size + 5), GREEDY)
    later = core.add([4, 5, 6], GREEDY)
    _step_until(core, lambda: small.finished and big.finished and later.finished)
    assert "could not grow" in big.output.error and big.fault is None
    assert [c.finish_reason for c in big.output.outputs] == ["abort"]
    for request in (small, later):
        assert request.output.error is None and request.output.outputs[0].finish_reason == "length"
    assert _no_leaks(core)
    with pytest.raises(RuntimeError, match="could not grow"):  # model.generate says why instead of hanging
        model.generate(torch.tensor([[7] * (pool.num_blocks * pool.block_size + 5)]), max_new_tokens=2,
                       do_sample=False)
    assert _no_leaks(core)


def test_a_request_preempted_in_a_failed_async_step_goes_on(qwen_path):
    """Asynchronous scheduling: a step fails (here its model call raises) after its scheduling preempted a request
    whose token was still in flight. The failed step's requests end with the error; the preempted one, which it did
    not run, must complete with its own tokens (it used to fail next step with a TypeError, ending every request
    that step ran)."""
    model = _load(qwen_path)
    a_prompt, b_prompt = list(range(1, 16)), list(range(20, 34))
    llm = LLM(model, num_kv_tokens=32, async_scheduling=False)  # 2 blocks: A's second block preempts B
    expected = _alone(model, b_prompt)
    core = LLM(model, async_scheduling=True).core
    execute, calls = core.runner.execute, []

    def execute_failing_third_step(chunks, feed_rows=None):
        calls.append([c.request.request_id for c in chunks])
        if len(calls) == 3:
            raise RuntimeError("injected fault")
        return execute(chunks, feed_rows)

    core.runner.execute = execute_failing_third_step
    a = core.add(a_prompt, GREEDY)
    b = core.add(b_prompt, GREEDY)
    _step_until(core, lambda: a.finished and b.finished)
    assert calls[2] == [a.completions[0].request.request_id]  # B was preempted for the step that failed
    assert "injected fault" in a.output.error
    assert b.output.error is None and b.output.outputs[0].token_ids == expected
    assert llm.num_preemptions > 0 and _no_leaks(core)


def test_shutdown_aborts_a_request_whose_stream_has_not_heard_back_yet(qwen_path):
    """AsyncLLM.shutdown() right after the step thread added a request, before the event loop delivered it to its
    stream: the request must be aborted and its stream end, not keep its KV blocks with no thread to step it (its
    stream then waited forever)."""
    llm = LLM(_load(qwen_path), async_scheduling=False)
    core, engine = llm.core, AsyncLLM(llm)

    async def main():
        stream = engine.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the stream hands its request to the step thread ...
        deadline = time.monotonic() + 30
        while not core.has_work() and time.monotonic() < deadline:  # ... which adds it; the loop is not told yet
            time.sleep(0.001)
        engine.shutdown()
        updates = [await asyncio.wait_for(first, 10)]

        async def rest():
            async for update in stream:
                updates.append(update)

        await asyncio.wait_for(rest(), 10)
        return updates

    updates = asyncio.run(main())
    assert updates[-1].finished and updates[-1].output.outputs[0].finish_reason == "abort"
    assert _no_leaks(core)
