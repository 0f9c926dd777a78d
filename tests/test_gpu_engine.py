"""The batching engine on a GPU: CUDA-graph steps (decode and prefill buckets), pinned staging, and asynchronous
scheduling (tokens fed to the next step on the device) give the synchronous engine's tokens."""

import gc
import random

import pytest
import torch
import transformers as T

from fastllm import LLM, SamplingParams
from tests._models import VOCAB, build

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _workload(n=40, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 60))] for _ in range(n)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 24)) for _ in range(n)]
    return prompts, params


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_async_scheduling_equals_synchronous_on_gpu(family, tmp_path):
    build(family, tmp_path)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path).cuda().eval()
    model.generation_config.eos_token_id = [5, 17]
    sync = LLM(model, num_kv_tokens=4096, max_num_seqs=16, max_num_batched_tokens=256, async_scheduling=False)
    assert sync.runner.use_cuda_graph
    prompts, params = _workload()
    expected = [o.outputs[0].token_ids for o in sync.generate(prompts, params, use_tqdm=False)]
    overlapped = LLM(model, async_scheduling=True)
    outs = overlapped.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    metrics = overlapped.metrics()
    assert metrics["num_overlapped_steps"] > 0
    pool = overlapped.runner.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_generate_with_async_scheduling_equals_hf_on_gpu(tmp_path):
    """generate() with async scheduling (CUDA graphs, device feed, pinned token copies): HF eager's greedy
    tokens, batched with left padding and an EOS list."""
    import fastllm

    build("llama", tmp_path)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path).cuda().eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (3, 40), generator=g).cuda()
    mask = torch.ones_like(ids)
    ids[0, :17], mask[0, :17] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=[11, 12])
    expected = model.generate(ids, **kwargs)
    fastllm.optimize(model, num_kv_tokens=8192, async_scheduling=True)
    assert torch.equal(model.generate(ids, **kwargs), expected)
    pool = model._fastllm_state.core.runner.pool
    assert pool.num_free_blocks == pool.num_blocks
