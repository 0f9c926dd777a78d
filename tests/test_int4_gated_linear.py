"""int4_linear_and_act: an int4 gate-up projection with its gated activation stored by the decode kernel (GATED
epilogue), against the unfused launchers (the same bits) and the reference; the opt-in int4_act_fusion pass."""

from __future__ import annotations

import pytest
import torch
from _kernel_tolerances import CPU_DTYPES, assert_close

from fastllm import kernels
from fastllm.quant import int_weight

# (M, I, K, group, zero points, bias, split_k, activation). A block holds BLOCK_N / 2 outputs (its gate rows, then
# their up rows): 256 at one row and group 32, 64 at group 128 (and at two rows, group 64): I = 36 is one partial
# block, 150 three blocks the last partial, 300 five. split_k 3 over 3 or 5 groups, 4 over 8: summed by the kernel's
# last program of each block.
GATED_CASES = [
    (1, 36, 256, 32, False, True, None, "silu"),
    (1, 150, 384, 128, True, False, 3, "silu"),
    (2, 150, 320, 64, True, True, 3, "gelu"),
    (2, 36, 256, 128, False, False, None, "gelu_tanh"),
    (1, 300, 1024, 128, False, True, 4, "silu"),
]


def _inputs(m, inter, k, group, zero_point, bias, dtype):
    torch.manual_seed(m * 100 + inter + k + group)
    x, w, b = torch.randn(m, k).to(dtype), torch.randn(2 * inter, k) * 0.05, torch.randn(2 * inter).to(dtype)
    packed, scales, *zeros = int_weight.quantize_int4(w, group, zero_point=zero_point)
    return x, packed, scales, b if bias else None, zeros[0] if zeros else None


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,inter,k,group,zero_point,bias,split_k,activation", GATED_CASES)
def test_gated_epilogue_gives_the_unfused_kernels_bits(m, inter, k, group, zero_point, bias, split_k, activation,
                                                      dtype, monkeypatch):
    """The same rows summed in the same order (the same block size and K splits as the gate-up linear alone), rounded
    to x's dtype, then act(gate) * up as the activation kernel computes it: torch.equal with the two launchers; and
    within the kernels' tolerance of the reference."""
    from fastllm.kernels import quant_linear, triton_on_cpu

    x, packed, scales, b, zeros = _inputs(m, inter, k, group, zero_point, bias, dtype)
    counters = torch.zeros(64, dtype=torch.int32)
    act = {"silu": kernels.silu_and_mul, "gelu": kernels.gelu_and_mul,
           "gelu_tanh": lambda t: kernels.gelu_and_mul(t, approximate="tanh")}[activation]  # fmt: skip
    with triton_on_cpu():
        fused = quant_linear._int4_gemv(x, packed, scales, b, zeros, split_k=split_k, split_counters=counters,
                                        activation=activation)  # fmt: skip
        unfused = act(quant_linear._int4_gemv(x, packed, scales, b, zeros, split_k=split_k, split_counters=counters))
        public = kernels.int4_linear_and_act(x, packed, scales, b, zeros, activation=activation,
                                             split_counters=counters)  # fmt: skip
    assert fused is not None and fused.shape == (m, inter) and fused.dtype == dtype
    assert torch.equal(fused, unfused)
    assert torch.count_nonzero(counters).item() == 0
    assert_close(public, kernels.int4_linear_and_act_ref(x, packed, scales, b, zeros, activation=activation))


def test_split_without_counters_falls_back_to_the_two_launchers():
    """K splits need the kernel to sum them (split counters): without, _int4_gemv declines (None) and the public op
    runs the linear and the activation kernel (the same result)."""
    from fastllm.kernels import quant_linear, triton_on_cpu

    x, packed, scales, b, zeros = _inputs(1, 150, 384, 128, True, True, torch.float32)
    with triton_on_cpu():
        assert quant_linear._int4_gemv(x, packed, scales, b, zeros, split_k=3, activation="silu") is None
        got = kernels.int4_linear_and_act(x, packed, scales, b, zeros)
        expected = kernels.silu_and_mul(kernels.int4_linear(x, packed, scales, b, zeros))
    assert torch.equal(got, expected)


def test_more_rows_and_the_cpu_run_the_unfused_pair():
    """Three rows or more (the decode kernel's dot form) and CPU tensors outside triton_on_cpu: the linear, then the
    activation (so the reference's result on the CPU)."""
    x, packed, scales, b, zeros = _inputs(5, 36, 256, 64, False, True, torch.float32)
    got = kernels.int4_linear_and_act(x, packed, scales, b, zeros, activation="gelu")
    assert torch.equal(got, kernels.int4_linear_and_act_ref(x, packed, scales, b, zeros, activation="gelu"))


def test_bad_activation_and_counters_are_refused():
    x, packed, scales, b, zeros = _inputs(1, 36, 256, 64, False, True, torch.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        kernels.int4_linear_and_act(x, packed, scales, activation="relu")
    with pytest.raises(ValueError, match="split_counters must be int32"):
        kernels.int4_linear_and_act(x, packed, scales, split_counters=torch.zeros(4))


# --- the int4_act_fusion pass -----------------------------------------------------------------------------------------


def _llama():
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=16, vocab_size=128)  # fmt: skip
    return T.AutoModelForCausalLM.from_config(config).eval()


