"""Audit of the offline API and sampling (LLM.generate, model.generate, SamplingParams, the sampler, stop strings):
each test is a bug that was found, with what it should do."""

import warnings

import pytest
import torch
import transformers as T

from fastllm import LLM, SamplingParams
from fastllm.runtime.stop_strings import StopStrings
from tests._models import build, optimize


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    build("qwen2", path)
    return path


@pytest.fixture(scope="module")
def models(path):
    """(optimized model on fastllm's runtime, HF reference)."""
    return (optimize(T.AutoModelForCausalLM.from_pretrained(path).eval()),
            T.AutoModelForCausalLM.from_pretrained(path).eval())


@pytest.fixture(scope="module")
def llm(path):
    return LLM(T.AutoModelForCausalLM.from_pretrained(path).eval())


@pytest.fixture(scope="module")
def tokenizer():
    from fastllm.models.demo import load_demo_tokenizer

    return load_demo_tokenizer()


IDS = torch.tensor([[5, 6, 7, 8]])


# ---- model(...): the compiled step ------------------------------------------------------------------------------

@pytest.mark.parametrize("positions", [[0, 1, 2, 10**6], [-1, 0, 1, 2]])
def test_position_ids_past_the_context_are_refused_by_name(models, positions):
    """The compiled step reads per-position tables (the rotary cos/sin of rope_table; GPT-2's learned positions):
    a position past max_model_len would index past them (an IndexError here, a device-side assert on CUDA)."""
    model, _ = models
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, \d+\) \(max_model_len\); got \["):
        model(IDS, position_ids=torch.tensor([positions]))
    # One bad call fails alone: the next one runs, with positions given explicitly and equal to the default's
    torch.testing.assert_close(model(IDS, position_ids=torch.tensor([[0, 1, 2, 3]])).logits, model(IDS).logits,
                               rtol=0, atol=0)


# ---- model.generate: Hugging Face's semantics ---------------------------------------------------------------------


def test_generate_without_a_length_makes_hfs_default_20_new_tokens(models):
    """HF generates 20 new tokens when neither max_new_tokens nor max_length is given; it raised instead."""
    model, reference = models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # HF's "using the model-agnostic default max_length"
        expected = reference.generate(IDS, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(IDS, do_sample=False, pad_token_id=0), expected)
    assert expected.shape[1] == IDS.shape[1] + 20


def test_sampling_without_top_k_keeps_hfs_default_top_50(models):
    """HF's default top_k is 50 when sampling; fastllm sampled from the whole vocabulary."""
    model, reference = models
    kwargs = dict(do_sample=True, max_new_tokens=1, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    kept = [m.generate(IDS, **kwargs).scores[0].isfinite().sum().item() for m in (reference, model)]
    assert kept == [50, 50]


def test_a_generation_config_object_takes_the_models_unset_fields(models):
    """HF fills a passed generation_config's unset fields (here EOS) from model.generation_config; fastllm ignored
    them, so it did not stop at the model's EOS."""
    model, reference = models
    free_run = reference.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0)
    eos = free_run[0, IDS.shape[1] + 1].item()  # the second generated token
    config = T.GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0)
    old = [m.generation_config.eos_token_id for m in models]
    try:
        for m in models:
            m.generation_config.eos_token_id = eos
        expected = reference.generate(IDS, generation_config=config)
        assert torch.equal(model.generate(IDS, generation_config=config), expected)
        assert expected.shape[1] < free_run.shape[1]
    finally:
        for m, value in zip(models, old):
            m.generation_config.eos_token_id = value


@pytest.mark.parametrize("kwargs", [dict(do_smaple=True), dict(max_new_token=3)])
def test_a_misspelt_argument_is_not_silently_ignored(models, kwargs):
    """HF refuses arguments nobody uses (typos); fastllm ignored them and generated anyway."""
    model, _ = models
    with pytest.warns(RuntimeWarning, match=next(iter(kwargs))):
        with pytest.raises(ValueError, match="not used by the model"):
            model.generate(IDS, max_new_tokens=3, pad_token_id=0, **kwargs)


