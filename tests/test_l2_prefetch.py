"""prefetch_l2 (a weight's first bytes asked into L2; no effect on any result) and the opt-in l2_prefetch pass."""

from __future__ import annotations

import pytest
import torch

import fastllm
from fastllm import kernels
from fastllm.kernels import l2_prefetch


def _llama(dtype=torch.bfloat16, layers=3):
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=16, vocab_size=128)  # fmt: skip
    return T.AutoModelForCausalLM.from_config(config).to(dtype).eval()


@pytest.mark.parametrize("max_bytes", [0, -16, 1.5, True, "1"])
def test_bad_max_bytes_is_refused(max_bytes):
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        kernels.prefetch_l2(torch.zeros(4, 8), torch.zeros(1, 8), max_bytes)


def test_a_non_contiguous_weight_is_refused():
    with pytest.raises(ValueError, match="contiguous"):
        kernels.prefetch_l2(torch.zeros(8, 4).t(), torch.zeros(1, 8))


def test_on_the_cpu_nothing_is_launched():
    weight = torch.randn(16, 8)
    before = weight.clone()
    assert kernels.prefetch_l2(weight, torch.zeros(1, 8)) is None
    assert not l2_prefetch._launches(weight, torch.zeros(1, 8))
    assert torch.equal(weight, before)


def test_pass_prefetches_each_linears_weight_after_the_linear_before_it_cpu():
    """3 layers of 4 linears (qkv, o_proj, gate_up, down) and the LM head: a prefetch after every linear but the
    last, each of the next linear's weight. On a CPU graph reference_ops then drops them (they do nothing there): the
    logits and greedy tokens are the default passes'."""
    ids = torch.tensor([[1, 7, 30, 2, 99, 5, 64, 3]])
    logits, tokens = [], []
    for passes in (fastllm.DEFAULT_PASSES, (*fastllm.DEFAULT_PASSES, "l2_prefetch")):
        model = fastllm.optimize(_llama(), passes=passes, max_num_seqs=2, cpu_runtime=True)
        with torch.no_grad():
            logits.append(model(ids).logits)
        tokens.append(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0))
        report = fastllm.explain(model)
        assert report.matches.get("l2_prefetch", 0) == (3 * 4 + 1 - 1 if "l2_prefetch" in passes else 0)
        del model
    assert torch.equal(logits[0], logits[1]) and torch.equal(tokens[0], tokens[1])


def test_pass_inserts_the_prefetch_right_after_the_linear_before():
    """On the graph itself (before reference_ops): prefetch_l2(next weight, the earlier linear's input) directly
    after each linear but the last."""
    from torch import fx

    from fastllm.passes import l2_prefetch as l2_pass
    from fastllm.passes._context import PassContext, WeightMerger

    graph = fx.Graph()
    x, w1, w2, w3 = (graph.placeholder(name) for name in ("x", "w1", "w2", "w3"))
    h = graph.call_function(kernels.skinny_linear, (x, w1))
    a = graph.call_function(torch.relu, (h,))
    g = graph.call_function(kernels.skinny_linear, (a, w2))
    y = graph.call_function(kernels.skinny_linear, (g, w3))
    graph.output(y)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    tensors = {w1: torch.zeros(8, 8), w2: torch.zeros(8, 8), w3: torch.zeros(8, 8).t()}  # w3 not contiguous
    ctx = PassContext(gm=gm, tensors=tensors, merger=WeightMerger())
    assert l2_pass.apply(ctx) == 1
    nodes = list(gm.graph.nodes)
    prefetch = nodes[nodes.index(h) + 1]
    assert prefetch.target is kernels.prefetch_l2 and prefetch.args == (w2, x)
    assert sum(n.target is kernels.prefetch_l2 for n in nodes) == 1  # w3 (not contiguous) is left alone


# --- GPU ---------------------------------------------------------------------------------------------------------


def _needs_sm90():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cp.async.bulk.prefetch needs compute capability 9.0+")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 5), (1000, 4096), (4096, 4099), (12000, 4096)])
def test_prefetch_runs_at_odd_sizes_and_changes_nothing(shape):
    """Spans smaller than one thread's, not a multiple of 16 bytes (cut), and past PREFETCH_MAX_BYTES (12000 x 4096
    bf16: 98 MB); 16-byte-misaligned views launch nothing. The weight is unchanged."""
    _needs_sm90()
    weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    before = weight.clone()
    like = torch.zeros(1, 8, device="cuda", dtype=torch.bfloat16)
    assert l2_prefetch._launches(weight, like)
    kernels.prefetch_l2(weight, like)
    kernels.prefetch_l2(weight, like, max_bytes=100)
    flat = weight.view(-1)[1:]  # 2 bytes past an aligned address
    assert not l2_prefetch._launches(flat, like)
    kernels.prefetch_l2(flat, like)
    assert not l2_prefetch._launches(weight, torch.zeros(17, 8, device="cuda"))  # a prefill-sized step
    torch.cuda.synchronize()
    assert torch.equal(weight, before)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "int4"])
def test_pass_on_cuda_gives_the_default_passes_tokens(quantization):
    """Through CUDA graphs (the decode steps launch the prefetches, with PDL on sm_90) the greedy tokens and the
    prompt's logits are the default passes'."""
    _needs_sm90()
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(5)).cuda()
    tokens, logits = [], []
    scheme = fastllm.QuantConfig("int4", group_size=32) if quantization else None
    for passes in (fastllm.DEFAULT_PASSES, (*fastllm.DEFAULT_PASSES, "l2_prefetch")):
        model = fastllm.optimize(_llama().to("cuda"), quantization=scheme, passes=passes, max_num_seqs=4,
                                 num_kv_tokens=4096)  # fmt: skip
        with torch.no_grad():
            logits.append(model(ids).logits)
        tokens.append(model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0))
        if "l2_prefetch" in passes:
            assert fastllm.explain(model).matches["l2_prefetch"] == 12
        del model
    assert torch.equal(logits[0], logits[1]) and torch.equal(tokens[0], tokens[1])
