"""LLM (the offline batch engine) on tiny random-weight models: batching, preemption and chunked prefill give
each request the tokens it gets alone; sampling parameters; bad requests fail alone; no KV block leaks."""

import random

import pytest
import torch
import transformers as T

from fastllm import LLM, SamplingParams
from fastllm.runtime.engine_core import bad_words_token_ids
from fastllm.runtime.sampler import RowContext, apply_penalties, banned_token_ids, sample_rows, sample_tokens
from tests._models import VOCAB, build, build_over_demo_tokenizer

NUM_REQUESTS = 50
EOS = [5, 17]  # some greedy runs of the tiny model hit these, so batches mix "stop" and "length"


def _no_leaks(llm: LLM) -> bool:
    pool = llm.runner.pool
    return pool.num_free_blocks == pool.num_blocks and not llm.scheduler.has_unfinished()


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    build("qwen2", path)
    return path


def _load(path):
    model = T.AutoModelForCausalLM.from_pretrained(path).eval()
    model.generation_config.eos_token_id = EOS
    return model


@pytest.fixture(scope="module")
def llm(qwen_path):
    # The synchronous step loop: `alone` is the reference the asynchronous-scheduling tests compare against.
    return LLM(_load(qwen_path), async_scheduling=False)


@pytest.fixture(scope="module")
def workload():
    """50 greedy requests: prompts of 3-40 tokens, max_tokens 1-20."""
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(3, 40))] for _ in range(NUM_REQUESTS)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 20)) for _ in range(NUM_REQUESTS)]
    return prompts, params


@pytest.fixture(scope="module")
def alone(llm, workload):
    """Each request's result when it runs by itself: (token_ids, finish_reason)."""
    prompts, params = workload
    return [_result(llm.generate([p], q, use_tqdm=False)[0]) for p, q in zip(prompts, params)]


def _result(out):
    assert out.error is None and out.finished and len(out.outputs) == 1
    return out.outputs[0].token_ids, out.outputs[0].finish_reason


def test_batch_equals_alone(llm, workload, alone):
    prompts, params = workload
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts  # input order
    assert [_result(o) for o in outs] == alone
    assert {reason for _, reason in alone} == {"stop", "length"}
    assert _no_leaks(llm)


def test_shuffled_arrival_order(llm, workload, alone):
    prompts, params = workload
    order = list(range(NUM_REQUESTS))
    random.Random(1).shuffle(order)
    outs = llm.generate([prompts[i] for i in order], [params[i] for i in order], use_tqdm=False)
    assert [_result(o) for o in outs] == [alone[i] for i in order]
    assert _no_leaks(llm)


@pytest.fixture(scope="module")
def small_cache_llm(qwen_path):
    # 192 slots: about three of the longest sequences (40 + 20 tokens), so a batch of 50 must preempt.
    return LLM(_load(qwen_path), num_kv_tokens=192)


def test_preemption_gives_the_same_tokens(small_cache_llm, workload, alone):
    prompts, params = workload
    outs = small_cache_llm.generate(prompts, params, use_tqdm=False)
    assert small_cache_llm.num_preemptions > 0
    assert small_cache_llm.metrics()["num_preemptions"] == small_cache_llm.num_preemptions
    assert [_result(o) for o in outs] == alone
    assert _no_leaks(small_cache_llm)


def test_chunked_prefill_gives_the_same_tokens(llm, workload, alone):
    prompts, params = workload
    chunked = LLM(llm.model, max_num_batched_tokens=16)  # same runner and cache, a 16-token step budget
    assert chunked.scheduler.max_num_batched_tokens == 16
    outs = chunked.generate(prompts, params, use_tqdm=False)
    assert [_result(o) for o in outs] == alone
    assert _no_leaks(chunked)


def test_prefix_caching_gives_the_same_tokens(llm, workload, alone):
    prompts, params = workload
    cached = LLM(llm.model, enable_prefix_caching=True)
    for _ in range(2):  # the second pass finds every full prompt block cached
        outs = cached.generate(prompts, params, use_tqdm=False)
        assert [_result(o) for o in outs] == alone
    assert cached.metrics()["prefix_cache_hits"] > 0
    assert _no_leaks(cached)


