"""`model(...)`'s KV cache, gradients and the scores of stopped rows, against Hugging Face (2026-12-02, second part).

`model(ids)` runs the compiled step, which keeps no KV cache; it returned `past_key_values=None` where HF returns a
cache, so the hand-written decode loop (`past = model(ids).past_key_values; model(next_id, past_key_values=past)`) ran
its second call as a fresh sequence without context and gave wrong tokens with no error. Each test asserts what HF
does, or the loud error that replaced a silent wrong answer."""

import copy
import pickle
import warnings

import pytest
import torch
import transformers as T

from fastllm.entrypoints.forward import NO_KV_CACHE
from tests._models import VOCAB, build, optimize


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def models(request, tmp_path_factory):
    """(optimized model on fastllm's runtime, HF reference with the same weights). GPT-2's forward is an older one
    (its own `use_cache` handling) than Qwen2's."""
    path = tmp_path_factory.mktemp(request.param)
    build(request.param, path)
    return (optimize(T.AutoModelForCausalLM.from_pretrained(path).eval()),
            T.AutoModelForCausalLM.from_pretrained(path).eval())


IDS = torch.tensor([[5, 6, 7, 8, 9]])


def _routes(model):
    return dict(model._fastllm_state.forward_routes)


def _decode_by_hand(model, ids, steps, **first_call):
    """The hand-written greedy loop of HF's docs: the prompt once, then one token a call with the cache."""
    tokens = []
    with torch.no_grad():
        out = model(ids, **first_call)
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token.item())
            out = model(token, past_key_values=out.past_key_values)
    return tokens


def test_hand_written_decode_loop_is_refused_not_run_without_context(models):
    # The symptom: past_key_values was None, so the second call ran the one new token as a whole sequence (position 0,
    # no prompt) on the compiled step and the loop decoded other tokens than HF's, silently.
    fast, hf = models
    with pytest.raises(ValueError, match="keeps no KV cache"):
        _decode_by_hand(fast, IDS, 6)  # the loop as written for HF (which decodes it with its cache)
    with torch.no_grad():
        out = fast(IDS)
    assert out.past_key_values is NO_KV_CACHE  # where HF returns its cache
    token = out.logits[:, -1:].argmax(-1)
    for name in ("past_key_values", "cache"):  # the old name and transformers 5's
        before = _routes(fast)
        with pytest.raises(ValueError, match="keeps no KV cache.*use_cache=True"):
            fast(token, **{name: out.past_key_values})
        assert _routes(fast) == before  # refused before running anything
    with pytest.raises(ValueError, match="keeps no KV cache"):
        fast(token, None, None, out.past_key_values)  # positionally too (input_ids, attention_mask, position_ids, ...)


def test_the_loop_with_use_cache_gives_hf_tokens(models):
    # The way out the error names: use_cache=True runs HF's forward, whose real cache the loop passes on
    fast, hf = models
    assert _decode_by_hand(fast, IDS, 6, use_cache=True) == _decode_by_hand(hf, IDS, 6)


def test_scoring_stays_on_the_compiled_step(models):
    fast, hf = models
    before = _routes(fast).get("compiled", 0)
    with torch.inference_mode():
        ours, theirs = fast(IDS), hf(IDS)
    assert _routes(fast)["compiled"] == before + 1
    assert list(ours.keys()) == list(theirs.keys()) == ["logits", "cache"]
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-4, atol=1e-4)


def test_return_dict_false_unpacks_to_logits_and_cache_as_hf(models):
    # HF's tuple is (logits, cache) under its default use_cache; `logits, past = model(ids, return_dict=False)` raised
    # "not enough values to unpack" on the compiled step's (logits,)
    fast, hf = models
    before = _routes(fast).get("compiled", 0)
    with torch.no_grad():
        (logits, cache), theirs = fast(IDS, return_dict=False), hf(IDS, return_dict=False)
        assert len(theirs) == 2 and cache is NO_KV_CACHE
        torch.testing.assert_close(logits, theirs[0], rtol=1e-4, atol=1e-4)
        # Without a cache HF's tuple holds the logits alone: use_cache=False, or the config's use_cache off
        assert len(fast(IDS, return_dict=False, use_cache=False)) == len(hf(IDS, return_dict=False, use_cache=False)) \
            == 1
        assert fast(IDS, use_cache=False).past_key_values is None
        for m in models:
            m.config.use_cache = False
        try:
            assert len(fast(IDS, return_dict=False)) == len(hf(IDS, return_dict=False)) == 1
            assert fast(IDS).past_key_values is hf(IDS).past_key_values is None
        finally:
            for m in models:
                m.config.use_cache = True
    assert _routes(fast)["compiled"] == before + 5  # all on the compiled step


def test_the_marker_used_as_a_cache_says_why(models):
    fast, _ = models
    with pytest.raises(AttributeError, match="keeps no KV cache"):
        NO_KV_CACHE.get_seq_length()  # a Cache's method
    with pytest.raises(TypeError, match="keeps no KV cache"):
        NO_KV_CACHE[0]  # a legacy tuple cache: past[layer][0]
    with pytest.raises(TypeError, match="keeps no KV cache"):
        key, value = NO_KV_CACHE
    # It stays a plain value for the code that copies outputs around (AttributeError keeps hasattr's answer)
    assert not hasattr(NO_KV_CACHE, "get_seq_length")
    assert copy.deepcopy(NO_KV_CACHE) is NO_KV_CACHE and pickle.loads(pickle.dumps(NO_KV_CACHE)) is NO_KV_CACHE
    with torch.no_grad():
        out = fast(IDS)
    assert copy.deepcopy(out).past_key_values is NO_KV_CACHE and out.to_tuple()[1] is NO_KV_CACHE


