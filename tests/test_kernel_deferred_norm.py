"""The skinny GEMM's deferred RMSNorm (`fused_linear(..., prologue="rms_norm_deferred")`): the product reads
x * (offset + norm weight) in fp32 and sums x^2 on the way; the rows' 1 / rms scales the finished product.

    y = (x * (offset + w)) @ W^T * rsqrt(mean(x^2) + eps) + bias      rounded once to x's dtype (+ residual, again)

Checked against that formula computed exactly (fp64) from the same inputs. Nothing is rounded before the output, so
the tolerance is one rounding of the output (and one of the residual add), the kernel's fp32 sums being ~1e-7 off.
Against the unfused kernels (the norm kernel, which rounds the normalised x as Hugging Face does, then the GEMM) the
difference is that rounding of each normalised element: within two roundings of the output's dtype.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from test_kernel_fused_linear import TOLERANCES, _assert_close, _expected

from fastllm.kernels import fused_linear, triton_on_cpu
from fastllm.kernels import skinny_gemm as sg

fl = importlib.import_module("fastllm.kernels.fused_linear")


def _inputs(m, n, k, dtype, *, device="cpu", bias=False, residual=True, norm_offset=0.0, seed=0):
    g = torch.Generator(device).manual_seed(seed + m * 7919 + n * 31 + k)
    x = (torch.randn(m, k, generator=g, device=device) * 3).to(dtype)
    weight = (torch.randn(n, k, generator=g, device=device) * k**-0.5).to(dtype)
    kwargs = {"prologue": "rms_norm_deferred", "norm_eps": 1e-5, "norm_offset": norm_offset,
              "norm_weight": (1 + 0.2 * torch.randn(k, generator=g, device=device)).to(dtype)}  # fmt: skip
    if bias:
        kwargs["bias"] = torch.randn(n, generator=g, device=device).to(dtype)
    if residual:
        kwargs["residual"] = torch.randn(m, n, generator=g, device=device).to(dtype)
    return x, weight, kwargs


def _deferred_expected(x, weight, kwargs, weight_scale=None):
    """The formula in fp64 from the same inputs: the output rounded to x's dtype, then the residual added."""
    xd = x.double()
    w = kwargs["norm_offset"] + kwargs["norm_weight"].double()
    weight = weight.double() if weight_scale is None else weight.double() * weight_scale.double()[:, None]
    y = (xd * w) @ weight.T * torch.rsqrt(xd.square().mean(-1, keepdim=True) + kwargs["norm_eps"])
    if kwargs.get("bias") is not None:
        y = y + kwargs["bias"].double()
    y = y.to(x.dtype).double()
    residual = kwargs.get("residual")
    return y if residual is None else y + residual.double()


def _launch_rows(x, weight, kwargs):
    """The kernel itself on all of x's rows (fused_linear asks it for one row: PROLOGUE_MAX_ROWS), with the plain
    GEMV's settings for that many rows and one K split, as fused_linear launches it."""
    m, (n, k) = x.shape[0], weight.shape
    cfg = {**sg._config(m, n, k, x.dtype, x.device), "split_k": 1}
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    norm = (kwargs["norm_weight"], kwargs["norm_eps"], kwargs["norm_offset"], True)
    sg._launch(x, weight, kwargs.get("bias"), out, None, cfg, residual=kwargs.get("residual"),
               prologue="rms_norm_deferred", norm=norm)  # fmt: skip
    return out


