"""Defects found by a bug hunt of Hugging Face compatibility on the CPU (2026-12-02): an optimized model against an
unoptimized copy with the same weights, call by call. Each test asserts what Hugging Face does, with the symptom
fastllm showed before its fix."""

import contextlib
import copy

import pytest
import torch
import transformers as T

from tests._models import VOCAB, build, optimize


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(optimized model on fastllm's runtime, HF reference with the same weights)."""
    path = tmp_path_factory.mktemp("qwen2")
    build("qwen2", path)
    return (optimize(T.AutoModelForCausalLM.from_pretrained(path).eval()),
            T.AutoModelForCausalLM.from_pretrained(path).eval())


def _batch():
    """Three prompts, two of them left-padded with 0."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    ids[2, :1], mask[2, :1] = 0, 0
    return ids, mask


@contextlib.contextmanager
def _bos(models, bos):
    """Both models' generation_config.bos_token_id set to `bos` for the block."""
    old = [m.generation_config.bos_token_id for m in models]
    try:
        for m in models:
            m.generation_config.bos_token_id = bos
        yield
    finally:
        for m, value in zip(models, old):
            m.generation_config.bos_token_id = value


def _same(ours, theirs):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (ours.dtype, ours.shape, theirs.dtype,
                                                                       theirs.shape)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_eos_token_id_as_a_tensor_pads_with_its_first_id(models):
    # With pad_token_id unset HF pads with the first EOS id; a tensor of several EOS ids crashed the output's assembly
    # with "ValueError: only one element tensors can be converted to Python scalars"
    fast, hf = models
    ids, mask = _batch()
    free_run = hf.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    eos = torch.tensor(sorted(set(free_run[:, ids.shape[1] + 1].tolist())) + [VOCAB - 1])  # rows stop early
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=None)
    expected = hf.generate(ids, **kwargs)
    assert (expected[:, -1] == eos[0]).any()  # some row was padded
    _same(fast.generate(ids, **kwargs), expected)


def test_int32_input_ids_give_int64_sequences_as_hf(models):
    # HF appends its int64 next tokens to the prompt (torch.cat promotes): the sequences are int64. fastllm returned
    # them in the prompt's int32
    fast, hf = models
    ids, mask = _batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    expected = hf.generate(ids.int(), **kwargs)
    assert expected.dtype == torch.long
    _same(fast.generate(ids.int(), **kwargs), expected)
    out = fast.generate(ids.int(), return_dict_in_generate=True, **kwargs)
    _same(out.sequences, expected)


@pytest.mark.parametrize("kwargs", [dict(), dict(bos_token_id=5)])
def test_generate_without_a_prompt_starts_from_bos_as_hf(models, kwargs):
    # HF starts from [[bos_token_id]] when no input_ids are given; fastllm raised "input_ids must be an integer tensor
    # of shape [batch, length]"
    fast, hf = models
    common = dict(max_new_tokens=4, do_sample=False, pad_token_id=0) | kwargs
    with _bos(models, 1):
        expected = hf.generate(**common)
        assert expected.shape == (1, 5) and expected[0, 0].item() == kwargs.get("bos_token_id", 1)
        _same(fast.generate(**common), expected)


