"""rms_norm_fp8_linear and the fp8_input_quant pass: the norm's kernel quantizing its rows for the FP8 GEMM.

The kernel's codes and scales must be what `quantize_rows_fp8` makes of the norm's stored output (the same
arithmetic), so everything after them is bit for bit the unfused path's. In the interpreter (CPU) the comparison is
exact on rows whose quantized values e4m3 holds exactly (the interpreter rounds fp32 -> e4m3 wrongly where rounding
crosses a power of two: tests/test_kv_fp8.py), and on random rows for the scales and the residual sum (fp32
arithmetic); the GPU tests compare everything bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import fastllm
from fastllm import kernels
from fastllm.kernels import triton_on_cpu
from fastllm.kernels._act_and_mul import act_and_mul_fp8_rows
from fastllm.kernels.fp8_input_linear import ACTIVATIONS
from fastllm.kernels.rms_norm import rms_norm_fp8_rows
from fastllm.quant import fp8

FP8 = torch.float8_e4m3fn


def _reference_rows(x, weight, eps, residual=None, **norm):
    """The unfused path's codes and scales (the norm's output quantized by torch), and the residual sum."""
    if residual is None:
        normed, summed = kernels.rms_norm_ref(x, weight, eps, **norm), None
    else:
        normed, summed = kernels.fused_add_rms_norm_ref(x, residual, weight, eps, **norm)
    codes, scales = fp8.quantize_rows(normed)
    return codes, scales, summed


def _exact_rows(m, n, dtype, generator, residual):
    """Rows whose normalised values are +-1 exactly (eps 0, |x| 1) times a weight of e4m3 values whose largest
    magnitude is 448 x 2^-5: every quantized value is an e4m3 value, no rounding anywhere."""
    signs = torch.randint(0, 2, (m, n), generator=generator).float() * 2 - 1
    weight = (torch.randn(n, generator=generator) * 100).clamp(-448, 448).to(FP8).float()
    weight[0] = 448.0
    weight = (weight * 2.0**-5).to(dtype)
    if residual:
        return (signs * 0.5).to(dtype), weight, (signs * 0.5).to(dtype)
    return signs.to(dtype), weight, None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("gemma", [False, True])
def test_norm_kernel_quantizes_rows_as_the_quantize_kernel_would_cpu(dtype, residual, gemma):
    g = torch.Generator().manual_seed(1)
    x, weight, res = _exact_rows(19, 96, dtype, g, residual)
    norm = {"weight_offset": 1.0, "cast_before_weight": False} if gemma else {}
    if gemma:
        weight = (weight.float() - 1.0).to(dtype)  # (1 + w) is the e4m3-valued factor (exact in fp32)
    with triton_on_cpu():
        codes, scales, summed = rms_norm_fp8_rows(x, weight, 0.0, residual=res, **norm)
    ref_codes, ref_scales, ref_summed = _reference_rows(x, weight, 0.0, res, **norm)
    assert codes.dtype == FP8 and scales.shape == (19, 1)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))
    assert torch.equal(scales, ref_scales)
    assert (summed is None) == (not residual) and (summed is None or torch.equal(summed, ref_summed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_norm_kernel_scales_and_residual_on_random_rows_cpu(dtype):
    g = torch.Generator().manual_seed(2)
    x, r, w = torch.randn(23, 200, generator=g).to(dtype), torch.randn(23, 200, generator=g).to(dtype), \
        torch.randn(200, generator=g).to(dtype)
    with triton_on_cpu():
        codes, scales, summed = rms_norm_fp8_rows(x, w, 1e-6, residual=r)
    ref_codes, ref_scales, ref_summed = _reference_rows(x, w, 1e-6, r)
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)  # the norm's fp32 sums differ in order only
    assert torch.equal(summed, ref_summed)
    # Within an e4m3 step of the reference (the interpreter's rounding bug aside: at most 5% of the codes)
    close = (codes.float() - ref_codes.float()).abs() <= ref_codes.float().abs() * 2.0**-3 + 2.0**-9
    assert close.float().mean() >= 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activation_kernel_quantizes_rows_as_the_quantize_kernel_would_cpu(dtype, activation):
    """Gates of 128, where each activation is the identity in fp32 (exp(-128) and 1 - erf(90) are 0), times ups of
    e4m3 values (a row's largest 448 x 2^-12): the products and their quantized values are exact, so the codes are
    compared bit for bit (the interpreter's e4m3 rounding aside, see the module docstring)."""
    g = torch.Generator().manual_seed(6)
    up = (torch.randn(13, 160, generator=g) * 100).clamp(-448, 448).to(FP8).float()
    up[:, 0] = 448.0
    x = torch.cat([torch.full((13, 160), 128.0), up * 2.0**-12], dim=1).to(dtype)
    with triton_on_cpu():
        codes, scales = act_and_mul_fp8_rows(x, activation)
    ref_codes, ref_scales = fp8.quantize_rows(ACTIVATIONS[activation][1](x))
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))
    assert torch.equal(scales, ref_scales)


def test_activation_kernel_scales_on_random_rows_cpu():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(21, 2 * 300, generator=g).to(torch.float16)
    with triton_on_cpu():
        codes, scales = act_and_mul_fp8_rows(x, "silu")
        stored = kernels.silu_and_mul(x)  # what the activation kernel stores (in fp32, rounded once to fp16)
    ref_codes, ref_scales = fp8.quantize_rows(stored)
    assert torch.equal(scales, ref_scales)  # the stored products' largest magnitude, divided once
    close = (codes.float() - ref_codes.float()).abs() <= ref_codes.float().abs() * 2.0**-3 + 2.0**-9
    assert close.float().mean() >= 0.95