def test_seeded_sampling_ignores_batch_composition(llm, workload):
    prompts, _ = workload
    seeded = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=7, max_tokens=12, ignore_eos=True)
    first = llm.generate([prompts[0]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate([prompts[0]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=k, seed=s) for k, s in ((3, None), (15, 1), (9, None))]
    batch = llm.generate([prompts[1], prompts[2], prompts[0], prompts[3]], [others[0], others[1], seeded, others[2]],
                         use_tqdm=False)
    assert first == again == batch[2].outputs[0].token_ids
    assert len(first) == 12
    # n=2: completion i draws with seed + i, so completion 1 of seed 7 is seed 8 alone.
    two = llm.generate([prompts[0]], SamplingParams(**{**vars(seeded), "n": 2}), use_tqdm=False)[0]
    eight = llm.generate([prompts[0]], SamplingParams(**{**vars(seeded), "seed": 8}), use_tqdm=False)[0]
    assert [c.index for c in two.outputs] == [0, 1]
    assert two.outputs[0].token_ids == first and two.outputs[1].token_ids == eight.outputs[0].token_ids
    assert first != eight.outputs[0].token_ids
    assert _no_leaks(llm)


def test_bad_requests_fail_alone(small_cache_llm, workload, alone):
    prompts, params = workload
    mutated = SamplingParams(temperature=0)
    mutated.top_p = 1.5  # changed after validation: generate() validates again
    bad = [
        ([], params[0], "empty prompt"),
        ([1] * 200, params[0], "longer than max_model_len=192"),
        (prompts[0], {"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        (prompts[0], {"temperature": -1.0}, "temperature must be >= 0"),
        (prompts[0], mutated, "top_p must be in"),
        (prompts[0], {"no_such_field": 1}, "no_such_field"),
        ([VOCAB + 3, 1], params[0], "outside the vocabulary"),
        ("a string", params[0], "needs a tokenizer"),
        (prompts[0], SamplingParams(stop=["x"]), "stop need a tokenizer"),
        (None, params[0], "must be a string or a list of token ids"),
    ]
    batch_prompts, batch_params = list(prompts[:10]), list(params[:10])
    for i, (prompt, p, _) in enumerate(bad):  # interleaved with good requests
        batch_prompts.insert(2 * i + 1, prompt)
        batch_params.insert(2 * i + 1, p)
    outs = small_cache_llm.generate(batch_prompts, batch_params, use_tqdm=False)
    assert len(outs) == len(batch_prompts)
    for i, (_, _, message) in enumerate(bad):
        out = outs[2 * i + 1]
        assert out.error is not None and message in out.error, (message, out.error)
        assert [c.finish_reason for c in out.outputs] == ["abort"] and out.outputs[0].token_ids == []
    good = [o for j, o in enumerate(outs) if not (j % 2 == 1 and j < 2 * len(bad))]
    assert [_result(o) for o in good] == alone[:10]
    assert _no_leaks(small_cache_llm)


def test_metrics(llm, workload):
    prompts, params = workload
    before = llm.metrics()
    outs = llm.generate(prompts[:4], params[:4], use_tqdm=False)
    after = llm.metrics()
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert after["num_generated_tokens"] - before["num_generated_tokens"] == generated
    assert after["num_running"] == after["num_waiting"] == after["kv_blocks_used"] == 0
    assert after["kv_blocks_free"] == after["kv_blocks_total"]
    assert len(after["time_to_first_token_s"]) == len(before["time_to_first_token_s"]) + 4
    assert sum(after["time_to_first_token_histogram"]) == len(after["time_to_first_token_s"])
    # Every request needs at least one step per generated token after its first: the step loop counted them.
    longest = max(len(o.outputs[0].token_ids) for o in outs)
    assert after["num_steps"] - before["num_steps"] >= longest
    assert set(after["step_seconds"]) == {"schedule", "execute", "sample", "update"}
    busy = sum(after["step_seconds"].values())
    assert after["tokens_per_s"] == pytest.approx(after["num_generated_tokens"] / busy) and after["tokens_per_s"] > 0
    assert all(after["step_seconds"][k] > before["step_seconds"][k] for k in after["step_seconds"])
    for o in outs:
        m = o.metrics
        assert m.arrival_time <= m.first_token_time <= m.finish_time
        assert m.time_to_first_token >= 0
        assert (m.time_per_output_token is None) == (len(o.outputs[0].token_ids) < 2)


def test_max_tokens_none_runs_to_the_context(small_cache_llm):
    out = small_cache_llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                                   use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 192 - 3


# ---- sampling parameters, on a tiny Llama over the demo tokenizer -----------------------------------------


@pytest.fixture(scope="module")
def text_llm(tmp_path_factory):
    tokenizer, path = build_over_demo_tokenizer(tmp_path_factory.mktemp("llama_tok"))
    return LLM(T.AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer=tokenizer)


PROMPT = "The capital of France is"
GREEDY = dict(temperature=0, max_tokens=12, ignore_eos=True)


def _greedy(llm, **kwargs):
    return llm.generate(PROMPT, SamplingParams(**(GREEDY | kwargs)), use_tqdm=False)[0]


def test_string_prompts_and_text(text_llm):
    out = _greedy(text_llm)
    assert out.prompt == PROMPT and out.prompt_token_ids == text_llm.tokenizer(PROMPT).input_ids
    assert out.outputs[0].text == text_llm.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 12
    with_bar = text_llm.generate([PROMPT], SamplingParams(**GREEDY), use_tqdm=True)[0]  # the default
    assert with_bar.outputs[0].token_ids == out.outputs[0].token_ids


def test_stop_strings_cut_the_text(text_llm):
    free = _greedy(text_llm).outputs[0]
    stop = free.text.strip()[4:7]
    assert stop
    out = _greedy(text_llm, stop=[stop, "never appears \x00"]).outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:free.text.find(stop)]
    assert out.token_ids == free.token_ids[:len(out.token_ids)]
    assert stop in text_llm.tokenizer.decode(out.token_ids)  # the tokens that spelled it are kept


def test_stop_token_ids_eos_ignore_eos_min_tokens(text_llm):
    free = _greedy(text_llm).outputs[0].token_ids
    i = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    stop_id = free[i]
    out = _greedy(text_llm, stop_token_ids=[stop_id]).outputs[0]
    assert out.token_ids == free[:i + 1] and out.finish_reason == "stop"
    # The same token as the model's EOS: stops, unless ignore_eos; min_tokens masks it until then.
    model = text_llm.model
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stop_id
    try:
        eos_llm = LLM(model, tokenizer=text_llm.tokenizer)
    finally:
        model.generation_config.eos_token_id = saved
    assert _greedy(eos_llm, ignore_eos=False).outputs[0].token_ids == free[:i + 1]
    assert _greedy(eos_llm, ignore_eos=True).outputs[0].token_ids == free
    at_least = _greedy(eos_llm, ignore_eos=False, min_tokens=i + 2).outputs[0].token_ids
    assert at_least[:i] == free[:i] and stop_id not in at_least[:i + 2] and len(at_least) >= i + 2
    assert _no_leaks(text_llm)


def test_stop_ids_outside_the_vocabulary_are_harmless(llm, workload, alone):
    prompts, params = workload
    p = SamplingParams(**{**vars(params[0]), "stop_token_ids": [VOCAB + 10], "min_tokens": 1})
    assert alone[0][0][0] not in EOS  # so masking EOS for the first token changes nothing
    assert _result(llm.generate([prompts[0]], p, use_tqdm=False)[0]) == alone[0]


def test_n_completions(text_llm):
    out = text_llm.generate([PROMPT, "Hello"], SamplingParams(n=3, max_tokens=5, seed=1), use_tqdm=False)
    assert [len(o.outputs) for o in out] == [3, 3]
    assert [c.index for c in out[0].outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out[0].outputs}) > 1  # independent samples
    assert all(len(c.token_ids) == 5 for o in out for c in o.outputs)


def test_logprobs_are_the_raw_distribution(text_llm):
    out = _greedy(text_llm, max_tokens=4, logprobs=3).outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 4
    ids = text_llm.tokenizer(PROMPT).input_ids
    for t, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert len(entry) == 3 and token in entry  # the greedy token is one of the top 3
        reference = text_llm.model(torch.tensor([ids + out.token_ids[:t]])).logits[0, -1].float().log_softmax(-1)
        assert entry[token] == max(entry.values())
        torch.testing.assert_close(torch.tensor(entry[token]), reference.max(), rtol=1e-4, atol=1e-4)
        assert sorted(entry) == sorted(reference.topk(3).indices.tolist())
    sampled = text_llm.generate(PROMPT, SamplingParams(max_tokens=3, logprobs=0, seed=0), use_tqdm=False)[0]
    assert [len(e) for e in sampled.outputs[0].logprobs] == [1, 1, 1]


def test_penalties_match_a_hand_computed_reference(text_llm):
    free = _greedy(text_llm, max_tokens=16).outputs[0].token_ids
    assert len(set(free)) < len(free), "the free run should repeat a token for penalties to matter"
    params = dict(presence_penalty=1.5, frequency_penalty=1.0, repetition_penalty=1.3, max_tokens=16)
    out = _greedy(text_llm, **params).outputs[0].token_ids
    assert out != free
    ids = text_llm.tokenizer(PROMPT).input_ids
    for t in range(len(out)):  # each step is the argmax of the penalized scores of its history
        logits = text_llm.model(torch.tensor([ids + out[:t]])).logits[0, -1].float()
        for token in set(ids + out[:t]):
            logits[token] = logits[token] / 1.3 if logits[token] > 0 else logits[token] * 1.3
        for token in set(out[:t]):
            logits[token] -= 1.5 + 1.0 * out[:t].count(token)
        assert logits.argmax().item() == out[t]


def test_bad_words(text_llm):
    free = _greedy(text_llm).outputs[0]
    word = text_llm.tokenizer.decode(free.token_ids[:1]).strip()
    assert word
    banned = bad_words_token_ids([word], text_llm.tokenizer)
    out = _greedy(text_llm, bad_words=[word]).outputs[0]
    singles = {ids[0] for ids in banned if len(ids) == 1}
    assert singles and not singles & set(out.token_ids)
    assert out.token_ids[0] != free.token_ids[0]


# ---- sampler units --------------------------------------------------------------------------------------


def test_penalties_on_one_row():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    row = RowContext(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
                     prompt_token_ids=[0, 1], output_token_ids=[3, 3, 4])
    # repetition over {0, 1, 3, 4}: /2 if > 0 else *2; then output counts {3: 2, 4: 1}: -(0.5 + 0.25 * count).
    expected = torch.tensor([1.0, -2.0, 0.5, 1.5 - 1.0, -4.0 - 0.75, 1.0])
    torch.testing.assert_close(apply_penalties(logits.clone(), row), expected)
    greedy = RowContext(SamplingParams(temperature=0, presence_penalty=2.0), [0], [3])
    assert sample_rows(logits[None], [greedy]).token_ids == [0]  # 3.0 - 2.0 < 2.0


def test_bad_words_and_min_tokens_masks():
    row = RowContext(SamplingParams(), [1, 2], [7, 8], bad_words_token_ids=[[4], [8, 9], [2, 5], [6, 8, 3]],
                     masked_token_ids=frozenset({11}))
    assert sorted(banned_token_ids(row)) == [4, 9, 11]
    row = RowContext(SamplingParams(), [6], [8], bad_words_token_ids=[[6, 8, 3]])  # prefix spans the prompt
    assert banned_token_ids(row) == [3]


def test_top_k_top_p_min_p_keep_only_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    rows = [RowContext(SamplingParams(top_k=2, seed=s), [0], []) for s in range(1)]
    rows += [RowContext(SamplingParams(top_p=0.7, seed=1), [0], []), RowContext(SamplingParams(min_p=0.5), [0], [])]
    for _ in range(20):
        tokens = sample_rows(logits, rows).token_ids
        assert tokens[0] in (0, 1) and tokens[1] in (0, 1) and tokens[2] in (0, 1)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(min_tokens=-1), "min_tokens"), (dict(n=0), "n"),
    (dict(min_tokens=5, max_tokens=3), "min_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.1), "top_p"), (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(seed=1.5), "seed"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(bad_words="word"), "bad_words"),
    (dict(logprobs=-1), "logprobs"), (dict(ignore_eos=1), "ignore_eos"), (dict(max_tokens=True), "max_tokens"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        SamplingParams(**kwargs)


def test_sampling_params_defaults():
    p = SamplingParams(stop="###")
    assert p.stop == ["###"] and p.max_tokens == 16 and p.temperature == 1.0 and p.top_k == 0 and p.n == 1
    assert SamplingParams(top_k=-1).top_k == -1


def test_already_optimized_model_rejects_optimize_options(llm):
    with pytest.raises(ValueError, match="num_kv_tokens must be given to fastllm.optimize"):
        LLM(llm.model, num_kv_tokens=64)


def test_from_a_path(qwen_path, workload, alone):
    prompts, params = workload
    # No tokenizer saved there: token ids in, no text out.
    llm = LLM(str(qwen_path), dtype=torch.float32, device="cpu", num_kv_tokens=128)
    llm.model.generation_config.eos_token_id = EOS
    llm.eos_token_ids = frozenset(EOS)
    assert llm.tokenizer is None and llm.runner.max_model_len == 128
    outs = llm.generate(prompts[:5], params[:5], use_tqdm=False)
    assert [_result(o) for o in outs] == alone[:5] and outs[0].outputs[0].text == ""


# ---- asynchronous scheduling: the host schedules a step ahead, tokens reach the next step on the device -----


@pytest.mark.parametrize("budget, kv_tokens", [(8192, None), (16, None), (8192, 192)])
def test_async_scheduling_gives_the_same_tokens(qwen_path, llm, workload, alone, budget, kv_tokens):
    """Plain, chunked-prefill and preempting batches: every request's tokens and finish reason equal running
    it alone synchronously (greedy stops on EOS detected a step late, whose wasted step must not leak)."""
    prompts, params = workload
    engine = (LLM(llm.model, max_num_batched_tokens=budget, async_scheduling=True) if kv_tokens is None else
              LLM(_load(qwen_path), num_kv_tokens=kv_tokens, async_scheduling=True))
    assert engine.async_scheduling
    before = engine.metrics()  # the model's engine core counts every caller's work: compare differences
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [_result(o) for o in outs] == alone
    if kv_tokens is not None:
        assert engine.num_preemptions > 0
    metrics = engine.metrics()
    assert metrics["num_generated_tokens"] - before["num_generated_tokens"] == sum(len(t) for t, _ in alone)
    overlapped = metrics["num_overlapped_steps"] - before["num_overlapped_steps"]
    assert 0 < overlapped <= metrics["num_steps"] - before["num_steps"]
    assert _no_leaks(engine) and not engine.has_work()


def test_async_scheduling_mixed_sampling_parameters(llm, workload):
    """Rows that need their history on the host (penalties, logprobs) make their step wait; seeded rows still
    reproduce; stop strings and min_tokens hold."""
    prompts, _ = workload
    params = [SamplingParams(temperature=1.0, seed=3, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=9, repetition_penalty=1.5),
              SamplingParams(temperature=0, max_tokens=7, logprobs=2),
              SamplingParams(temperature=0, max_tokens=12, min_tokens=6)]
    sync = llm.generate(prompts[:4], params, use_tqdm=False)
    engine = LLM(llm.model, async_scheduling=True)
    before = engine.metrics()
    outs = engine.generate(prompts[:4], params, use_tqdm=False)
    for a, b in zip(outs, sync):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
    assert [list(d) for d in outs[2].outputs[0].logprobs] == [list(d) for d in sync[2].outputs[0].logprobs]
    metrics = engine.metrics()  # the penalty and logprob rows made some steps wait; the rest overlapped
    overlapped = metrics["num_overlapped_steps"] - before["num_overlapped_steps"]
    assert 0 < overlapped < metrics["num_steps"] - before["num_steps"]
    assert _no_leaks(engine)


def test_plain_greedy_steps_skip_the_per_row_sampler(llm, workload, alone, monkeypatch):
    """A step whose rows are all plain greedy ones takes the argmax of its logits without the per-row sampler
    (engine_core.PLAIN_ROWS_FAST_PATH): the same tokens as the per-row path; a row with min_tokens (its EOS masked
    for a while) or a penalty in the batch sends the step down the per-row path."""
    from fastllm.runtime import engine_core

    calls = []
    monkeypatch.setattr(engine_core, "sample_tokens", lambda *a, **k: calls.append(1) or sample_tokens(*a, **k))
    prompts, params = workload
    engine = LLM(llm.model, async_scheduling=True)
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [_result(o) for o in outs] == alone and not calls  # every step greedy and plain: no per-row sampling
    monkeypatch.setattr(engine_core, "PLAIN_ROWS_FAST_PATH", False)
    assert [_result(o) for o in engine.generate(prompts, params, use_tqdm=False)] == alone and calls
    monkeypatch.setattr(engine_core, "PLAIN_ROWS_FAST_PATH", True)
    calls.clear()
    mixed = [*params[:3], SamplingParams(temperature=0, max_tokens=12, min_tokens=6)]
    sync = llm.generate(prompts[:4], mixed, use_tqdm=False)
    assert [_result(o) for o in engine.generate(prompts[:4], mixed, use_tqdm=False)] == [_result(o) for o in sync]
    assert calls
    assert _no_leaks(engine)


def test_async_scheduling_with_prefix_caching(llm, workload, alone):
    prompts, params = workload
    cached = LLM(llm.model, enable_prefix_caching=True, async_scheduling=True)
    for _ in range(2):  # the second pass finds every full prompt block cached
        outs = cached.generate(prompts, params, use_tqdm=False)
        assert [_result(o) for o in outs] == alone
    metrics = cached.metrics()
    assert metrics["prefix_cache_hits"] > 0 and metrics["num_overlapped_steps"] > 0
    assert _no_leaks(cached)
