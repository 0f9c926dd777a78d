"""Notebook-grade memory on a GPU, with the Llama-3.1-8B shape in bf16 (15 GiB of weights, random): a cell run three
times frees what it took, two models live side by side, and one short generate() takes a small share of the card."""

import gc

import pytest
import torch

import fastllm

pytestmark = pytest.mark.gpu

GIB = 2**30
LLAMA31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)


def _model(seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**LLAMA31_8B, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def _ids(length: int) -> torch.Tensor:
    return torch.randint(1, LLAMA31_8B["vocab_size"], (1, length), generator=torch.Generator().manual_seed(1)).cuda()


def _generate(model, prompt: int = 128, new: int = 256) -> torch.Tensor:
    ids = _ids(prompt)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)


def _settle() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def test_a_cell_run_three_times_frees_what_it_took():
    """load -> optimize -> generate -> del, three times in one process: allocated memory back within 0.5 GiB."""
    start = _settle()
    for _ in range(3):
        model = fastllm.optimize(_model())
        out = _generate(model, new=16)
        assert out.shape == (1, 128 + 16)
        del model, out
        leftover = _settle() - start
        print(f"allocated after del: {leftover / GIB:+.3f} GiB")
        assert leftover < 0.5 * GIB


def test_release_frees_the_engine_and_keeps_the_model():
    start = _settle()
    model = fastllm.optimize(_model())
    _generate(model, new=8)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    fastllm.release(model)
    held = _settle() - start
    print(f"after release: {held / GIB:.2f} GiB held, weights {weights / GIB:.2f} GiB")
    assert held < weights + 0.5 * GIB  # the weights, and nothing fastllm allocated
    del model
    assert _settle() - start < 0.5 * GIB


def test_two_8b_models_side_by_side_both_generate():
    start = _settle()
    first = fastllm.optimize(_model(seed=0))
    alone = _generate(first, new=32)
    second = fastllm.optimize(_model(seed=1))
    theirs = _generate(second, new=32)
    assert torch.equal(_generate(first, new=32), alone)  # the second model changes nothing for the first
    assert not torch.equal(theirs, alone)  # other weights, other tokens: both really ran
    del first, second
    assert _settle() - start < 0.5 * GIB


def test_one_short_generate_leaves_most_of_the_card_free():
    """One generate() of 128 + 256 tokens leaves at least 80% of the memory free after loading free."""
    _settle()
    model = _model()
    free_before, total = torch.cuda.mem_get_info()
    fastllm.optimize(model)
    _generate(model)
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    report = fastllm.explain(model)
    print(f"free {free_before / GIB:.1f} -> {free_after / GIB:.1f} GiB of {total / GIB:.1f}; {report.kv_cache}")
    assert free_after >= 0.8 * free_before
    assert report.kv_cache["tokens"] < report.kv_cache["max_tokens"]  # it holds what it needs, not its cap
    del model
    _settle()


def test_an_llm_reserves_its_cap_and_gives_it_back():
    start = _settle()
    model = fastllm.optimize(_model())
    free_total = torch.cuda.mem_get_info()
    with fastllm.LLM(model) as llm:
        info = llm.kv_cache_info
        print(f"LLM reserved {info['tokens']:,} tokens ({info['bytes'] / GIB:.1f} GiB); card {free_total}")
        assert info["tokens"] == info["max_tokens"]
        # vLLM's convention: with the 0.9 default the cache takes most of what the card has left.
        assert info["bytes"] > 0.5 * free_total[0]
        out = llm.generate([[1, 2, 3]], fastllm.SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
    held = _settle() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert held < weights + 1.0 * GIB  # the reservation went back (a small engine core remains possible)
    del model, llm  # a closed LLM still names its model
    assert _settle() - start < 0.5 * GIB