def test_the_marker_passed_to_generate_is_refused(models):
    # HF's generate (where this runtime hands the call, past_key_values being no argument of its own) would take it
    # for a cache
    fast, _ = models
    with torch.no_grad():
        past = fast(IDS).past_key_values
    with pytest.raises(ValueError, match="keeps no KV cache"):
        fast.generate(IDS, past_key_values=past, max_new_tokens=3, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_hf_generate_fallback_with_or_without_cache_gives_hf_tokens(models, use_cache):
    # Beam search runs HF's generate, which calls the forward with its use_cache: True → HF's forward and its cache;
    # False → the compiled step, which returns None there, as HF (no marker for HF's generate to carry)
    fast, hf = models
    kwargs = dict(max_new_tokens=5, num_beams=2, do_sample=False, pad_token_id=0, use_cache=use_cache)
    before = _routes(fast)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the one-time "runs Hugging Face's generate" warning
        ours = fast.generate(IDS, **kwargs)
    assert torch.equal(ours, hf.generate(IDS, **kwargs))
    route = "eager" if use_cache else "compiled"
    assert _routes(fast).get(route, 0) > before.get(route, 0)


def test_backward_through_the_compiled_logits_says_how_to_get_gradients(models):
    # With autograd on the logits require grad as HF's do, and their backward says why there are no gradients (it
    # raised "element 0 of tensors does not require grad and does not have a grad_fn")
    fast, hf = models
    before = _routes(fast).get("compiled", 0)
    ours, theirs = fast(IDS).logits, hf(IDS).logits
    assert _routes(fast)["compiled"] == before + 1  # scoring without no_grad keeps the compiled step
    assert ours.requires_grad == theirs.requires_grad is True
    ours[..., 0] = 0.0  # written in place as HF's can be (a view of a custom Function's input could not)
    with pytest.raises(RuntimeError, match="computes no gradients.*use_cache=True"):
        ours.sum().backward()
    assert all(p.grad is None for p in fast.parameters())
    # The way out it names gives HF's gradients
    fast(IDS, use_cache=True).logits.sum().backward()
    theirs.sum().backward()
    for (name, ours_p), theirs_p in zip(fast.named_parameters(), hf.parameters()):
        torch.testing.assert_close(ours_p.grad, theirs_p.grad, rtol=1e-4, atol=1e-5, msg=name)
    fast.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    # No autograd (no_grad, frozen weights): plain logits, as before
    with torch.no_grad():
        assert not fast(IDS).logits.requires_grad
    fast.requires_grad_(False)
    try:
        assert not fast(IDS).logits.requires_grad and not hf.requires_grad_(False)(IDS).logits.requires_grad
    finally:
        fast.requires_grad_(True)
        hf.requires_grad_(True)


def _early_stopping_batch(hf):
    """(ids, eos): two prompts and an EOS id that HF's greedy decoding emits first in row 0, never in row 1: row 0
    stops after one token, row 1 runs the whole length."""
    for seed in range(20):  # tiny random models repeat tokens; the first seed that gives such a batch
        ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
        free = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)[:, 6:]
        eos = free[0, 0].item()
        if eos not in free[1].tolist() and eos != 0:
            return ids, eos
    raise AssertionError("no batch with one row stopping early")


def test_scores_of_a_stopped_row_give_finite_transition_scores(models):
    # A row that stopped had scores of -inf everywhere at its later steps: compute_transition_scores with
    # normalize_logits=True (log_softmax) made them NaN, and NaN poisons the sum of a sequence's log-probabilities
    # even masked by multiplication. HF computes the row on at its pad token (finite, meaningless scores).
    fast, hf = models
    ids, eos = _early_stopping_batch(hf)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=eos, return_dict_in_generate=True,
                  output_scores=True, output_logits=True)
    ours, theirs = fast.generate(ids, **kwargs), hf.generate(ids, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    new = ours.sequences[:, ids.shape[1]:]
    live = torch.ones_like(new, dtype=torch.bool)
    live[0, 1:] = False  # row 0's steps after its EOS (step 0)
    assert (new[0, 1:] == 0).all()
    for field in ("scores", "logits"):
        for normalize in (True, False):
            a = fast.compute_transition_scores(ours.sequences, getattr(ours, field), normalize_logits=normalize)
            b = hf.compute_transition_scores(theirs.sequences, getattr(theirs, field), normalize_logits=normalize)
            assert torch.isfinite(a).all() and torch.isfinite(b).all(), (field, normalize, a)
            torch.testing.assert_close(a[live], b[live], rtol=1e-4, atol=1e-4)
            # After the stop the pad is certain: log-probability 0, as HF gives a finished beam's steps
            assert (a[~live] == 0).all()
            # A sequence's log-probability, masked by multiplication: HF's value
            torch.testing.assert_close((a * live).sum(-1), (b * live).sum(-1), rtol=1e-4, atol=1e-4)
