"""argmax_rows: Triton kernel (interpreter on CPU, GPU when present) against torch.argmax, exactly, edges included."""

import pytest
import torch
from _kernel_tolerances import CPU_DTYPES, GPU_DTYPES

from fastllm.kernels import triton_on_cpu
from fastllm.kernels.argmax import MAX_ROWS, argmax_rows, argmax_rows_ref

# (rows, columns): a chunk's edge (2048), odd sizes, Llama-2's and Llama-3's vocabularies
SHAPES = [(1, 1), (1, 7), (3, 2048), (2, 2049), (1, 32000), (5, 32003), (1, 128256), (MAX_ROWS, 4099)]


def _logits(rows, cols, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed * 1000003 + rows * 7919 + cols)
    return (4 * torch.randn(rows, cols, generator=g)).to(device, dtype)


def _edges(dtype, device="cpu"):
    """Rows where the answer is decided by the rules rather than the values' size: ties (first column), NaN (the
    first NaN), +inf beside NaN, all -inf, -0.0 tied with +0.0, ties across chunk boundaries."""
    nan, inf = float("nan"), float("inf")
    cols = 4100
    rows = torch.full((10, cols), -1.0)
    rows[0, [5, 2047, 2048, 4099]] = 3.0  # ties, in three chunks: column 5
    rows[1, [4000, 3000, 100]] = nan  # NaN wins over every number: the first one
    rows[2, [10, 2500]] = inf
    rows[2, 3000] = nan
    rows[3] = -inf
    rows[4] = -2.0
    rows[4, 7], rows[4, 9] = -0.0, 0.0  # a tie of -0.0 and +0.0: the first
    rows[5] = -inf
    rows[5, 4099] = -3.0  # the last column alone
    rows[6, 2048], rows[6, 2047] = 1.0, 1.0  # across the chunk boundary: 2047
    rows[7] = 0.0  # all equal: 0
    rows[8, 0] = nan  # NaN in the first column
    rows[9] = torch.linspace(-1, 1, cols)  # increasing: the last
    return rows.to(device, dtype)


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_argmax_triton_cpu(rows, cols, dtype):
    x = _logits(rows, cols, dtype)
    with triton_on_cpu():
        assert torch.equal(argmax_rows(x), argmax_rows_ref(x))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_argmax_edges_triton_cpu(dtype):
    x = _edges(dtype)
    expected = argmax_rows_ref(x)
    assert expected.tolist() == [5, 100, 3000, 0, 7, 4099, 2047, 0, 0, 4099]  # torch's own rules, spelled out
    with triton_on_cpu():
        assert torch.equal(argmax_rows(x), expected)


def test_argmax_strided_rows_triton_cpu():
    x = _logits(6, 4200, torch.float32)[::2, :4100]  # row stride 2 * 4200
    with triton_on_cpu():
        assert torch.equal(argmax_rows(x), argmax_rows_ref(x))


def test_argmax_falls_back_to_torch_where_the_kernel_does_not_apply():
    many = _logits(MAX_ROWS + 1, 100, torch.float32)  # large batches: torch.argmax
    columns_strided = _logits(100, 3, torch.float32).t()  # no unit column stride
    for x in (many, columns_strided, _logits(3, 50, torch.float32)):  # (the last: CPU tensors outside the interpreter)
        assert torch.equal(argmax_rows(x), argmax_rows_ref(x))


@pytest.mark.parametrize("bad,match", [(torch.zeros(2, 3, 4), r"\[rows, columns\]"),
                                       (torch.zeros(2, 3, dtype=torch.long), "floating-point")])
def test_argmax_refuses_what_it_cannot_take(bad, match):
    with pytest.raises(ValueError, match=match):
        argmax_rows(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, *GPU_DTYPES])
def test_argmax_gpu(rows, cols, dtype):
    for seed in range(3):
        x = _logits(rows, cols, dtype, device="cuda", seed=seed)
        assert torch.equal(argmax_rows(x), argmax_rows_ref(x))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, *GPU_DTYPES])
def test_argmax_edges_gpu(dtype):
    x = _edges(dtype, device="cuda")
    assert torch.equal(argmax_rows(x), argmax_rows_ref(x))


@pytest.mark.gpu
def test_argmax_in_a_cuda_graph():
    x = _logits(2, 128256, torch.bfloat16, device="cuda")
    argmax_rows(x)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = argmax_rows(x)
    x.copy_(_logits(2, 128256, torch.bfloat16, device="cuda", seed=1))
    graph.replay()
    assert torch.equal(out, argmax_rows_ref(x))
