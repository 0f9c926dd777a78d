"""generate() on the paged runtime: HF's arguments, outputs and errors, on tiny random-weight models."""

import warnings

import pytest
import torch
import transformers as T

import fastllm
from tests._models import VOCAB, build, build_over_demo_tokenizer, optimize


# Every test runs with the synchronous step loop and with async scheduling (tokens fed on the device, stop
# rules applied a step late): HF's outputs either way.
@pytest.fixture(scope="module", params=[False, True], ids=["sync_steps", "async_scheduling"])
def async_scheduling(request):
    return request.param


@pytest.fixture(scope="module")
def llama(tmp_path_factory, async_scheduling):
    """(optimized model, an identical unoptimized copy) sharing one saved checkpoint."""
    path = tmp_path_factory.mktemp("llama")
    build("llama", path)
    reference = T.AutoModelForCausalLM.from_pretrained(path).eval()
    optimized = optimize(T.AutoModelForCausalLM.from_pretrained(path).eval(),
                                 async_scheduling=async_scheduling)
    return optimized, reference


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0   # left padding
    ids[2, :1], mask[2, :1] = 0, 0
    return ids, mask


def _free_blocks_all_back(model):
    pool = model._fastllm_state.core.runner.pool
    return pool.num_free_blocks == pool.num_blocks


def test_runs_on_the_paged_runtime(llama):
    model, _ = llama
    state = model._fastllm_state
    assert state.core is not None and state.fallback_reason is None
    config = model.config
    assert len(state.core.runner.kv_shapes) == config.num_hidden_layers
    # The cache holds the KV heads once (not repeated per query head), and rotary moved into the cache write.
    assert state.core.runner.kv_shapes[0] == (config.num_key_value_heads, config.head_dim)
    graph = fastllm.explain(model).graph
    assert graph.matches["attention"] == config.num_hidden_layers
    assert "rotary_embedding" not in graph.fused_ops


@pytest.mark.parametrize("kwargs", [
    dict(max_new_tokens=7),
    dict(max_new_tokens=5, min_new_tokens=5, eos_token_id=[11, 12]),
    dict(max_new_tokens=6, num_return_sequences=2, do_sample=True, top_k=1),  # top-1 sampling is greedy
    dict(max_new_tokens=6, repetition_penalty=1.3),
])
def test_matches_hf_generate(llama, kwargs):
    model, reference = llama
    ids, mask = _batch()
    common = dict(attention_mask=mask, do_sample=False, pad_token_id=0) | kwargs
    expected = reference.generate(ids, **common)
    assert torch.equal(model.generate(ids, **common), expected)
    assert _free_blocks_all_back(model)


def test_eos_pads_the_rest_like_hf(llama):
    model, reference = llama
    ids, mask = _batch()
    # Make every row stop early: the eos ids are the tokens HF itself generates second.
    free_run = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    eos = sorted(set(free_run[:, ids.shape[1] + 1].tolist()))
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_return_dict_with_scores(llama):
    model, reference = llama
    ids, mask = _batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_scores=True)
    ours, theirs = model.generate(ids, **kwargs), reference.generate(ids, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert len(ours.scores) == len(theirs.scores)
    for a, b in zip(ours.scores, theirs.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_generation_config_object(llama):
    model, reference = llama
    ids, mask = _batch()
    config = T.GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, generation_config=config),
                       reference.generate(ids, attention_mask=mask, generation_config=config))


def test_seeded_sampling_is_reproducible(llama):
    model, _ = llama
    ids, mask = _batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                  min_p=0.05, pad_token_id=0)
    torch.manual_seed(123)
    first = model.generate(ids, **kwargs)
    torch.manual_seed(123)
    assert torch.equal(model.generate(ids, **kwargs), first)
    assert first[:, ids.shape[1]:].lt(VOCAB).all()


def test_unsupported_argument_falls_back_with_one_warning(llama):
    model, reference = llama
    ids = torch.tensor([[5, 6, 7, 8]])
    kwargs = dict(max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    with pytest.warns(RuntimeWarning, match="num_beams"):
        tokens = model.generate(ids, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.generate(ids, **kwargs)  # warned once
    assert torch.equal(tokens, reference.generate(ids, **kwargs))


@pytest.mark.parametrize("make_input,message", [
    (lambda: dict(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=0), "max_new_tokens"),
    (lambda: dict(input_ids=torch.tensor([[1, VOCAB + 5]]), max_new_tokens=2), "outside the vocabulary"),
    (lambda: dict(input_ids=torch.tensor([[1, 2], [0, 0]]), attention_mask=torch.tensor([[1, 1], [0, 0]]),
                  max_new_tokens=2), "empty"),
    (lambda: dict(input_ids=torch.ones(1, 5000, dtype=torch.long), max_new_tokens=2), "context"),
])
def test_bad_input_is_a_clear_error_and_the_model_stays_usable(llama, make_input, message):
    model, reference = llama
    with pytest.raises(ValueError, match=message):
        model.generate(**make_input(), do_sample=False, pad_token_id=0)
    assert _free_blocks_all_back(model)
    ids = torch.tensor([[4, 5, 6]])
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory, async_scheduling):
    """A tiny Llama over the demo model's real tokenizer, for stop strings and streamers."""
    tokenizer, path = build_over_demo_tokenizer(tmp_path_factory.mktemp("llama_tok"))
    reference = T.AutoModelForCausalLM.from_pretrained(path).eval()
    model = optimize(T.AutoModelForCausalLM.from_pretrained(path).eval(), async_scheduling=async_scheduling)
    return model, reference, tokenizer


def test_stop_strings(with_tokenizer):
    model, reference, tokenizer = with_tokenizer
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    free_run = reference.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(free_run[0, ids.shape[1]:])
    stop = text.strip()[4:7]  # a string the free run contains
    assert stop
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id, stop_strings=[stop],
                  tokenizer=tokenizer)
    ours = model.generate(ids, **kwargs)
    assert torch.equal(ours, reference.generate(ids, **kwargs))
    assert ours.shape[1] < free_run.shape[1]


def test_stop_strings_need_the_tokenizer(with_tokenizer):
    model, _, _ = with_tokenizer
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, stop_strings=["x"], pad_token_id=0)


def test_streamers(with_tokenizer):
    model, reference, tokenizer = with_tokenizer
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(reference.generate(ids, **kwargs)[0, ids.shape[1]:], skip_special_tokens=True)
    streamer = T.TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.generate(ids, streamer=streamer, **kwargs)
    assert "".join(streamer) == expected
    printed = []
    text_streamer = T.TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    text_streamer.on_finalized_text = lambda text, stream_end=False: printed.append(text)
    model.generate(ids, streamer=text_streamer, **kwargs)
    assert "".join(printed) == expected


def test_async_scheduling_records_steps_before_their_tokens(llama, async_scheduling, monkeypatch):
    """With async scheduling on, generate() launches steps before reading the last one's tokens."""
    from fastllm.runtime.scheduler import Scheduler

    model, reference = llama
    pending = []
    original = Scheduler.update_pending
    monkeypatch.setattr(Scheduler, "update_pending", lambda self, out: pending.append(out) or original(self, out))
    ids, mask = _batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    assert (len(pending) >= 6) == async_scheduling
    assert _free_blocks_all_back(model)
