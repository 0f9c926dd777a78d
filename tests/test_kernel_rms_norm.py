"""rms_norm / fused_add_rms_norm: Triton kernel (interpreter on CPU, GPU when present) against the references,
plus the dispatch and registration shared by every kernel (fastllm/kernels/_registry.py)."""

import os
import subprocess
import sys

import pytest
import torch
from _kernel_tolerances import CPU_DTYPES, GPU_DTYPES, assert_close

from fastllm.kernels import _registry, fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref, triton_on_cpu

# (rows, hidden): odd hidden sizes leave masked lanes; 5125 is kept to few rows (the interpreter is slow).
SHAPES = [(1, 8), (3, 8), (7, 769), (3, 769), (1, 5125), (2, 5125)]
# (cast_before_weight, weight_offset): Llama/Mistral/Qwen, Gemma, and Llama's cast with an offset weight.
STYLES = [(True, 0.0), (False, 1.0), (True, 1.0)]
EPS = 1e-6


def _inputs(rows, hidden, dtype, weight_dtype, device="cpu"):
    g = torch.Generator().manual_seed(rows * 100003 + hidden)
    x = torch.randn(rows, hidden, generator=g).to(device, dtype)
    residual = torch.randn(rows, hidden, generator=g).to(device, dtype)
    weight = (1 + 0.5 * torch.randn(hidden, generator=g)).to(device, weight_dtype)
    return x, residual, weight


@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("same_weight_dtype", [True, False])
@pytest.mark.parametrize("cast_before_weight,weight_offset", STYLES)
def test_rms_norm_triton_cpu(rows, hidden, dtype, same_weight_dtype, cast_before_weight, weight_offset):
    x, _, weight = _inputs(rows, hidden, dtype, dtype if same_weight_dtype else torch.float32)
    kwargs = {"weight_offset": weight_offset, "cast_before_weight": cast_before_weight}
    expected = rms_norm_ref(x, weight, EPS, **kwargs)
    with triton_on_cpu():
        actual = rms_norm(x, weight, EPS, **kwargs)
    assert_close(actual, expected, rounded_twice=cast_before_weight)


@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("cast_before_weight,weight_offset", STYLES)
def test_fused_add_rms_norm_triton_cpu(rows, hidden, dtype, cast_before_weight, weight_offset):
    x, residual, weight = _inputs(rows, hidden, dtype, dtype)
    kwargs = {"weight_offset": weight_offset, "cast_before_weight": cast_before_weight}
    expected, expected_sum = fused_add_rms_norm_ref(x, residual, weight, EPS, **kwargs)
    with triton_on_cpu():
        actual, actual_sum = fused_add_rms_norm(x, residual, weight, EPS, **kwargs)
    assert torch.equal(actual_sum, expected_sum)  # one correctly rounded addition on both sides
    assert_close(actual, expected, rounded_twice=cast_before_weight)


@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("cast_before_weight", [True, False])
def test_rms_norm_without_a_weight_is_the_norm_with_ones(rows, hidden, dtype, cast_before_weight):
    # weight None (a folded norm's unfused form): the reference equals the reference with a weight of ones exactly
    # (the product with 1 is exact), and the kernel is within the norm's tolerance of it.
    x, _, _ = _inputs(rows, hidden, dtype, dtype)
    ones = torch.ones(hidden, dtype=dtype)
    expected = rms_norm_ref(x, None, EPS, cast_before_weight=cast_before_weight)
    assert expected.dtype == dtype
    assert torch.equal(expected, rms_norm_ref(x, ones, EPS, cast_before_weight=cast_before_weight))
    with triton_on_cpu():
        actual = rms_norm(x, None, EPS, cast_before_weight=cast_before_weight)
    assert actual.dtype == dtype
    assert_close(actual, expected, rounded_twice=False)  # one rounding: h to x's dtype
    assert torch.equal(rms_norm(x, None, EPS, cast_before_weight=cast_before_weight), expected)  # the CPU dispatch


