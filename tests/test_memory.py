"""Notebook-grade memory on the CPU: generate() holds what its sequences need (the KV pool grows on demand), an LLM
reserves like a server, and dropping or releasing a model frees everything fastllm allocated for it."""

import gc
import weakref

import pytest
import torch
import transformers as T

import fastllm
from fastllm.runtime.kv_cache import INITIAL_NUM_KV_TOKENS
from tests._models import FAMILIES, VOCAB, build, optimize


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build("llama", path)
    return path


def _load(path):
    return T.AutoModelForCausalLM.from_pretrained(path).eval()


def _runner(model):
    return model._fastllm_state.core.runner


def test_generate_grows_the_pool_on_demand_and_loses_no_block(llama_path):
    """A small start; a batch that needs more grows it (doubling, up to the cap); outputs equal HF's; every block
    comes back."""
    model, reference = optimize(_load(llama_path)), _load(llama_path)
    runner = _runner(model)
    assert runner.kv_cache_tokens == INITIAL_NUM_KV_TOKENS
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (6, 900), generator=g)  # 6 x (900 + 300) tokens: more than 4,096 slots
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=300, min_new_tokens=300, do_sample=False,
                  pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    assert runner.pool.num_growths >= 1 and runner.kv_cache_tokens > INITIAL_NUM_KV_TOKENS
    assert runner.kv_cache_tokens <= runner.pool.max_num_blocks * runner.block_size
    assert runner.pool.num_free_blocks == runner.pool.num_blocks  # none lost
    report = fastllm.explain(model)
    assert report.kv_cache["tokens"] == runner.kv_cache_tokens and "KV cache" in str(report)


def test_a_fixed_size_never_grows_and_preempts_instead(llama_path):
    model, reference = optimize(_load(llama_path), num_kv_tokens=2048), _load(llama_path)
    runner = _runner(model)
    ids = torch.randint(3, VOCAB, (4, 400), generator=torch.Generator().manual_seed(1))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=200, min_new_tokens=200, do_sample=False,
                  pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    assert runner.pool.num_growths == 0 and runner.kv_cache_tokens == 2048
    assert model._fastllm_state.core.scheduler.num_preemptions > 0


def test_llm_reserves_its_cap_and_close_gives_it_back(llama_path, caplog):
    model = optimize(_load(llama_path))
    before = _runner(model).kv_cache_tokens
    with caplog.at_level("INFO", logger="fastllm"):
        llm = fastllm.LLM(model)
    runner = llm.runner
    assert runner.kv_cache_tokens == runner.pool.max_num_blocks * runner.block_size > before
    assert llm.kv_cache_info["tokens"] == runner.kv_cache_tokens
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    params = fastllm.SamplingParams(temperature=0, max_tokens=4)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.close()
    assert model._fastllm_state.core is None and runner.kv_caches == []
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate(prompts, params, use_tqdm=False)
    # The model stays optimized: its next call builds a small engine core again, without capturing again.
    out = model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out[0, 3:].tolist() == expected[0]
    assert _runner(model).kv_cache_tokens == INITIAL_NUM_KV_TOKENS
    with fastllm.LLM(model) as again:
        assert [o.outputs[0].token_ids for o in again.generate(prompts, params, use_tqdm=False)] == expected
    assert again.core is None
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "KV cache of" in messages and "tokens" in messages  # it says what it took


def test_llm_takes_a_memory_fraction_for_an_optimized_model(llama_path):
    model = optimize(_load(llama_path))
    with pytest.raises(ValueError, match="kv_cache_memory_fraction"):
        fastllm.LLM(model, kv_cache_memory_fraction=float("nan"))
    with fastllm.LLM(model, kv_cache_memory_fraction=0.5) as llm:  # on the CPU the cap is CPU_MAX_NUM_KV_TOKENS
        assert llm.kv_cache_info["tokens"] == llm.kv_cache_info["max_tokens"]


def _dies_when_dropped(make) -> bool:
    obj = make()
    ref = weakref.ref(obj)
    del obj
    gc.collect()
    return ref() is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_optimized_model_is_freed_when_dropped(family, tmp_path):
    """No registry (dynamo's caches included) keeps an optimized model, its compiled step or its engine alive."""
    build(family, tmp_path)

    def optimized():
        model = optimize(_load(tmp_path), graph_cache=False)
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        model(torch.tensor([[5, 6, 7]]))
        return model

    assert _dies_when_dropped(optimized)


def test_the_model_behind_an_llm_is_freed_and_so_is_a_cached_start(llama_path):
    def behind_llm():
        llm = fastllm.LLM(_load(llama_path))
        llm.generate([[1, 2, 3]], fastllm.SamplingParams(max_tokens=3), use_tqdm=False)
        return llm.model

    def from_graph_cache():  # the second start loads the graph from disk: no dynamo at all
        optimize(_load(llama_path))
        return optimize(_load(llama_path))

    assert _dies_when_dropped(behind_llm)
    assert _dies_when_dropped(from_graph_cache)


def test_release_returns_the_model_to_plain_hf(llama_path):
    model, reference = _load(llama_path), _load(llama_path)
    ids = torch.tensor([[3, 4, 5, 6]])
    optimize(model)
    engine = weakref.ref(model._fastllm_state.core)
    assert fastllm.release(model) is model
    gc.collect()
    assert engine() is None  # the engine core (KV cache, buffers) is gone
    assert not hasattr(model, "_fastllm_state")
    assert "forward" not in vars(model) and "generate" not in vars(model)  # the class's own methods again
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    with pytest.raises(ValueError, match="not optimized"):
        fastllm.release(model)
    optimize(model)  # and it can be optimized again
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
