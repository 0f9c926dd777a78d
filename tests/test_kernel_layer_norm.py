"""layer_norm / fused_add_layer_norm: Triton kernel (interpreter on CPU, GPU when present) against the references."""

import pytest
import torch
from _kernel_tolerances import CPU_DTYPES, GPU_DTYPES, assert_close

from fastllm.kernels import fused_add_layer_norm, fused_add_layer_norm_ref, layer_norm, layer_norm_ref, triton_on_cpu

# (rows, hidden): odd hidden sizes leave masked lanes; 5125 is kept to few rows (the interpreter is slow).
SHAPES = [(1, 8), (3, 8), (7, 769), (3, 769), (1, 5125), (2, 5125)]
# Which of weight and bias are given.
PARAMS = ["weight+bias", "weight", "bias", "none"]
EPS = 1e-5


def _inputs(rows, hidden, dtype, params, device="cpu"):
    g = torch.Generator().manual_seed(rows * 100003 + hidden)
    # A mean far from zero, as in a residual stream: the variance must not come from E[x^2] - E[x]^2.
    x = (3 + torch.randn(rows, hidden, generator=g)).to(device, dtype)
    residual = torch.randn(rows, hidden, generator=g).to(device, dtype)
    weight = (1 + 0.5 * torch.randn(hidden, generator=g)).to(device, dtype)
    bias = torch.randn(hidden, generator=g).to(device, dtype)
    return x, residual, (weight if "weight" in params else None), (bias if "bias" in params else None)


@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("params", PARAMS)
def test_layer_norm_triton_cpu(rows, hidden, dtype, params):
    x, residual, weight, bias = _inputs(rows, hidden, dtype, params)
    with triton_on_cpu():
        actual = layer_norm(x, weight, bias, EPS)
        actual_fused, actual_sum = fused_add_layer_norm(x, residual, weight, bias, EPS)
    assert_close(actual, layer_norm_ref(x, weight, bias, EPS))
    expected_fused, expected_sum = fused_add_layer_norm_ref(x, residual, weight, bias, EPS)
    assert torch.equal(actual_sum, expected_sum)  # one correctly rounded addition on both sides
    assert_close(actual_fused, expected_fused)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_out_buffers_and_strided_rows(dtype):
    # x and residual are row-strided slices of wider buffers; out/residual_out are given, 3-D.
    hidden = 769
    x = torch.randn(6, hidden + 31).to(dtype)[:, :hidden].view(2, 3, hidden)
    residual = torch.randn(6, 2 * hidden).to(dtype)[:, hidden:].view(2, 3, hidden)
    weight, bias = torch.randn(hidden).to(dtype), torch.randn(hidden).to(dtype)
    out, out2, residual_out = (torch.empty(2, 3, hidden, dtype=dtype) for _ in range(3))
    with triton_on_cpu():
        y = layer_norm(x, weight, bias, EPS, out=out)
        y2, s2 = fused_add_layer_norm(x, residual, weight, bias, EPS, out=out2, residual_out=residual_out)
    assert y is out and y2 is out2 and s2 is residual_out
    assert_close(y, layer_norm_ref(x, weight, bias, EPS))
    expected, expected_sum = fused_add_layer_norm_ref(x, residual, weight, bias, EPS)
    assert torch.equal(s2, expected_sum)
    assert_close(y2, expected)


@pytest.mark.parametrize("params", PARAMS)
def test_cpu_dispatch_is_the_reference(params):
    x, residual, weight, bias = _inputs(3, 769, torch.float16, params)
    assert torch.equal(layer_norm(x, weight, bias, EPS), layer_norm_ref(x, weight, bias, EPS))
    for a, b in zip(fused_add_layer_norm(x, residual, weight, bias, EPS),
                    fused_add_layer_norm_ref(x, residual, weight, bias, EPS)):  # fmt: skip
        assert torch.equal(a, b)


def test_opcheck():
    x, residual, weight, bias = _inputs(3, 8, torch.float32, "weight+bias")
    out, residual_out = torch.empty_like(x), torch.empty_like(x)
    torch.library.opcheck(torch.ops.fastllm.layer_norm.default, (x, weight, bias, out, EPS))
    torch.library.opcheck(torch.ops.fastllm.layer_norm.default, (x, None, None, out, EPS))
    torch.library.opcheck(
        torch.ops.fastllm.fused_add_layer_norm.default, (x, residual, weight, bias, out, residual_out, EPS)
    )


def test_bad_inputs():
    x, residual, weight, bias = _inputs(3, 8, torch.float16, "weight+bias")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        layer_norm(x.to(torch.float64), weight, bias, EPS)
    with pytest.raises(ValueError, match="bias must have shape"):
        layer_norm(x, weight, bias[:4], EPS)
    with pytest.raises(TypeError, match="weight has dtype torch.float32; it must have x's dtype"):
        layer_norm(x, weight.float(), bias, EPS)
    with pytest.raises(TypeError, match="bias has dtype torch.bfloat16; it must have x's dtype"):
        layer_norm(x, None, bias.bfloat16(), EPS)
    with pytest.raises(ValueError, match="out has shape"):
        layer_norm(x, weight, bias, EPS, out=torch.empty(3, 9, dtype=torch.float16))
    with pytest.raises(ValueError, match="residual_out has shape"):
        fused_add_layer_norm(x, residual, weight, bias, EPS, residual_out=torch.empty(8, dtype=torch.float16))
    for eps in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="eps must be a finite non-negative number"):
            layer_norm(x, weight, bias, eps)
        with pytest.raises(ValueError, match="eps must be a finite non-negative number"):
            fused_add_layer_norm(x, residual, weight, bias, eps)


# --- GPU: bf16/fp16 at decode and prefill shapes ---------------------------------------------------------------

GPU_SHAPES = [(1, 4096), (7, 4096), (16, 4096), (2048, 4096), (4096, 5120)]


@pytest.mark.gpu
@pytest.mark.parametrize("rows,hidden", GPU_SHAPES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("params", PARAMS)
def test_layer_norm_gpu(rows, hidden, dtype, params):
    # Against torch's layer_norm on the same card, which computes in fp32 and rounds the output once.
    x, residual, weight, bias = _inputs(rows, hidden, dtype, params, device="cuda")
    assert_close(layer_norm(x, weight, bias, EPS), layer_norm_ref(x, weight, bias, EPS))
    actual, actual_sum = fused_add_layer_norm(x, residual, weight, bias, EPS)
    expected, expected_sum = fused_add_layer_norm_ref(x, residual, weight, bias, EPS)
    assert torch.equal(actual_sum, expected_sum)  # the sum is rounded to bf16/fp16 before the norm, like HF
    assert_close(actual, expected)