def test_generate_without_a_prompt_or_bos_is_refused_as_hf(models):
    with _bos(models, None):
        for m in reversed(models):  # fastllm's message was "input_ids must be an integer tensor of shape [batch, ...]"
            with pytest.raises(ValueError, match="bos_token_id` has to be defined"):
                m.generate(max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_inputs_and_input_ids_together_are_refused_as_hf(models):
    # HF refuses a prompt given twice; fastllm silently generated from `inputs` and dropped input_ids=
    fast, hf = models
    ids = torch.tensor([[5, 6, 7]])
    for m in (hf, fast):
        with pytest.raises(ValueError, match="were passed alongside input_ids"):
            m.generate(ids, input_ids=ids + 1, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_forward_return_dict_false_gives_a_tuple(models):
    # HF's forward returns a tuple with return_dict=False (the logits first); fastllm's compiled step ignored it and
    # returned a CausalLMOutputWithPast: `logits, = model(ids, return_dict=False, use_cache=False)` raised
    fast, hf = models
    ids = torch.tensor([[5, 6, 7, 8]])
    routes = fast._fastllm_state.forward_routes["compiled"]
    ours, theirs = fast(ids, return_dict=False, use_cache=False), hf(ids, return_dict=False, use_cache=False)
    assert fast._fastllm_state.forward_routes["compiled"] == routes + 1  # still the compiled step
    assert type(ours) is tuple and len(ours) == len(theirs) == 1
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=1e-4)
    assert type(fast(ids, return_dict=False)) is tuple  # with the default use_cache too (HF adds its cache after)


def test_a_negative_top_k_is_refused_as_hf_does(models):
    # HF refuses top_k=-1 when sampling ("`top_k` has to be a strictly positive integer"); fastllm took it as vLLM's
    # "off" and sampled from the whole vocabulary
    fast, hf = models
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="top_k"):
        hf.generate(ids, max_new_tokens=2, do_sample=True, top_k=-1, pad_token_id=0)
    with pytest.raises(ValueError, match="invalid generation argument: top_k"):
        fast.generate(ids, max_new_tokens=2, do_sample=True, top_k=-1, pad_token_id=0)


def test_top_p_above_one_filters_nothing_as_hf(models):
    # HF applies top-p only below 1: top_p=1.5 samples as top_p=1. fastllm refused the call ("top_p must be in (0, 1]")
    fast, hf = models
    ids, mask = _batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=3, pad_token_id=0,
                  return_dict_in_generate=True, output_scores=True)
    torch.manual_seed(0)
    expected = hf.generate(ids, top_p=1.5, **kwargs)
    torch.manual_seed(0)
    ours = fast.generate(ids, top_p=1.5, **kwargs)
    assert ours.scores[0].isfinite().sum(-1).tolist() == expected.scores[0].isfinite().sum(-1).tolist() == [3, 3, 3]
    torch.testing.assert_close(ours.scores[0], expected.scores[0], rtol=1e-4, atol=1e-4)


def test_a_prompt_filling_the_positions_without_a_length_is_named(models):
    # No length given: HF's 20 new tokens are capped at max_position_embeddings, which this prompt fills; the message
    # was HF's "`max_new_tokens` must be greater than 0, but is 0." for a call that gave no max_new_tokens
    fast, _ = models
    ids = torch.ones(1, fast.config.max_position_embeddings, dtype=torch.long)
    with pytest.raises(ValueError, match=f"prompt of {ids.shape[1]} tokens leaves no room.*max_position_embeddings"):
        fast.generate(ids, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("cpu_runtime", [True, False])
def test_a_deep_copy_runs_its_own_weights(tmp_path, cpu_runtime):
    # copy.deepcopy(optimized model) copied fastllm's forward/generate closures: the copy ran the ORIGINAL's weights
    # (HF's path on the CPU: a copy whose weights were changed gave the original's logits), or, on the runtime, failed
    # with "TypeError: cannot pickle '_thread.lock' object". Now the copy is a plain HF model with its own weights.
    build("qwen2", tmp_path)
    fast = optimize(T.AutoModelForCausalLM.from_pretrained(tmp_path).eval(), cpu_runtime=cpu_runtime)
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    fast.generate(ids, **kwargs)  # the engine exists (on the runtime)
    copies = copy.deepcopy(fast), copy.deepcopy(hf)
    for model in copies:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
    assert not hasattr(copies[0], "_fastllm_state")
    torch.testing.assert_close(copies[0](ids).logits, copies[1](ids).logits, rtol=0, atol=0)
    _same(copies[0].generate(ids, **kwargs), copies[1].generate(ids, **kwargs))
    _same(fast.generate(ids, **kwargs), hf.generate(ids, **kwargs))  # the original is untouched, still optimized
    assert hasattr(fast, "_fastllm_state")