@pytest.mark.parametrize("n,k", [(96, 1000), (33, 1536), (80, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias,offset", [(False, 0.0), (True, 1.0)])
def test_one_row_against_the_formula_cpu(n, k, dtype, bias, offset):
    """One row (what fused_linear fuses): ragged K chunks, N past the last block, a bias and Gemma's 1 + w."""
    x, weight, kwargs = _inputs(1, n, k, dtype, bias=bias, norm_offset=offset)
    with triton_on_cpu():
        y = fused_linear(x, weight, **kwargs)
    _assert_close(y, _deferred_expected(x, weight, kwargs), dtype, roundings=2)
    # Against the unfused kernels' values (the normalised x rounded): within the same two roundings
    _assert_close(y, _expected(x, weight, {**kwargs, "prologue": "rms_norm"}), dtype, roundings=2)


@pytest.mark.parametrize("block_n", [8, 16])
def test_more_rows_of_w_a_program_cpu(monkeypatch, block_n):
    """fused_linear.DEFERRED_NORM_BLOCK_N (benchmarks sweep it): more rows of W a program, shorter chunks."""
    monkeypatch.setattr(fl, "DEFERRED_NORM_BLOCK_N", block_n)
    x, weight, kwargs = _inputs(1, 70, 1000, torch.float32, bias=True)
    with triton_on_cpu():
        y = fused_linear(x, weight, **kwargs)
    _assert_close(y, _deferred_expected(x, weight, kwargs), torch.float32, roundings=2)


@pytest.mark.parametrize("m", [2, 3, 4, 6, 16])
def test_several_rows_and_the_dot_form_cpu(m):
    """Rows 2-4 (the broadcast form's other accumulators) and 6 / 16 (the tl.dot form, which rounds x * w to x's
    dtype for the MMA: one more rounding)."""
    dtype = torch.float16
    x, weight, kwargs = _inputs(m, 72, 520, dtype)
    with triton_on_cpu():
        y = _launch_rows(x, weight, kwargs)
    _assert_close(y, _deferred_expected(x, weight, kwargs), dtype, roundings=3)


def test_more_rows_and_the_cpu_take_the_unfused_norm():
    """Past one row, and on the CPU without Triton, the deferred norm is the norm kernel (or its reference) then the
    linear: the rms_norm prologue's values exactly."""
    x, weight, kwargs = _inputs(3, 40, 256, torch.float32)
    deferred = fused_linear(x, weight, **kwargs)
    assert torch.equal(deferred, fused_linear(x, weight, **{**kwargs, "prologue": "rms_norm"}))
    with triton_on_cpu():
        several = fused_linear(x, weight, **kwargs)
        assert torch.equal(several, fused_linear(x, weight, **{**kwargs, "prologue": "rms_norm"}))


def test_a_split_k_launch_is_refused():
    x, weight, kwargs = _inputs(1, 8, 2048, torch.float32)
    cfg = {**sg._config(1, 8, 2048, x.dtype, x.device), "split_k": 4}
    out = torch.empty(1, 8)
    with triton_on_cpu(), pytest.raises(ValueError, match="one K split"):
        sg._launch(x, weight, None, out, None, cfg, prologue="rms_norm_deferred",
                   norm=(kwargs["norm_weight"], 1e-5, 0.0, True))  # fmt: skip


def test_bad_inputs_name_the_prologue():
    x, weight, kwargs = _inputs(1, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="'rms_norm_deferred' needs norm_weight"):
        fused_linear(x, weight, prologue="rms_norm_deferred")
    with pytest.raises(ValueError, match="norm_eps must be a finite number"):
        fused_linear(x, weight, **{**kwargs, "norm_eps": float("nan")})
    with pytest.raises(ValueError, match="prologue must be None or one of"):
        fused_linear(x, weight, prologue="rms_norm_later")


def _with_and_without_pdl(call) -> list[torch.Tensor]:
    """call()'s outputs with the deferred norm's launches taking PDL and not (skinny_gemm.PDL_WITH_DEFERRED_NORM)."""
    outputs = []
    for pdl in (True, False):
        sg.PDL_WITH_DEFERRED_NORM = pdl
        try:
            outputs.append(call())
        finally:
            sg.PDL_WITH_DEFERRED_NORM = True
    return outputs


# --- GPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (28672, 4096), (12288, 4096), (96, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama_shapes_gpu(n, k, dtype):
    """Llama-3.1-8B's QKV and gate-up, Llama-2-7B's QKV, and a ragged shape, at one row, with and without PDL."""
    x, weight, kwargs = _inputs(1, n, k, dtype, device="cuda")
    expected = _deferred_expected(x, weight, kwargs)
    for y in _with_and_without_pdl(lambda: fused_linear(x, weight, **kwargs)):
        _assert_close(y, expected, dtype, roundings=2)


@pytest.mark.gpu
def test_fp8_weights_gpu():
    """One-byte weights with per-channel scales (quantization="fp8") take the deferred norm as float ones do."""
    from fastllm.quant import fp8

    x, weight, kwargs = _inputs(1, 6144, 4096, torch.bfloat16, device="cuda")
    qweight, scale = fp8.quantize_weight(weight.float())
    y = fused_linear(x, qweight, weight_scale=scale, **kwargs)
    _assert_close(y, _deferred_expected(x, qweight, kwargs, weight_scale=scale), torch.bfloat16, roundings=2)


# --- the norm's weight folded into W ("rms_scale_deferred") -----------------------------------------------------


def _folded(weight, kwargs):
    """(W * (offset + w) rounded to W's dtype, the scale prologue's keywords): what a caller folding the norm passes."""
    folded = (weight.double() * (kwargs["norm_offset"] + kwargs["norm_weight"].double())).to(weight.dtype)
    scale_kwargs = {key: value for key, value in kwargs.items() if key not in ("norm_weight", "norm_offset")}
    return folded, {**scale_kwargs, "prologue": "rms_scale_deferred"}


def _scale_expected(x, folded, kwargs):
    ones = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    return _deferred_expected(x, folded, {**kwargs, "norm_weight": ones, "norm_offset": 0.0})


@pytest.mark.parametrize("n,k", [(96, 1000), (33, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias,offset", [(False, 0.0), (True, 1.0)])
def test_folded_weight_against_the_formula_cpu(n, k, dtype, bias, offset):
    """The product of x and the folded W, scaled by the rows' 1 / rms: one rounding of the output (and one of the
    residual add) from the formula; from the unfolded deferred norm, the folded W's own rounding more."""
    x, weight, kwargs = _inputs(1, n, k, dtype, bias=bias, norm_offset=offset)
    folded, scale_kwargs = _folded(weight, kwargs)
    with triton_on_cpu():
        y = fused_linear(x, folded, **scale_kwargs)
    _assert_close(y, _scale_expected(x, folded, scale_kwargs), dtype, roundings=2)
    _assert_close(y, _deferred_expected(x, weight, kwargs), dtype, roundings=3)


@pytest.mark.parametrize("m", [2, 4])
def test_folded_weight_on_several_rows_of_the_kernel_cpu(m):
    """The broadcast form's other accumulators (fused_linear asks for one row; the kernel takes up to 4)."""
    x, weight, kwargs = _inputs(m, 40, 700, torch.float16)
    folded, scale_kwargs = _folded(weight, kwargs)
    cfg = {**sg._config(m, 40, 700, x.dtype, x.device), "split_k": 1}
    out = torch.empty(m, 40, dtype=x.dtype)
    with triton_on_cpu():
        sg._launch(x, folded, None, out, None, cfg, residual=kwargs["residual"], prologue="rms_scale_deferred",
                   norm=(x, kwargs["norm_eps"], 0.0, True))  # fmt: skip
    _assert_close(out, _scale_expected(x, folded, scale_kwargs), torch.float16, roundings=2)


@pytest.mark.parametrize("m", [3, 6, 16])
def test_folded_weight_fuses_up_to_16_rows_cpu(m):
    """Unlike the other norm prologues (one row), the folded norm fuses wherever the skinny GEMM runs: it adds only
    x^2 to a chunk. 3 rows: the broadcast form; 6 and 16: the tl.dot form (x read as it is, nothing rounded more)."""
    x, weight, kwargs = _inputs(m, 48, 300, torch.float16)
    folded, scale_kwargs = _folded(weight, kwargs)
    with triton_on_cpu():
        y = fused_linear(x, folded, **scale_kwargs)
        assert fl._fusable(x, None, m, "rms_scale_deferred")
    _assert_close(y, _scale_expected(x, folded, scale_kwargs), torch.float16, roundings=2)


def test_folded_weight_past_16_rows_is_the_norm_with_a_weight_of_ones():
    x, weight, kwargs = _inputs(17, 40, 256, torch.float32)
    folded, scale_kwargs = _folded(weight, kwargs)
    ones = torch.ones(256)
    unfused = fused_linear(x, folded, **{**scale_kwargs, "prologue": "rms_norm", "norm_weight": ones})
    assert torch.equal(fused_linear(x, folded, **scale_kwargs), unfused)
    with triton_on_cpu():
        assert torch.equal(fused_linear(x, folded, **scale_kwargs),
                           fused_linear(x, folded, **{**scale_kwargs, "prologue": "rms_norm", "norm_weight": ones}))


def test_folded_weight_refuses_a_norm_weight():
    x, weight, kwargs = _inputs(1, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="takes no norm_weight"):
        fused_linear(x, weight, prologue="rms_scale_deferred", norm_weight=kwargs["norm_weight"])
    with pytest.raises(ValueError, match="norm_eps must be a finite number"):
        fused_linear(x, weight, prologue="rms_scale_deferred", norm_eps=float("inf"))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (28672, 4096), (12288, 4096), (22016, 4096), (96, 1000)])
def test_folded_weight_llama_shapes_gpu(n, k):
    """Both shapes' QKV and gate-up at one row in bf16, with and without PDL."""
    x, weight, kwargs = _inputs(1, n, k, torch.bfloat16, device="cuda")
    folded, scale_kwargs = _folded(weight, kwargs)
    expected = _scale_expected(x, folded, scale_kwargs)
    for y in _with_and_without_pdl(lambda: fused_linear(x, folded, **scale_kwargs)):
        _assert_close(y, expected, torch.bfloat16, roundings=2)


assert set(TOLERANCES) >= {torch.float32, torch.float16, torch.bfloat16}
