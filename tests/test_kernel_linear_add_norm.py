"""linear_add_rms_norm: a decode linear whose last program adds the residual and RMS-normalises the output, against
the unfused kernels (fused_linear, then fused_add_rms_norm) in the interpreter on the CPU and on the GPU.

What must agree, and how closely:
- `summed` (the linear's output, rounded to x's dtype, plus the residual, rounded again): exactly. The GEMV is the
  skinny GEMM with the same launch settings, and the add is the norm kernel's operation.
- `normed`: the norm kernel's operations, but its fp32 sum of squares is taken in another order (1024-column chunks
  and the GEMV's 4 warps against one row-wide sum over the norm kernel's warps), so 1 / rms may differ in its last
  fp32 bits and a rounded output element by one ulp of its dtype: 2^-10 relative in fp16 (|normed| < 4 here: 4e-3
  absolute), 2^-7 in bf16 (3e-2), a few fp32 ulps in fp32 (1e-5).
"""

import importlib

import pytest
import torch

from fastllm.kernels import (
    fused_add_rms_norm,
    fused_linear,
    linear_add_rms_norm,
    linear_add_rms_norm_ref,
    triton_on_cpu,
)

lan = importlib.import_module("fastllm.kernels.linear_add_norm")

NORMED_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# (M, N, K), K under 1024 (one K split on any machine): one row, three rows with N past the last block of W, N over
# two of the norm's 1024-column chunks, the tl.dot form (16 rows)
CASES = [(1, 96, 1000), (3, 33, 1000), (1, 2500, 64), (16, 80, 600)]


def _inputs(m, n, k, dtype, *, prologue=None, device="cpu", bias=False, scheme=None, seed=0):
    g = torch.Generator(device).manual_seed(seed + m * 7919 + n * 31 + k)
    width = 2 * k if prologue else k
    x = (torch.randn(m, width, generator=g, device=device) * 3).to(dtype)
    weight = (torch.randn(n, k, generator=g, device=device) * k**-0.5).to(dtype)
    kwargs = {"prologue": prologue, "weight_scale": None}
    if scheme == "int8":
        scale = weight.float().abs().amax(1) / 127
        weight, kwargs["weight_scale"] = (weight.float() / scale[:, None]).round().to(torch.int8), scale
    elif scheme == "fp8":
        scale = weight.float().abs().amax(1) / 448
        weight, kwargs["weight_scale"] = (weight.float() / scale[:, None]).to(torch.float8_e4m3fn), scale
    bias_t = torch.randn(n, generator=g, device=device).to(dtype) if bias else None
    residual = torch.randn(m, n, generator=g, device=device).to(dtype)
    norm_weight = (1 + 0.2 * torch.randn(n, generator=g, device=device)).to(dtype)
    return x, weight, bias_t, residual, norm_weight, kwargs


def _unfused(x, weight, bias, residual, norm_weight, kwargs, eps=1e-5, **norm):
    y = fused_linear(x, weight, bias, prologue=kwargs["prologue"], weight_scale=kwargs["weight_scale"])
    return fused_add_rms_norm(y, residual, norm_weight, eps, **norm)


def _check(fused, unfused, dtype):
    assert torch.equal(fused[1], unfused[1])
    torch.testing.assert_close(fused[0], unfused[0], rtol=NORMED_TOLERANCE[dtype], atol=NORMED_TOLERANCE[dtype])


def _counter(device="cpu"):
    return torch.zeros(1, dtype=torch.int32, device=device)


