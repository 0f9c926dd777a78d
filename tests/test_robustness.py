"""Failures found by probing fastllm as a new user would (issue 10), each as a test: bad numbers are refused with a
message naming the field, one bad request fails alone, padding without a mask is inferred as HF does, and a stream
nobody reads any more is aborted."""

import asyncio
import math
import warnings

import pytest
import torch
import transformers as T

from fastllm import LLM, AsyncLLM, SamplingParams
from tests._models import VOCAB, build, optimize


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build("llama", path)
    return path


@pytest.fixture(scope="module")
def llm(path):
    return LLM(T.AutoModelForCausalLM.from_pretrained(path).eval())


@pytest.fixture(scope="module")
def models(path):
    """(optimized model, HF reference)."""
    return (optimize(T.AutoModelForCausalLM.from_pretrained(path).eval()),
            T.AutoModelForCausalLM.from_pretrained(path).eval())


def _no_leaks(llm) -> bool:
    pool = llm.runner.pool
    return pool.num_free_blocks == pool.num_blocks and not llm.has_work()


def test_a_seed_past_64_bits_fails_alone_and_the_engine_goes_on(llm):
    good = SamplingParams(max_tokens=10, temperature=0)
    outs = llm.generate([[1, 2, 3], [4, 5, 6]], [good, {"temperature": 1.0, "seed": 2**64}], use_tqdm=False)
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 10
    assert outs[1].error is not None and "prompt 1" in outs[1].error and "seed" in outs[1].error
    again = llm.generate([[1, 2, 3]], good, use_tqdm=False)[0]  # the next call works (it raised KeyError before)
    assert again.outputs[0].token_ids == outs[0].outputs[0].token_ids
    # The largest seed is accepted, and completion i = seed + i wraps instead of overflowing manual_seed.
    wrapped = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, seed=2**64 - 1, n=2), use_tqdm=False)[0]
    assert wrapped.error is None and [len(c.token_ids) for c in wrapped.outputs] == [3, 3]
    assert _no_leaks(llm)


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                   "frequency_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_nan_request_fails_alone_in_a_batch(llm):
    outs = llm.generate([[1, 2, 3], [4, 5, 6]], [SamplingParams(max_tokens=4), {"temperature": math.nan}],
                        use_tqdm=False)
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 4
    assert "temperature" in outs[1].error and outs[1].outputs[0].finish_reason == "abort"


def test_generate_refuses_a_nan_temperature_by_name(models):
    model, _ = models
    ids = torch.tensor([[1, 2, 3]])
    for kwargs in (dict(temperature=math.nan), dict(top_p=math.inf), dict(temperature=-1.0)):
        with pytest.raises(ValueError, match="temperature|top_p"):
            model.generate(ids, max_new_tokens=3, do_sample=True, pad_token_id=0, **kwargs)
    assert model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 6)  # still usable


def test_n_is_bounded_and_errors_name_the_prompt(llm):
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=10**6)
    outs = llm.generate([[1, 2], [3, 4], []], [SamplingParams(max_tokens=2), {"n": 10**9}, SamplingParams()],
                        use_tqdm=False)
    assert outs[0].error is None
    assert "prompt 1" in outs[1].error and "n must be" in outs[1].error
    assert "prompt 2" in outs[2].error and "empty prompt" in outs[2].error
    assert "'3:0'" not in outs[1].error + outs[2].error  # no internal ids


def test_left_padding_without_an_attention_mask_is_inferred_from_the_pad_token(models):
    """HF infers the mask from pad_token_id when none is given (with a warning); fastllm must not attend to pads."""
    model, reference = models
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    ids[1, :4] = 0  # left padding with the pad token (0 is not an EOS here)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
    with warnings.catch_warnings():  # HF warns that it inferred the mask
        warnings.simplefilter("ignore")
        expected = reference.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, **kwargs), expected)
    masked = model.generate(ids, attention_mask=(ids != 0).long(), **kwargs)
    assert torch.equal(masked, expected)


def test_a_stream_nobody_reads_is_aborted(llm):
    """A consumer that stops reading (a client that went away) aborts its request: blocks come back, the step loop
    does not run it to max_tokens."""
    engine = AsyncLLM(llm)
    generated: list[int] = []

    async def read_two_then_leave():
        stream = engine.generate([1, 2, 3], SamplingParams(max_tokens=5000, temperature=0, ignore_eos=True))
        async for update in stream:
            generated.extend(update.new_token_ids.get(0, []))
            if len(generated) >= 2:
                break
        await stream.aclose()

    async def cancelled():
        async def consume():
            async for _ in engine.generate([4, 5, 6], SamplingParams(max_tokens=5000, temperature=0,
                                                                     ignore_eos=True)):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(read_two_then_leave())
        asyncio.run(cancelled())
        for _ in range(200):  # the step thread aborts them between two steps
            if not llm.has_work():
                break
            asyncio.run(asyncio.sleep(0.05))
        metrics = llm.metrics()
    finally:
        engine.shutdown()
    assert _no_leaks(llm)
    assert metrics["num_generated_tokens"] < 5000  # neither ran to max_tokens
