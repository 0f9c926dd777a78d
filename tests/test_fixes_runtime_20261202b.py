"""Slow `LLM(model, max_num_seqs=1)` / `max_num_batched_tokens=1` runs on the CPU (2026-12-02).

What was found: nothing per step is redone (no trace, no recapture); those runs take more model steps (as many as
the step budget forces) at the same cost per step, and on a 2-core machine shared with other processes torch's two
OpenMP threads stall a step for up to seconds, more often the more steps there are. What was redone was the trace at
start-up: the graph cache's key held the folder the model was loaded from, so the same model saved elsewhere (each
test's tmp_path) was traced again (~2.5 s of a tiny model's start on a CPU)."""

import shutil

import pytest
import torch
import transformers as T

import fastllm
from fastllm import SamplingParams
from fastllm.capture import graph_cache
from tests._models import build, optimize

PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
MAX_TOKENS = 4


def _dynamo_traces() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "graphs"
    monkeypatch.setenv("FASTLLM_GRAPH_CACHE_DIR", str(directory))
    return directory


def test_the_same_model_in_another_folder_uses_the_saved_graph(tmp_path, cache_dir):
    build("qwen2", tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first = optimize(T.AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval(), num_kv_tokens=256)
    assert not first._fastllm_state.compiled.from_graph_cache
    assert len(list(cache_dir.glob("*.pkl"))) == 1
    traces = _dynamo_traces()
    moved = T.AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    assert moved.config._name_or_path != first.config._name_or_path
    moved = optimize(moved, num_kv_tokens=256)
    assert moved._fastllm_state.compiled.from_graph_cache, "a model loaded from another folder was traced again"
    assert _dynamo_traces() == traces
    ids = torch.tensor([PROMPTS[0]])
    expected = first.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    assert torch.equal(moved.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False), expected)


def test_the_key_still_reads_the_rest_of_the_config(tmp_path):
    model = build("qwen2", tmp_path / "a")

    def key(m):
        return graph_cache.cache_key(lambda input_ids: input_ids, m, m.forward)

    before = key(model)
    model.config._name_or_path = str(tmp_path / "elsewhere")
    assert key(model) == before
    model.config.rms_norm_eps = 1e-3
    assert key(model) != before


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build("qwen2", tmp_path_factory.mktemp("qwen2"))


@pytest.mark.parametrize(("options", "model_steps"), [
    ({}, 1 + (MAX_TOKENS - 1)),                                  # one prefill of all three, then batched decodes
    ({"max_num_seqs": 1}, len(PROMPTS) * MAX_TOKENS),            # one request at a time
    ({"max_num_batched_tokens": 1}, sum(map(len, PROMPTS)) + len(PROMPTS) * (MAX_TOKENS - 1)),  # a token a step
])
def test_small_step_budgets_take_the_fewest_steps_and_trace_nothing(model, options, model_steps):
    llm = fastllm.LLM(model, **options)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in fastllm.LLM(model).generate(PROMPTS, params, use_tqdm=False)]
    runs = []
    execute = llm.runner.execute

    def counted(chunks, feed_rows=None):
        runs.append(sum(c.num_tokens for c in chunks))
        return execute(chunks, feed_rows)

    llm.runner.execute = counted
    traces = _dynamo_traces()
    try:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        del llm.runner.execute
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert len(runs) == model_steps
    assert _dynamo_traces() == traces, "a step shape was traced again"