def test_pass_folds_each_layers_activation_into_its_int4_gate_up_cpu():
    """Opt-in: each layer's SiLU * up and the merged int4 gate-up projection it reads become one int4_linear_and_act
    call (groups of 32: the hidden size 64 holds no group of 128, whose layers would stay float). The logits and
    greedy tokens are the default passes' (on the CPU both run the references)."""
    import fastllm

    ids = torch.tensor([[1, 7, 30, 2, 99, 5, 64, 3]])
    logits, tokens = [], []
    for passes in (fastllm.DEFAULT_PASSES, (*fastllm.DEFAULT_PASSES, "int4_act_fusion")):
        model = fastllm.optimize(_llama(), quantization=fastllm.QuantConfig("int4", group_size=32), passes=passes,
                                 max_num_seqs=2)  # fmt: skip
        with torch.no_grad():
            logits.append(model(ids).logits)
        tokens.append(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0))
        if "int4_act_fusion" in passes:
            assert fastllm.explain(model).matches["int4_act_fusion"] == 3
        del model
    assert torch.equal(logits[0], logits[1]) and torch.equal(tokens[0], tokens[1])


def test_pass_launches_the_down_projection_after_the_fused_call_without_pdl():
    """On the graph: the fused call replaces the gate-up linear and the activation, and the int4 down projection
    reading it gets pdl=False (with PDL the fused call measured slower: the pass's docstring)."""
    from torch import fx

    from fastllm.passes import int4_act_fusion
    from fastllm.passes._context import PassContext, WeightMerger

    graph = fx.Graph()
    x, packed, scales, down_packed, down_scales, counters = (graph.placeholder(n) for n in (
        "x", "packed", "scales", "down_packed", "down_scales", "counters"))
    gate_up = graph.call_function(kernels.int4_linear, (x, packed, scales), {"split_counters": counters})
    act = graph.call_function(kernels.silu_and_mul, (gate_up,))
    down = graph.call_function(kernels.int4_linear, (act, down_packed, down_scales), {"split_counters": counters})
    graph.output(down)
    ctx = PassContext(gm=fx.GraphModule(torch.nn.Module(), graph), tensors={}, merger=WeightMerger())
    assert int4_act_fusion.apply(ctx) == 1
    fused = down.args[0]
    assert fused.target is kernels.int4_linear_and_act and fused.kwargs["activation"] == "silu"
    assert down.kwargs == {"split_counters": counters, "pdl": False}


def test_pdl_must_be_a_bool():
    x = torch.randn(1, 64)
    packed, scales = int_weight.quantize_int4(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="pdl must be True or False"):
        kernels.int4_linear(x, packed, scales, pdl=0)
    assert torch.equal(kernels.int4_linear(x, packed, scales, pdl=False), kernels.int4_linear(x, packed, scales))


# --- GPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("inter", [14336, 300])
@pytest.mark.parametrize("chunk_groups", [1, 4])
def test_gated_epilogue_equals_the_unfused_kernels_on_cuda(chunk_groups, inter, rows, zero_point, activation,
                                                           monkeypatch):
    """bf16 on CUDA (the packed loop at these rows), K split and summed by the kernel's last program: the unfused
    pair's bits. I = 300 leaves a partial block. chunk_groups: quant_linear.INT4_CHUNK_GROUPS (both calls)."""
    from fastllm.kernels import quant_linear
    from fastllm.kernels.fp8_input_linear import ACTIVATIONS

    monkeypatch.setattr(quant_linear, "INT4_CHUNK_GROUPS", chunk_groups)

    torch.manual_seed(9)
    packed, scales, *zeros = int_weight.quantize_int4(torch.randn(2 * inter, 4096, device="cuda") * 0.02, 128,
                                                      zero_point=zero_point)  # fmt: skip
    zeros = zeros[0] if zeros else None
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2 * inter, device="cuda", dtype=torch.bfloat16)
    counters = torch.zeros(4096, dtype=torch.int32, device="cuda")
    got = kernels.int4_linear_and_act(x, packed, scales, b, zeros, activation=activation, split_counters=counters)
    expected = ACTIVATIONS[activation][0](kernels.int4_linear(x, packed, scales, b, zeros, split_counters=counters))
    assert got.shape == (rows, inter)
    assert torch.equal(got, expected)
    assert torch.count_nonzero(counters).item() == 0
    # Without programmatic dependent launch (the down projection after the fused call): the same bits
    plain = kernels.int4_linear(x, packed, scales, b, zeros, split_counters=counters)
    assert torch.equal(kernels.int4_linear(x, packed, scales, b, zeros, split_counters=counters, pdl=False), plain)


@pytest.mark.gpu
def test_pass_on_cuda_gives_the_default_passes_tokens():
    """Through CUDA graphs (batch-1 decode: the fused epilogue) the greedy tokens and the prompt's logits are the
    default passes'."""
    import fastllm

    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(5)).cuda()
    tokens, logits = [], []
    for passes in (fastllm.DEFAULT_PASSES, (*fastllm.DEFAULT_PASSES, "int4_act_fusion")):
        model = fastllm.optimize(_llama().to("cuda", torch.bfloat16), quantization=fastllm.QuantConfig(
            "int4", group_size=32), passes=passes, max_num_seqs=4, num_kv_tokens=4096)  # fmt: skip
        with torch.no_grad():
            logits.append(model(ids).logits)
        tokens.append(model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0))
        del model
    assert torch.equal(logits[0], logits[1]) and torch.equal(tokens[0], tokens[1])
