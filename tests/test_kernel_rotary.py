"""rotary_embedding: Triton kernel (interpreter on CPU, GPU when present) against rotary_embedding_ref."""

import pytest
import torch
from _kernel_tolerances import CPU_DTYPES, GPU_DTYPES, assert_close, rounded_once

from fastllm.kernels import rotary_embedding, rotary_embedding_ref, triton_on_cpu

# (head_dim D, rotary dim R): Llama 128, GPT-2-size 64, Phi-2/GPT-NeoX partial (80 of 32, 128 of 64), small 40.
HEAD_DIMS = [(64, 64), (80, 80), (128, 128), (40, 40), (80, 32), (128, 64)]
B, H, S = 2, 3, 5


def _inputs(batch, heads, seq, head_dim, rotary_dim, dtype, device="cpu", cos_dtype=None):
    """x: a [B, H, S, D] transposed view of a [B, S, H, D] tensor (as attention makes it); cos, sin: [B, 1, S, R]."""
    g = torch.Generator().manual_seed(head_dim * 1009 + rotary_dim + seq)
    x = torch.randn(batch, seq, heads, head_dim, generator=g).to(device, dtype).transpose(1, 2)
    angles = torch.rand(batch, 1, seq, rotary_dim, generator=g) * 6.3
    cos_dtype = cos_dtype or dtype
    return x, angles.cos().to(device, cos_dtype), angles.sin().to(device, cos_dtype)


def _expected(x, cos, sin, interleaved):
    # The eager reference rounds after each of its steps in fp16; the kernel rounds once (see rounded_once).
    return rounded_once(rotary_embedding_ref, x, cos, sin, dtype=torch.result_type(x, cos), interleaved=interleaved)


@pytest.mark.parametrize("head_dim,rotary_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_triton_cpu(head_dim, rotary_dim, dtype, interleaved):
    x, cos, sin = _inputs(B, H, S, head_dim, rotary_dim, dtype)
    assert not x.is_contiguous()
    with triton_on_cpu():
        actual = rotary_embedding(x, cos, sin, interleaved=interleaved)
    assert actual.is_contiguous() and actual.shape == x.shape
    assert_close(actual, _expected(x, cos, sin, interleaved))


@pytest.mark.parametrize("interleaved", [False, True])
def test_out_buffer_strided_and_mixed_dtype(interleaved):
    # fp16 x with fp32 cos/sin gives fp32 (torch.result_type), written into a transposed [B, S, H, D] buffer.
    x, cos, sin = _inputs(B, H, S, 128, 64, torch.float16, cos_dtype=torch.float32)
    out = torch.empty(B, S, H, 128).transpose(1, 2)
    with triton_on_cpu():
        actual = rotary_embedding(x, cos, sin, interleaved=interleaved, out=out)
    assert actual is out
    assert_close(actual, _expected(x, cos, sin, interleaved))


@pytest.mark.parametrize(
    "x_shape,cos_shape",
    [
        ((7, 4, 64), (7, 1, 64)),  # [T, H, D] with per-token cos (packed varlen layout)
        ((2, 4, 5, 64), (5, 64)),  # cos shared across the batch
        ((1, 4, 1, 64), (1, 1, 1, 64)),  # decode
        ((2, 2, 3, 5, 64), (2, 1, 1, 5, 64)),  # more than 3 leading dims (copied, then written back)
        ((64,), (64,)),
    ],
)
def test_broadcast_shapes(x_shape, cos_shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g)
    cos, sin = torch.randn(cos_shape, generator=g), torch.randn(cos_shape, generator=g)
    with triton_on_cpu():
        actual = rotary_embedding(x, cos, sin)
    assert_close(actual, rotary_embedding_ref(x, cos, sin))


@pytest.mark.parametrize("interleaved", [False, True])
def test_cpu_dispatch_is_the_reference(interleaved):
    x, cos, sin = _inputs(B, H, S, 80, 32, torch.float16)
    assert torch.equal(rotary_embedding(x, cos, sin, interleaved=interleaved),
                       rotary_embedding_ref(x, cos, sin, interleaved=interleaved))  # fmt: skip


def test_opcheck():
    x, cos, sin = _inputs(1, 2, 3, 16, 8, torch.float32)
    out = torch.empty(x.shape)
    torch.library.opcheck(torch.ops.fastllm.rotary_embedding.default, (x, cos, sin, out, False))
    torch.library.opcheck(torch.ops.fastllm.rotary_embedding.default, (x, cos, sin, out, True))


def test_bad_inputs():
    x, cos, sin = _inputs(B, H, S, 64, 64, torch.float32)
    with pytest.raises(TypeError, match="cos must be float32, float16 or bfloat16"):
        rotary_embedding(x, cos.double(), sin)
    with pytest.raises(ValueError, match="cos and sin must have one shape"):
        rotary_embedding(x, cos, sin[..., :32])
    with pytest.raises(TypeError, match="cos and sin must have one dtype"):
        rotary_embedding(x, cos, sin.half())
    with pytest.raises(ValueError, match="must be even"):
        rotary_embedding(x, cos[..., :31], sin[..., :31])
    with pytest.raises(ValueError, match="must be even"):
        rotary_embedding(x[..., :32], cos, sin)
    with pytest.raises(ValueError, match="do not broadcast"):
        rotary_embedding(x, cos[:, :, :2], sin[:, :, :2])
    with pytest.raises(ValueError, match="out has shape"):
        rotary_embedding(x, cos, sin, out=torch.empty(B, H, S, 32))
    with pytest.raises(TypeError, match="out has dtype"):
        rotary_embedding(x, cos, sin, out=torch.empty(x.shape, dtype=torch.float16))


# --- GPU: bf16/fp16 at decode and prefill shapes ---------------------------------------------------------------

# (batch, heads, seq): decode for 1..16 sequences, then a 2048-token prefill.
GPU_SHAPES = [(1, 32, 1), (16, 8, 1), (1, 32, 2048)]
GPU_HEAD_DIMS = [(128, 128), (64, 64), (80, 80), (80, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("batch,heads,seq", GPU_SHAPES)
@pytest.mark.parametrize("head_dim,rotary_dim", GPU_HEAD_DIMS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_gpu(batch, heads, seq, head_dim, rotary_dim, dtype, interleaved):
    x, cos, sin = _inputs(batch, heads, seq, head_dim, rotary_dim, dtype, device="cuda")
    assert_close(rotary_embedding(x, cos, sin, interleaved=interleaved), _expected(x, cos, sin, interleaved))