def test_model_kwargs_fastllm_does_not_implement_run_hfs_generate(models):
    """position_ids were dropped silently: they go to HF's generate, which uses them."""
    model, reference = models
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, position_ids=torch.tensor([[3, 4, 5, 6]]))
    with pytest.warns(RuntimeWarning, match="position_ids"):
        ours = model.generate(IDS, **kwargs)
    assert torch.equal(ours, reference.generate(IDS, **kwargs))


def test_sampling_at_temperature_zero_is_refused_as_hf_does(models):
    """HF refuses do_sample=True with temperature=0; fastllm silently decoded greedily."""
    model, _ = models
    with pytest.raises(ValueError, match="temperature"):
        model.generate(IDS, max_new_tokens=3, do_sample=True, temperature=0.0, pad_token_id=0)


@pytest.mark.parametrize("name", ["max_new_tokens", "max_length", "min_new_tokens", "min_length"])
def test_a_length_of_the_wrong_type_is_named(models, name):
    """A string length crashed with "'<=' not supported between instances of 'str' and 'int'"."""
    model, _ = models
    kwargs = {name: "3"} if name == "max_length" else {"max_new_tokens": 3, name: "3"}
    with pytest.raises(ValueError, match=name):
        model.generate(IDS, do_sample=False, pad_token_id=0, **kwargs)


# ---- sampler -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-39, 1e-300])
def test_a_tiny_temperature_is_greedy_not_nan(llm, temperature):
    """A temperature whose scores overflow (or that rounds to 0 in fp32) sampled from NaN: token 0 every step."""
    greedy = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    tiny = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=temperature, max_tokens=6), use_tqdm=False)[0]
    assert tiny.outputs[0].token_ids == greedy.outputs[0].token_ids
    assert SamplingParams(temperature=temperature).greedy


# ---- SamplingParams ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["stop", "stop_token_ids", "bad_words"])
def test_a_list_field_of_the_wrong_type_is_named(field):
    """stop=5 raised "TypeError: 'int' object is not iterable"."""
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: 5})


# ---- stop strings --------------------------------------------------------------------------------------------------


def _ids(tokenizer, pieces):
    ids = tokenizer.convert_tokens_to_ids(pieces)
    assert tokenizer.decode(ids) == "".join(pieces)
    return ids


def test_a_stop_string_after_min_tokens_is_found_beside_an_earlier_one(tokenizer):
    """With min_tokens, an occurrence inside the first min_tokens tokens does not stop; the next one must. It was
    missed while the earlier one was still among the last tokens decoded."""
    stop = StopStrings(["."], tokenizer)
    tokens = _ids(tokenizer, ["x", ".", "y", ".", "z"])
    # min_tokens=3: the engine asks from the third token on.
    assert [stop.hit(tokens[:n]) for n in (3, 4)] == [False, True]


def test_the_text_is_cut_at_the_stop_string_that_ended_it(tokenizer):
    """A last token holding the stop string twice ("\\n\\n" for "\\n") was cut at its second one: "Hello\\n".
    `cut` needs the tokens for this; EngineCore._complete still calls `cut(text)` (the last occurrence)."""
    stop = StopStrings(["\n"], tokenizer)
    tokens = tokenizer("Hello\n\n").input_ids
    assert len(tokens) == 2 and stop.hit(tokens) and not stop.hit(tokens[:1])
    assert stop.cut(tokenizer.decode(tokens), tokens) == "Hello"
    # With min_tokens=5 the first two "." did not stop it: the cut is at the one in the last token.
    dots = StopStrings(["."], tokenizer)
    tokens = _ids(tokenizer, ["a", ".", "b", ".", "c", "."])
    assert dots.cut(tokenizer.decode(tokens), tokens) == "a.b.c"