@pytest.mark.parametrize("m,n,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_cpu_against_the_unfused_kernels(m, n, k, dtype):
    x, weight, bias, residual, norm_weight, kwargs = _inputs(m, n, k, dtype, bias=m == 3)
    counter = _counter()
    with triton_on_cpu():
        assert lan._one_launch(x, weight, None, None) is not None
        fused = linear_add_rms_norm(x, weight, bias, residual, norm_weight, 1e-5, counter=counter, **kwargs)
        unfused = _unfused(x, weight, bias, residual, norm_weight, kwargs)
    _check(fused, unfused, dtype)
    assert counter.item() == 0  # left ready for the next launch
    ref = linear_add_rms_norm_ref(x, weight, bias, residual, norm_weight, 1e-5, **kwargs)
    torch.testing.assert_close(fused[1], ref[1], rtol=2e-3, atol=2e-3)  # the GEMV's own bounds (fp16 at most)


@pytest.mark.parametrize("form", ["silu", "int8", "gemma"])
def test_triton_cpu_prologue_quantized_weights_and_gemma_norm(form):
    prologue, scheme = ("silu", None) if form == "silu" else (None, "int8" if form == "int8" else None)
    norm = {"weight_offset": 1.0, "cast_before_weight": False} if form == "gemma" else {}
    x, weight, bias, residual, norm_weight, kwargs = _inputs(1, 130, 700, torch.float16, prologue=prologue,
                                                             scheme=scheme)  # fmt: skip
    counter = _counter()
    with triton_on_cpu():
        fused = linear_add_rms_norm(x, weight, bias, residual, norm_weight, 1e-5, counter=counter, **norm, **kwargs)
        unfused = _unfused(x, weight, bias, residual, norm_weight, kwargs, **norm)
    _check(fused, unfused, torch.float16)
    assert counter.item() == 0


def test_split_k_and_more_rows_run_the_unfused_kernels():
    """A launch that splits K (few outputs, long rows) or more rows than a prologue takes: the unfused kernels, the
    same values exactly, the counter untouched."""
    counter = _counter()
    cases = [(1, 8, 4096, None), (2, 64, 96, "silu"), (17, 40, 64, None)]
    for m, n, k, prologue in cases:
        x, weight, bias, residual, norm_weight, kwargs = _inputs(m, n, k, torch.float16, prologue=prologue)
        with triton_on_cpu():
            assert lan._one_launch(x, weight, None, prologue) is None
            fused = linear_add_rms_norm(x, weight, bias, residual, norm_weight, 1e-5, counter=counter, **kwargs)
            unfused = _unfused(x, weight, bias, residual, norm_weight, kwargs)
        assert torch.equal(fused[0], unfused[0]) and torch.equal(fused[1], unfused[1])
    assert counter.item() == 0


def test_the_cpu_path_is_the_reference():
    x, weight, bias, residual, norm_weight, kwargs = _inputs(2, 24, 40, torch.float32)
    fused = linear_add_rms_norm(x, weight, bias, residual, norm_weight, 1e-6, counter=_counter(), **kwargs)
    ref = linear_add_rms_norm_ref(x, weight, bias, residual, norm_weight, 1e-6, **kwargs)
    assert torch.equal(fused[0], ref[0]) and torch.equal(fused[1], ref[1])


def test_bad_inputs_are_refused_with_what_is_allowed():
    x, weight, bias, residual, norm_weight, _ = _inputs(1, 24, 40, torch.float32)
    good = dict(counter=_counter())
    with pytest.raises(ValueError, match="counter must be an int32 tensor"):
        linear_add_rms_norm(x, weight, None, residual, norm_weight, 1e-6, counter=torch.zeros(1))
    with pytest.raises(TypeError, match="counter must be a torch.Tensor"):
        linear_add_rms_norm(x, weight, None, residual, norm_weight, 1e-6, counter=0)
    with pytest.raises(ValueError, match="prologue must be None or one of"):
        linear_add_rms_norm(x, weight, None, residual, norm_weight, 1e-6, prologue="rms_norm", **good)
    for eps in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            linear_add_rms_norm(x, weight, None, residual, norm_weight, eps, **good)
    with pytest.raises(ValueError, match="weight_offset must be a finite number"):
        linear_add_rms_norm(x, weight, None, residual, norm_weight, 1e-6, weight_offset=float("nan"), **good)
    with pytest.raises(ValueError, match="residual must be"):
        linear_add_rms_norm(x, weight, None, residual[:, :5], norm_weight, 1e-6, **good)
    with pytest.raises(ValueError, match="norm_weight"):
        linear_add_rms_norm(x, weight, None, residual, norm_weight[:5], 1e-6, **good)


def test_opcheck():
    x, weight, bias, residual, norm_weight, _ = _inputs(1, 24, 40, torch.float32)
    out, summed = torch.empty_like(residual), torch.empty_like(residual)
    torch.library.opcheck(lan._linear_add_rms_norm_op,
                          (x, weight, bias, None, residual, norm_weight, _counter(), out, summed, "none", 1e-6, 0.0,
                           True))  # fmt: skip


# --- GPU -----------------------------------------------------------------------------------------------------------

GPU_CASES = [(1, 4096, 4096, None), (1, 4096, 14336, "silu"), (1, 4096, 11008, "silu"), (2, 4096, 4096, None),
             (4, 4096, 4096, None), (16, 4096, 4096, None), (1, 5120, 1536, None)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,prologue", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_against_the_unfused_kernels(m, n, k, prologue, dtype):
    x, weight, bias, residual, norm_weight, kwargs = _inputs(m, n, k, dtype, prologue=prologue, device="cuda")
    counter = _counter("cuda")
    # One launch up to 4 rows (16 rows of the dot form split K at these shapes: the unfused kernels)
    assert (lan._one_launch(x, weight, None, prologue) is not None) == (m <= 4)
    fused = linear_add_rms_norm(x, weight, bias, residual, norm_weight, 1e-5, counter=counter, **kwargs)
    _check(fused, _unfused(x, weight, bias, residual, norm_weight, kwargs), dtype)
    # The last program reads what the others wrote: were the arrival not ordering them, some launch of many would
    # read a stale y and differ. Every launch must equal the first bit for bit.
    runs = [linear_add_rms_norm(x, weight, bias, residual, norm_weight, 1e-5, counter=counter, **kwargs)
            for _ in range(100)]
    assert all(torch.equal(r[0], fused[0]) and torch.equal(r[1], fused[1]) for r in runs)
    assert counter.item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [pytest.param("fp8", marks=pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs sm89+")), "int8"])
def test_gpu_quantized_weights(scheme):
    x, weight, bias, residual, norm_weight, kwargs = _inputs(1, 4096, 4096, torch.bfloat16, device="cuda",
                                                             scheme=scheme)  # fmt: skip
    counter = _counter("cuda")
    fused = linear_add_rms_norm(x, weight, bias, residual, norm_weight, 1e-5, counter=counter, **kwargs)
    _check(fused, _unfused(x, weight, bias, residual, norm_weight, kwargs), torch.bfloat16)
    assert counter.item() == 0


@pytest.mark.gpu
def test_gpu_in_a_cuda_graph():
    x, weight, bias, residual, norm_weight, kwargs = _inputs(1, 4096, 4096, torch.bfloat16, device="cuda")
    counter = _counter("cuda")
    expected = linear_add_rms_norm(x, weight, bias, residual, norm_weight, 1e-5, counter=counter, **kwargs)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        linear_add_rms_norm(x, weight, bias, residual, norm_weight, 1e-5, counter=counter, **kwargs)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            got = linear_add_rms_norm(x, weight, bias, residual, norm_weight, 1e-5, counter=counter, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert counter.item() == 0