def test_rms_norm_without_a_weight_refuses_an_offset():
    x, _, _ = _inputs(3, 8, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="takes no weight_offset"):
        rms_norm(x, None, EPS, weight_offset=1.0)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_out_buffers_and_strided_rows(dtype):
    # x and residual are row-strided slices of wider buffers; out/residual_out are given, one of them 3-D.
    rows, hidden = 6, 769
    big = torch.randn(rows, hidden + 31).to(dtype)
    x = big[:, :hidden].view(2, 3, hidden)
    residual = torch.randn(rows, 2 * hidden).to(dtype)[:, hidden:].view(2, 3, hidden)
    weight = torch.randn(hidden).to(dtype)
    out = torch.empty(2, 3, hidden, dtype=dtype)
    residual_out = torch.empty(2, 3, hidden, dtype=dtype)
    with triton_on_cpu():
        y = rms_norm(x, weight, EPS, out=out)
        y2, s2 = fused_add_rms_norm(x, residual, weight, EPS, out=torch.empty_like(out), residual_out=residual_out)
    assert y is out and s2 is residual_out
    assert_close(y, rms_norm_ref(x, weight, EPS), rounded_twice=True)
    expected, expected_sum = fused_add_rms_norm_ref(x, residual, weight, EPS)
    assert torch.equal(s2, expected_sum)
    assert_close(y2, expected, rounded_twice=True)


@pytest.mark.parametrize("cast_before_weight,weight_offset", STYLES)
def test_cpu_dispatch_is_the_reference(cast_before_weight, weight_offset):
    x, residual, weight = _inputs(3, 769, torch.float16, torch.float32)
    kwargs = {"weight_offset": weight_offset, "cast_before_weight": cast_before_weight}
    assert torch.equal(rms_norm(x, weight, EPS, **kwargs), rms_norm_ref(x, weight, EPS, **kwargs))
    for a, b in zip(fused_add_rms_norm(x, residual, weight, EPS, **kwargs),
                    fused_add_rms_norm_ref(x, residual, weight, EPS, **kwargs)):  # fmt: skip
        assert torch.equal(a, b)


def test_opcheck():
    x, residual, weight = _inputs(3, 8, torch.float32, torch.float32)
    out, residual_out = torch.empty_like(x), torch.empty_like(x)
    torch.library.opcheck(torch.ops.fastllm.rms_norm.default, (x, weight, out, EPS, 1.0, False))
    torch.library.opcheck(torch.ops.fastllm.rms_norm.default, (x, None, out, EPS, 0.0, True))
    torch.library.opcheck(
        torch.ops.fastllm.fused_add_rms_norm.default, (x, residual, weight, out, residual_out, EPS, 0.0, True)
    )