def test_launcher_runs_the_unfused_launchers_up_to_16_rows_and_on_the_cpu():
    """On CPU tensors (and up to 16 rows anywhere) the launcher is the two launchers in a row: the reference's bits."""
    g = torch.Generator().manual_seed(3)
    x, r, w = torch.randn(40, 64, generator=g), torch.randn(40, 64, generator=g), torch.randn(64, generator=g)
    qweight, scale = fp8.quantize_weight(torch.randn(48, 64, generator=g))
    bias = torch.randn(48, generator=g)
    y = kernels.rms_norm_fp8_linear(x, w, 1e-6, qweight, scale, bias)
    assert torch.equal(y, kernels.rms_norm_fp8_linear_ref(x, w, 1e-6, qweight, scale, bias))
    y, s = kernels.rms_norm_fp8_linear(x, w, 1e-6, qweight, scale, bias, residual=r)
    y_ref, s_ref = kernels.rms_norm_fp8_linear_ref(x, w, 1e-6, qweight, scale, bias, residual=r)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
    gate_up = torch.randn(40, 2 * 64, generator=g)
    for activation in ACTIVATIONS:
        y = kernels.act_and_mul_fp8_linear(gate_up, qweight, scale, bias, activation=activation)
        assert torch.equal(y, kernels.act_and_mul_fp8_linear_ref(gate_up, qweight, scale, bias, activation=activation))
    with pytest.raises(ValueError, match="activation must be one of"):
        kernels.act_and_mul_fp8_linear(gate_up, qweight, scale, bias, activation="relu")


def _llama():
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128)
    return T.AutoModelForCausalLM.from_config(config).eval()


def _gemma():  # Gemma's norm: (1 + w) in fp32 after the normalisation; GELU-tanh gating
    torch.manual_seed(0)
    config = T.GemmaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=16, vocab_size=128)
    return T.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("build", [_llama, _gemma], ids=["llama", "gemma"])
def test_pass_folds_each_norm_and_activation_into_its_fp8_linear_cpu(build):
    """Opt-in: each layer's two norms (the first plain, the others after the residual add) read by the merged QKV
    and gate-up FP8 linears become rms_norm_fp8_linear calls and its SiLU * up (read by the down projection) an
    act_and_mul_fp8_linear call; the final norm (read by the float LM head) stays. The logits are the default
    passes' (on the CPU both run the references)."""
    ids = torch.tensor([[1, 7, 30, 2, 99, 5, 64, 3]])
    results = {}
    for passes in (fastllm.DEFAULT_PASSES, (*fastllm.DEFAULT_PASSES, "fp8_input_quant")):
        model = fastllm.optimize(build(), quantization="fp8", passes=passes, max_num_seqs=2)
        with torch.no_grad():
            results[passes] = model(ids).logits
        report = fastllm.explain(model)
        if "fp8_input_quant" in passes:
            assert report.matches["fp8_input_quant"] == 3 * 3
        del model
    first, second = results.values()
    assert torch.equal(first, second)


# --- GPU -----------------------------------------------------------------------------------------------------------

NEEDS_FP8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="FP8 GEMMs need compute capability 8.9+")


@pytest.mark.gpu
@NEEDS_FP8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [17, 300])
@pytest.mark.parametrize("residual", [False, True])
def test_launcher_equals_the_unfused_kernels_on_cuda(dtype, rows, residual):
    torch.manual_seed(4)
    x = torch.randn(rows, 4096, device="cuda", dtype=dtype)
    r = torch.randn_like(x) if residual else None
    w = torch.randn(4096, device="cuda", dtype=dtype)
    qweight, scale = fp8.quantize_weight(torch.randn(6144, 4096, device="cuda") * 0.02)
    bias = torch.randn(6144, device="cuda", dtype=dtype)
    got = kernels.rms_norm_fp8_linear(x, w, 1e-5, qweight, scale, bias, residual=r)
    if residual:
        normed, summed = kernels.fused_add_rms_norm(x, r, w, 1e-5)
        assert torch.equal(got[1], summed)
        got = got[0]
    else:
        normed = kernels.rms_norm(x, w, 1e-5)
    assert torch.equal(got, kernels.fp8_linear(normed, qweight, scale, bias))


@pytest.mark.gpu
@NEEDS_FP8
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("rows", [17, 300])
def test_activation_launcher_equals_the_unfused_kernels_on_cuda(activation, rows):
    torch.manual_seed(8)
    gate_up = torch.randn(rows, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    qweight, scale = fp8.quantize_weight(torch.randn(4096, 14336, device="cuda") * 0.01)
    got = kernels.act_and_mul_fp8_linear(gate_up, qweight, scale, activation=activation)
    assert torch.equal(got, kernels.fp8_linear(ACTIVATIONS[activation][0](gate_up), qweight, scale))


@pytest.mark.gpu
@NEEDS_FP8
def test_pass_on_cuda_gives_the_default_passes_tokens():
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(5)).cuda()
    tokens, logits = [], []
    for passes in (fastllm.DEFAULT_PASSES, (*fastllm.DEFAULT_PASSES, "fp8_input_quant")):
        model = fastllm.optimize(_llama().to("cuda", torch.bfloat16), quantization="fp8", passes=passes,
                                 max_num_seqs=4, num_kv_tokens=4096)  # fmt: skip
        with torch.no_grad():
            logits.append(model(ids).logits)  # 80 rows: the fused kernel's path
        tokens.append(model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0))
        del model
    assert torch.equal(logits[0], logits[1]) and torch.equal(tokens[0], tokens[1])
