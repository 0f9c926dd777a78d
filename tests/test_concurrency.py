"""One model, many callers: `model.generate()`, `model(...)`, `LLM` and `AsyncLLM` share the model's engine core,
alternately and from several threads at once, and every caller gets what it gets alone."""

import asyncio
import threading

import pytest
import torch
import transformers as T

from fastllm import LLM, AsyncLLM, SamplingParams
from tests._models import VOCAB, build, optimize

ROUNDS = 4


@pytest.fixture(scope="module", params=[False, True], ids=["sync_steps", "async_scheduling"])
def models(tmp_path_factory, request):
    """(optimized model, an LLM over it, the HF reference model)."""
    path = tmp_path_factory.mktemp("llama")
    build("llama", path)
    reference = T.AutoModelForCausalLM.from_pretrained(path).eval()
    model = optimize(T.AutoModelForCausalLM.from_pretrained(path).eval(), async_scheduling=request.param)
    return model, LLM(model), reference


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    return ids, mask


GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
PROMPTS = [[3 + (5 * i + j) % (VOCAB - 3) for j in range(3 + i)] for i in range(5)]
PARAMS = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)


def _llm_tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def _no_leaks(model) -> bool:
    core = model._fastllm_state.core
    return core.runner.pool.num_free_blocks == core.runner.pool.num_blocks and not core.has_work()


def test_generate_and_llm_alternately(models):
    model, llm, reference = models
    alone = _llm_tokens(llm)
    for seed in range(3):
        ids, mask = _batch(seed)
        assert torch.equal(model.generate(ids, attention_mask=mask, **GEN),
                           reference.generate(ids, attention_mask=mask, **GEN))
        assert _llm_tokens(llm) == alone
        with torch.no_grad():
            expected = reference(ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], expected[real], rtol=1e-5, atol=1e-5)
    assert _no_leaks(model)


def test_generate_llm_and_forward_from_threads_at_once(models):
    """Three threads call generate(), LLM.generate() and model(...) ROUNDS times each, all at once: every result
    equals the one computed alone (the core's lock serializes steps and batches the threads' requests together)."""
    model, llm, reference = models
    batches = [_batch(10 + r) for r in range(ROUNDS)]
    expected_generate = [reference.generate(ids, attention_mask=mask, **GEN) for ids, mask in batches]
    with torch.no_grad():
        expected_logits = [reference(ids, attention_mask=mask).logits for ids, mask in batches]
    expected_llm = _llm_tokens(llm)
    results: dict[str, list] = {"generate": [], "llm": [], "forward": []}
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def run(name, fn):
        try:
            start.wait()
            for r in range(ROUNDS):
                results[name].append(fn(r))
        except BaseException as error:  # reported below: a thread's exception would otherwise vanish
            errors.append(error)

    threads = [
        threading.Thread(target=run, args=("generate", lambda r: model.generate(
            batches[r][0], attention_mask=batches[r][1], **GEN))),
        threading.Thread(target=run, args=("llm", lambda r: _llm_tokens(llm))),
        threading.Thread(target=run, args=("forward", lambda r: model(
            batches[r][0], attention_mask=batches[r][1]).logits)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert all(torch.equal(a, b) for a, b in zip(results["generate"], expected_generate, strict=True))
    assert results["llm"] == [expected_llm] * ROUNDS
    for (ids, mask), got, expected in zip(batches, results["forward"], expected_logits, strict=True):
        real = mask.bool()
        torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    assert _no_leaks(model)


def test_async_streams_beside_generate(models):
    """An AsyncLLM streams while another thread calls generate(): both get their own tokens."""
    model, llm, reference = models
    engine = AsyncLLM(llm)
    ids, mask = _batch(99)
    expected = reference.generate(ids, attention_mask=mask, **GEN)
    alone = _llm_tokens(llm)
    got: list = []
    thread = threading.Thread(target=lambda: got.append(model.generate(ids, attention_mask=mask, **GEN)))

    async def stream_all():
        async def one(prompt):
            tokens = []
            async for update in engine.generate(prompt, PARAMS):
                tokens += update.new_token_ids.get(0, [])
            return tokens

        thread.start()
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    try:
        streamed = asyncio.run(stream_all())
        thread.join(timeout=300)
    finally:
        engine.shutdown()
    assert streamed == alone
    assert len(got) == 1 and torch.equal(got[0], expected)
    assert _no_leaks(model)