def test_bad_inputs():
    x, residual, weight = _inputs(3, 8, torch.float32, torch.float32)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        rms_norm(x.to(torch.int32), weight, EPS)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, weight[:7], EPS)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        rms_norm(torch.randn(8, 3).t(), weight, EPS)
    with pytest.raises(ValueError, match="out has shape"):
        rms_norm(x, weight, EPS, out=torch.empty(3, 7))
    with pytest.raises(TypeError, match="out has dtype"):
        rms_norm(x, weight, EPS, out=torch.empty(3, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="residual has shape"):
        fused_add_rms_norm(x, residual[:2], weight, EPS)
    with pytest.raises(TypeError, match="residual has dtype"):
        fused_add_rms_norm(x, residual.half(), weight, EPS)
    with pytest.raises(ValueError, match="between 1 and 65536"):
        rms_norm(torch.randn(1, 65537), torch.ones(65537), EPS)
    for eps in (float("nan"), float("inf"), -1e-6):  # would come back as NaN outputs, not as an error
        with pytest.raises(ValueError, match="eps must be a finite non-negative number"):
            rms_norm(x, weight, eps)
        with pytest.raises(ValueError, match="eps must be a finite non-negative number"):
            fused_add_rms_norm(x, residual, weight, eps)


# --- the dispatch shared by every kernel -------------------------------------------------------------------


def test_use_triton_on_cpu_only_inside_the_context():
    x = torch.zeros(2)
    assert not _registry.use_triton(x)
    with triton_on_cpu():
        assert _registry.use_triton(x)
    assert not _registry.use_triton(x)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with triton_on_cpu():
            pass


def _python(code):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_import_does_not_initialise_cuda():
    proc = _python("import torch, fastllm.kernels; assert not torch.cuda.is_initialized()")
    assert proc.returncode == 0, proc.stderr


def test_works_without_triton():
    # `sys.modules["triton"] = None` makes `import triton` raise ImportError, as on a machine without it.
    proc = _python(
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastllm.kernels as k\n"
        "x, w = torch.randn(2, 8), torch.ones(8)\n"
        "assert not k.use_triton(x)\n"
        "assert torch.equal(k.rms_norm(x, w, 1e-6), k.rms_norm_ref(x, w, 1e-6))\n"
        "try:\n"
        "    k.triton_on_cpu().__enter__()\n"
        "except RuntimeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('triton_on_cpu() without triton did not raise')\n"
    )
    assert proc.returncode == 0, proc.stderr


# --- GPU: bf16/fp16 at decode and prefill shapes ---------------------------------------------------------------

GPU_SHAPES = [(1, 4096), (7, 4096), (16, 4096), (2048, 4096), (4096, 5120)]


@pytest.mark.gpu
@pytest.mark.parametrize("rows,hidden", GPU_SHAPES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("cast_before_weight,weight_offset", STYLES)
def test_rms_norm_gpu(rows, hidden, dtype, cast_before_weight, weight_offset):
    # Against the eager reference on the same card: it computes in fp32 and rounds where Hugging Face does.
    x, residual, weight = _inputs(rows, hidden, dtype, dtype, device="cuda")
    kwargs = {"weight_offset": weight_offset, "cast_before_weight": cast_before_weight}
    twice = cast_before_weight
    assert_close(rms_norm(x, weight, EPS, **kwargs), rms_norm_ref(x, weight, EPS, **kwargs), rounded_twice=twice)
    actual, actual_sum = fused_add_rms_norm(x, residual, weight, EPS, **kwargs)
    expected, expected_sum = fused_add_rms_norm_ref(x, residual, weight, EPS, **kwargs)
    assert torch.equal(actual_sum, expected_sum)  # the sum is rounded to bf16/fp16 before the norm, like HF
    assert_close(actual, expected, rounded_twice=twice)
    if weight_offset == 0.0:  # without a weight (ones): h rounded to x's dtype, once
        assert_close(rms_norm(x, None, EPS, cast_before_weight=cast_before_weight),
                     rms_norm_ref(x, None, EPS, cast_before_weight=cast_before_weight), rounded_twice=False)


class _CudaRows:
    """Stands in for a CUDA tensor of `rows` rows: pdl_options reads only is_cuda, dim(), shape and device."""

    is_cuda = True

    def __init__(self, rows: int) -> None:
        self.shape, self.device = (rows, 8), torch.device("cuda", 0)

    def dim(self) -> int:
        return 2


def test_pdl_on_for_small_steps_unless_the_environment_says_otherwise(monkeypatch):
    """FASTLLM_PDL unset: PDL for launches of at most PDL_MAX_ROWS rows (decode of a few sequences), none past it;
    "1" every launch, "0" none (here on a device taken to be a Hopper GPU with a Triton that has PDL)."""
    monkeypatch.setitem(_registry._PDL_DEVICES, 0, True)
    on = {"USE_PDL": True, "launch_pdl": True}
    small, large = _CudaRows(_registry.PDL_MAX_ROWS), _CudaRows(_registry.PDL_MAX_ROWS + 1)
    for setting, rows, expected in [("", small, on), ("", large, {}), ("1", large, on), ("0", small, {})]:
        monkeypatch.setattr(_registry, "_PDL_SETTING", setting)
        assert _registry.pdl_options(rows) == expected, (setting, rows.shape)
    monkeypatch.setitem(_registry._PDL_DEVICES, 0, False)  # a card before Hopper: never
    monkeypatch.setattr(_registry, "_PDL_SETTING", "1")
    assert _registry.pdl_options(small) == {}
    assert _registry.pdl_options(torch.empty(1, 8)) == {}  # CPU tensors: never


def test_an_unknown_fastllm_pdl_value_warns_and_takes_the_default():
    import os
    import subprocess
    import sys

    code = "import fastllm.kernels._registry as r; print(repr(r._PDL_SETTING))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FASTLLM_PDL": "yes"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "''"
    assert "FASTLLM_PDL='yes' is not one of '1'" in done.stderr
