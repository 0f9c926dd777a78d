"""Defects found by a bug hunt of the in-flight batching engine through `fastllm.LLM` (2026-12-02), each as a test: a
stop string completed by the last token max_tokens allows still ends the completion with "stop" and cuts its text; a
stop string whose characters take more tokens than characters (a 4-byte character spelled by 4 byte tokens) is found;
an LLM whose model's shared engine core was closed by another LLM says so instead of failing with an unrelated
ValueError or IndexError.

Text tests run a tiny Llama over the demo tokenizer (tests/_models.build_over_demo_tokenizer) whose weights are rigged
into a "chain": its greedy next token is a fixed function of the last token, so the generated text is known exactly
(random weights' text is not); Hugging Face's own greedy generate checks that the rigging holds."""

import pytest
import torch
import transformers as T

from fastllm import LLM, SamplingParams
from tests._models import build, build_over_demo_tokenizer, chain_model


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return build_over_demo_tokenizer(tmp_path_factory.mktemp("llama_tok"))


def _chain_through(tokenizer, first: int, text: str) -> tuple[dict[int, int], list[int]]:
    """A chain from `first` through the tokens of `text` (its last token repeats): (chain, the tokens after first)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    chain = {}
    for a, b in zip([first, *ids], [*ids, ids[-1]]):
        assert chain.get(a, b) == b, "the text's tokens must not repeat (but for the last)"
        chain[a] = b
    return chain, ids


def _check_chain(model, first: int, expected: list[int]) -> None:
    hf = model.generate(torch.tensor([[first]]), max_new_tokens=len(expected), do_sample=False, eos_token_id=None,
                        pad_token_id=0)
    assert hf[0, 1:].tolist() == expected


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_stop_string_the_last_allowed_token_completes_cuts_the_text(tok_path, async_scheduling):
    # Symptom: with max_tokens=k and a stop string that the k-th token completes, the completion ended with
    # finish_reason "length" and its text kept the stop string; with max_tokens=k+1 the same k tokens gave "stop" and
    # the cut text (vLLM: "stop", text cut). The length limit finished the request first and the stop-string check
    # skipped finished requests.
    tokenizer, path = tok_path
    first = tokenizer("x", add_special_tokens=False).input_ids[0]
    chain, ids = _chain_through(tokenizer, first, " Paris is nice")
    model = chain_model(path, chain)
    _check_chain(model, first, ids + [ids[-1]])
    stop_at = next(k for k in range(1, len(ids) + 1) if tokenizer.decode(ids[:k]).endswith(" is"))
    with LLM(model, tokenizer=tokenizer, async_scheduling=async_scheduling) as llm:
        for max_tokens in (stop_at, stop_at + 1):  # the stop string on the last allowed token, and before it
            out = llm.generate([[first]], SamplingParams(temperature=0, max_tokens=max_tokens, stop=[" is"]),
                               use_tqdm=False)[0].outputs[0]
            assert out.token_ids == ids[:stop_at], max_tokens
            assert (out.text, out.finish_reason) == (tokenizer.decode(ids[:stop_at]).removesuffix(" is"), "stop"), \
                max_tokens


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_stop_string_spelled_by_more_tokens_than_characters_is_found(tok_path, async_scheduling):
    # Symptom: stop=["𠀀"] (one character, four UTF-8 bytes, four byte-level tokens in SmolLM2's vocabulary) never
    # stopped a completion that generated it: the text came back as "𠀀..." with finish_reason "length". StopStrings
    # decoded a window of len(stop) + 2 = 3 tokens, too few to hold the character.
    tokenizer, path = tok_path
    stop = "\U00020000"
    first = tokenizer("x", add_special_tokens=False).input_ids[0]
    ids = tokenizer(stop, add_special_tokens=False).input_ids
    assert len(ids) > len(stop) + 2 and len(set(ids[:-1])) == len(ids) - 1 and ids[-1] == ids[-2]
    # The character's tokens end in a repeated byte token: chain first -> ids[0] -> ids[1] -> ids[2] -> ids[2] ...
    chain = {first: ids[0], ids[0]: ids[1], ids[1]: ids[2], ids[2]: ids[2]}
    model = chain_model(path, chain)
    _check_chain(model, first, ids + [ids[-1]])
    with LLM(model, tokenizer=tokenizer, async_scheduling=async_scheduling) as llm:
        out = llm.generate([[first]], SamplingParams(temperature=0, max_tokens=8, stop=[stop]),
                           use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.text, out.finish_reason) == (ids, "", "stop")


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    build("qwen2", path)
    return path


def test_an_llm_whose_shared_engine_was_closed_says_so(qwen_path):
    # Two LLMs over one model share its engine core; closing one closes it. The other then failed with errors that
    # named something else: generate() with "ValueError: max_num_seqs=64 and max_num_batched_tokens=8192 exceed the
    # runner's -1 sampled rows per step" (its scheduling options were applied to the closed runner), metrics() with
    # "IndexError: list index out of range"; and metrics(), has_work(), num_preemptions of a closed LLM raised
    # "AttributeError: 'NoneType' object has no attribute ...".
    model = T.AutoModelForCausalLM.from_pretrained(qwen_path).eval()
    first = LLM(model)
    second = LLM(model, max_num_seqs=4)
    second.close()
    with pytest.raises(RuntimeError, match="closed"):
        first.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(RuntimeError, match="closed"):
        first.metrics()
    assert not first.has_work()
    for closed in (first, second):
        with pytest.raises(RuntimeError, match="closed"):
            closed.metrics()
        with pytest.raises(RuntimeError, match="closed"):
            closed.num_preemptions  # noqa: B018
        assert not closed.has_work()
    # A new LLM over the model builds a new engine core and runs.
    with LLM(model) as third:
        out = third.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)[0]
        assert out.error is None and len(out.outputs[0].token_ids) == 2


def test_scheduler_counters_survive_another_llms_settings(qwen_path):
    # Symptom: LLMs with different scheduling settings on one model share its engine core, which builds a new
    # scheduler whenever the settings change; its counters started from zero, so after another LLM's call
    # `num_preemptions` and metrics()' num_preemptions, tokens_scheduled and prefix-cache counts went back to 0 while
    # num_generated_tokens kept counting (both documented as cumulative since the core was built).
    model = T.AutoModelForCausalLM.from_pretrained(qwen_path).eval()
    small = LLM(model, num_kv_tokens=64, enable_prefix_caching=True)
    other = LLM(model, max_num_seqs=2)
    prompts = [[i + 1] * 30 for i in range(6)]
    small.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), use_tqdm=False)
    before = small.metrics()
    assert small.num_preemptions == before["num_preemptions"] > 0 and before["tokens_scheduled"] > 0
    other.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    after = other.metrics()
    assert small.num_preemptions == after["num_preemptions"] == before["num_preemptions"]
    for key in ("tokens_scheduled", "prefix_cache_queries", "prefix_cache_hits"):
        assert after[key] >= before[key], key
    assert after["tokens_scheduled"] == before["tokens_scheduled"] + 31  # its prompt of 30, then one decode


def test_token_ids_as_tensors_or_numpy_arrays_are_prompts(tmp_path):
    # A tokenizer's return_tensors output: LLM.generate(torch.tensor([1, 2, 3])) returned three empty "abort" outputs
    # (each element read as a prompt and refused as "got Tensor"), [tensor] and numpy ids one; now each is one prompt,
    # and a 2-D array (whose rows may hold padding) is refused saying what to pass
    import numpy as np
    import transformers as T

    config = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path))
    params = SamplingParams(max_tokens=3, temperature=0.0)
    expected = llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert len(expected) == 3
    for prompts in (torch.tensor([1, 2, 3]), [torch.tensor([1, 2, 3], dtype=torch.int32)], np.array([1, 2, 3]),
                    [np.array([1, 2, 3])], [np.int64(1), np.int64(2), np.int64(3)], [[np.int32(1), 2, 3]]):
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert [(o.prompt_token_ids, o.outputs[0].token_ids, o.error) for o in outputs] == [([1, 2, 3], expected, None)]
    with pytest.raises(ValueError, match=r"1-D token ids of an integer dtype, got shape \(1, 3\).*without their "
                                         r"padding"):
        llm.generate(torch.tensor([[1, 2, 3]]), params, use_tqdm=False)
    bad = llm.generate([torch.tensor([1.0, 2.0])], params, use_tqdm=False)[0]
    assert bad.outputs[0].finish_reason == "abort" and "integer dtype" in bad.error
    llm.close()
