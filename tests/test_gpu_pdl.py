"""Programmatic dependent launch (kernels/_registry.py): on a Hopper GPU the kernels launch with it, and it changes
only when kernels start, never what they compute."""

import gc

import pytest
import torch

import fastllm
from fastllm.kernels import _registry
from tests._models import VOCAB, build

pytestmark = pytest.mark.gpu


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.skipif(not _hopper(), reason="PDL needs compute capability 9.0+")
def test_kernels_launch_with_pdl_on_hopper_for_small_steps_or_when_asked(monkeypatch):
    on = {"USE_PDL": True, "launch_pdl": True}
    few, many = torch.empty(_registry.PDL_MAX_ROWS, 8, device="cuda"), torch.empty(_registry.PDL_MAX_ROWS + 1, 8,
                                                                                    device="cuda")
    monkeypatch.setattr(_registry, "_PDL_SETTING", "")  # FASTLLM_PDL unset: small steps only
    assert _registry.pdl_options(few) == on
    assert _registry.pdl_options(many) == {}
    monkeypatch.setattr(_registry, "_PDL_SETTING", "1")
    assert _registry.pdl_options(many) == on
    monkeypatch.setattr(_registry, "_PDL_SETTING", "0")
    assert _registry.pdl_options(few) == {}
    monkeypatch.setattr(_registry, "_PDL_SETTING", "1")
    assert _registry.pdl_options(few.cpu()) == {}


@pytest.mark.skipif(not _hopper(), reason="PDL needs compute capability 9.0+")
@pytest.mark.parametrize("family,quantization", [("llama", None), ("gemma", None), ("llama", "fp8")])
def test_pdl_leaves_greedy_tokens_and_logits_bit_identical(family, quantization, tmp_path, monkeypatch):
    """bf16 (and FP8 weights), decode through CUDA graphs: the same model with PDL on and off gives bit-identical
    logits and tokens (the same kernels with the same launch settings sum in the same order; a missing wait would
    read stale data)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (3, 19), generator=g).cuda()
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(_registry, "_PDL_SETTING", "1" if enabled else "0")
        model = fastllm.optimize(build(family, tmp_path / str(enabled), dtype=torch.bfloat16).cuda(),
                                 num_kv_tokens=4096, quantization=quantization)
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
        results.append((logits, tokens))
        del model
        gc.collect()
        torch.cuda.empty_cache()
    (logits_on, tokens_on), (logits_off, tokens_off) = results
    assert torch.equal(logits_on, logits_off)
    assert torch.equal(tokens_on, tokens_off)


@pytest.mark.skipif(not _hopper(), reason="PDL needs compute capability 9.0+")
@pytest.mark.parametrize("m,n,k", [(1, 37, 1000), (1, 4100, 4096), (3, 300, 2050), (9, 257, 1152)])
def test_gemvs_with_pdl_match_pdl_off(m, n, k, monkeypatch):
    """The skinny GEMM (bf16, fp8, int8 weights) and the int4 GEMV launched with PDL: results bit-identical to the
    launch without it, with K splits (few outputs), a ragged K and rows past N."""
    from fastllm.kernels import quant_linear, skinny_gemm
    from fastllm.quant import fp8, int_weight

    torch.manual_seed(0)
    k4 = -(-k // 128) * 128  # int4 groups of 128
    x, x4 = (torch.randn(m, kk, device="cuda", dtype=torch.bfloat16) for kk in (k, k4))
    w, w4 = (torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * kk**-0.5 for kk in (k, k4))
    fp8_weight, int8_weight, int4_weight = fp8.quantize_weight(w), int_weight.quantize_int8(w), \
        int_weight.quantize_int4(w4, 128)
    cases = {"bf16": lambda: skinny_gemm.skinny_linear(x, w),
             "fp8": lambda: quant_linear.fp8_linear(x, *fp8_weight),
             "int8": lambda: quant_linear.int8_linear(x, *int8_weight),
             "int4": lambda: quant_linear.int4_linear(x4, *int4_weight)}
    for name, launch in cases.items():
        outputs = []
        for enabled in (True, False):
            monkeypatch.setattr(_registry, "_PDL_SETTING", "1" if enabled else "0")
            outputs.append(launch())
        assert torch.equal(outputs[0], outputs[1]), name
