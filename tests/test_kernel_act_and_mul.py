"""silu_and_mul / gelu_and_mul: Triton kernel (interpreter on CPU, GPU when present) against the references."""

import functools

import pytest
import torch
from _kernel_tolerances import CPU_DTYPES, GPU_DTYPES, assert_close, rounded_once

from fastllm.kernels import gelu_and_mul, gelu_and_mul_ref, silu_and_mul, silu_and_mul_ref, triton_on_cpu

# (rows, intermediate I): x is [rows, 2I]; odd sizes leave masked lanes; 5125 is kept to few rows.
SHAPES = [(1, 8), (3, 8), (7, 769), (3, 769), (1, 5125), (2, 5125)]
# (name, launcher, reference), the launcher and reference taking x only.
OPS = [
    ("silu", silu_and_mul, silu_and_mul_ref),
    ("gelu", gelu_and_mul, gelu_and_mul_ref),
    ("gelu_tanh", functools.partial(gelu_and_mul, approximate="tanh"),
     functools.partial(gelu_and_mul_ref, approximate="tanh")),
]  # fmt: skip
OP_IDS = [name for name, _, _ in OPS]


def _inputs(rows, inter, dtype, device="cpu"):
    g = torch.Generator().manual_seed(rows * 100003 + inter)
    # 3 * randn reaches the saturated tails of silu/gelu (|x| > 5), where a careless formula cancels or overflows.
    return (3 * torch.randn(rows, 2 * inter, generator=g)).to(device, dtype)


@pytest.mark.parametrize("rows,inter", SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_act_and_mul_triton_cpu(rows, inter, dtype, op):
    _, launch, ref = op
    x = _inputs(rows, inter, dtype)
    with triton_on_cpu():
        actual = launch(x)
    # The eager reference rounds act(gate) and the product separately in fp16; the kernel rounds once.
    assert_close(actual, rounded_once(ref, x, dtype=dtype))


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_out_buffer_and_strided_rows(op):
    _, launch, ref = op
    inter = 769
    x = _inputs(6, inter + 5, torch.float32)[:, : 2 * inter].view(2, 3, 2 * inter)  # row stride 2 * 774
    out = torch.empty(2, 3, inter)
    with triton_on_cpu():
        actual = launch(x, out=out)
    assert actual is out
    assert_close(actual, ref(x))


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_cpu_dispatch_is_the_reference(op):
    _, launch, ref = op
    x = _inputs(3, 769, torch.float16)
    assert torch.equal(launch(x), ref(x))


def test_opcheck():
    x = _inputs(3, 8, torch.float32)
    out = torch.empty(3, 8)
    torch.library.opcheck(torch.ops.fastllm.silu_and_mul.default, (x, out))
    for approximate in ("none", "tanh"):
        torch.library.opcheck(torch.ops.fastllm.gelu_and_mul.default, (x, out, approximate))


def test_bad_inputs():
    x = _inputs(3, 8, torch.float32)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        silu_and_mul(x.to(torch.int64))
    with pytest.raises(ValueError, match="must be even"):
        silu_and_mul(x[:, :15])
    with pytest.raises(ValueError, match="approximate must be"):
        gelu_and_mul(x, approximate="sigmoid")
    with pytest.raises(ValueError, match="out has shape"):
        gelu_and_mul(x, out=torch.empty(3, 16))
    with pytest.raises(TypeError, match="out has dtype"):
        silu_and_mul(x, out=torch.empty(3, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        silu_and_mul(x, out=torch.empty(8, 3).t())


# --- GPU: bf16/fp16 at decode and prefill shapes ---------------------------------------------------------------

# Llama-3.1-8B (14336), Llama-2-7B (11008) and Gemma-7B (24576) intermediate sizes.
GPU_SHAPES = [(1, 14336), (16, 14336), (2048, 14336), (2048, 11008), (5, 24576)]


@pytest.mark.gpu
@pytest.mark.parametrize("rows,inter", GPU_SHAPES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_act_and_mul_gpu(rows, inter, dtype, op):
    _, launch, ref = op
    x = _inputs(rows, inter, dtype, device="cuda")
    assert_close(launch(x), rounded_once(ref, x, dtype=dtype))
