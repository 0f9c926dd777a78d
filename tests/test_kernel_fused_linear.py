"""fused_linear: the skinny GEMM with an RMSNorm or gated-activation prologue and a residual-add epilogue (interpreter
on the CPU, GPU when present) against the chain of unfused references, the split-K path, the fallback above 16 rows,
and bad inputs.

Tolerances, as tests/test_kernel_skinny_gemm.py's (its module docstring derives them): the GEMM's output is judged
against the exact (fp64) product of the prologue's output as the references round it. The residual add rounds once
more (half an ulp of the sum, up to 2^-11 of it in fp16, on top of the output's own rounding): twice the bound. The
prologue itself is computed as the unfused kernels compute it, so with the same launch settings the fused kernel
equals the unfused kernels element for element (checked); the norm's one freedom is the order of its fp32 sum of
squares (1 / rms can differ in its last fp32 bit, which moves a rounded element of the normalised x by at most one
ulp of x's dtype: inside the GEMM's bounds).
"""

import importlib

import pytest
import torch

from fastllm.kernels import fused_linear, fused_linear_ref, triton_on_cpu
from fastllm.kernels import skinny_gemm as sg
from fastllm.kernels.fused_linear import _prologue

fl = importlib.import_module("fastllm.kernels.fused_linear")  # the module (the package attribute is the function)

TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
CPU_DTYPES = [torch.float32, torch.float16]

# (M, N, K): the broadcast form with one and three rows, the dot form; ragged K chunks, N past the last block
CASES = [(1, 96, 1000), (3, 33, 1500), (16, 80, 600)]
PROLOGUE_CASES = [None, "rms_norm", "silu", "gelu", "gelu_tanh"]


def _inputs(m, n, k, dtype, prologue, *, device="cpu", bias=False, residual=True, norm_offset=0.0):
    g = torch.Generator(device).manual_seed(m * 7919 + n * 31 + k)
    width = 2 * k if prologue in ("silu", "gelu", "gelu_tanh") else k
    x = (torch.randn(m, width, generator=g, device=device) * 3).to(dtype)
    weight = (torch.randn(n, k, generator=g, device=device) * k**-0.5).to(dtype)
    kwargs = {"prologue": prologue}
    if bias:
        kwargs["bias"] = torch.randn(n, generator=g, device=device).to(dtype)
    if residual:
        kwargs["residual"] = torch.randn(m, n, generator=g, device=device).to(dtype)
    if prologue == "rms_norm":
        kwargs.update(norm_weight=(1 + 0.2 * torch.randn(k, generator=g, device=device)).to(dtype), norm_eps=1e-5,
                      norm_offset=norm_offset)
    return x, weight, kwargs


def _expected(x, weight, kwargs):
    """The exact product of the prologue's output as the references round it, plus the residual, in fp64."""
    h = _prologue(x, kwargs.get("prologue"), kwargs.get("norm_weight"), kwargs.get("norm_eps", 1e-6),
                  kwargs.get("norm_offset", 0.0), kwargs.get("norm_cast_before_weight", True), reference=True)
    bias = kwargs.get("bias")
    y = torch.nn.functional.linear(h.double(), weight.double(), None if bias is None else bias.double())
    # The output is rounded to x's dtype before the residual add, as the unfused graph stores it
    y = y.to(x.dtype).double()
    residual = kwargs.get("residual")
    return y if residual is None else y + residual.double()


def _skinny_with_fused_settings(x, weight, prologue, weight_scale=None):
    """skinny_linear's kernel on x (the prologue's output) with the settings fused_linear picks for `prologue`."""
    m, (n, k) = x.shape[0], weight.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    fused_prologue = prologue is not None and m <= fl.PROLOGUE_MAX_ROWS  # past it: the unfused kernels, plain settings
    cfg = sg._config(m, n, k, x.dtype, x.device, weight_bytes=weight.element_size(), prologue=fused_prologue)
    sg._launch(x, weight, None, out, None, cfg, weight_scale=weight_scale)
    return out


def _quantized(weight, scheme):
    """(qweight, per-channel fp32 scale) as quantization=scheme stores them, from a float weight."""
    from fastllm.quant import fp8, int_weight

    return fp8.quantize_weight(weight.float()) if scheme == "fp8" else int_weight.quantize_int8(weight.float())


def _dequantized(qweight, scale):
    """The weight a quantized linear multiplies by, exactly (fp64)."""
    return qweight.double() * scale.double()[:, None]


def _assert_close(actual, expected, dtype, roundings=1):
    assert actual.dtype == dtype and actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    err = actual.double() - expected
    tol = TOLERANCES[dtype] * roundings
    rel = (err.norm() / expected.norm()).item()
    worst = (err.abs().max() / expected.abs().max()).item()
    assert rel <= tol and worst <= tol, f"relative error {rel:.2e}, worst element {worst:.2e} (tolerance {tol:.0e})"


@pytest.mark.parametrize("prologue", PROLOGUE_CASES)
@pytest.mark.parametrize("m,n,k", CASES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_triton_cpu_against_the_unfused_references(prologue, m, n, k, dtype):
    x, weight, kwargs = _inputs(m, n, k, dtype, prologue)
    with triton_on_cpu():
        y = fused_linear(x, weight, **kwargs)
        if prologue != "rms_norm":  # the unfused kernels under the same launch settings
            unfused = _skinny_with_fused_settings(_prologue(x, prologue, None, 0.0, 0.0, True, reference=False),
                                                  weight, prologue)
    _assert_close(y, _expected(x, weight, kwargs), dtype, roundings=2)
    if prologue != "rms_norm":
        assert torch.equal(y, unfused + kwargs["residual"])


@pytest.mark.parametrize("prologue", ["rms_norm", "silu"])
def test_the_kernel_takes_a_prologue_on_several_rows_where_allowed(prologue, monkeypatch):
    """The broadcast form computes a prologue for up to 4 rows; fused_linear only asks it for one (PROLOGUE_MAX_ROWS
    says why), so the several-row form is checked with the limit raised."""
    monkeypatch.setattr(fl, "PROLOGUE_MAX_ROWS", 4)
    x, weight, kwargs = _inputs(3, 33, 1500, torch.float16, prologue)
    with triton_on_cpu():
        y = fused_linear(x, weight, **kwargs)
        unfused = _skinny_with_fused_settings(_prologue(x, prologue, kwargs.get("norm_weight"), 1e-5, 0.0, True,
                                                        reference=False), weight, prologue)
    _assert_close(y, _expected(x, weight, kwargs), torch.float16, roundings=2)
    if prologue == "silu":  # the norm's fp32 sum of squares may take another order (the module docstring says so)
        assert torch.equal(y, unfused + kwargs["residual"])


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("prologue", [None, "rms_norm", "silu"])
@pytest.mark.parametrize("m,n,k", CASES)
def test_triton_cpu_quantized_weights_take_the_prologue(scheme, prologue, m, n, k):
    """One-byte weights with per-channel scales (quantization="fp8" | "int8"): the prologue inside the GEMM that
    widens the weights, against the exact product with the dequantized weight; with the same launch settings the
    unfused kernels' output element for element (SiLU * up has no freedom; the norm's sum may take another order)."""
    x, weight, kwargs = _inputs(m, n, k, torch.float16, prologue)
    qweight, scale = _quantized(weight, scheme)
    with triton_on_cpu():
        y = fused_linear(x, qweight, weight_scale=scale, **kwargs)
        h = _prologue(x, prologue, kwargs.get("norm_weight"), 1e-5, 0.0, True, reference=False)
        unfused = _skinny_with_fused_settings(h, qweight, prologue, weight_scale=scale)
    _assert_close(y, _expected(x, _dequantized(qweight, scale), kwargs), torch.float16, roundings=2)
    if prologue != "rms_norm":
        assert torch.equal(y, unfused + kwargs["residual"])


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_quantized_weights_on_the_cpu_and_past_16_rows_run_the_schemes_own_linear(scheme):
    """Without Triton: the references, fused_linear's own. Past 16 rows (prefill): the activation's kernel, then the
    scheme's launcher, which for FP8 quantizes the activations per row as well (its reference says how)."""
    from fastllm.kernels import fp8_linear_ref, int8_linear_ref, silu_and_mul_ref

    linear_ref = {"fp8": fp8_linear_ref, "int8": int8_linear_ref}[scheme]
    for m in (1, 20):
        x, weight, kwargs = _inputs(m, 24, 64, torch.float32, "silu", bias=True)
        qweight, scale = _quantized(weight, scheme)
        y = fused_linear(x, qweight, weight_scale=scale, **kwargs)
        assert torch.equal(y, fused_linear_ref(x, qweight, weight_scale=scale, **kwargs))
        expected = linear_ref(silu_and_mul_ref(x), qweight, scale, kwargs["bias"]) + kwargs["residual"]
        assert torch.equal(y, expected)
        with triton_on_cpu():
            y = fused_linear(x, qweight, weight_scale=scale, **kwargs)
        _assert_close(y, expected.double(), torch.float32, roundings=2)


@pytest.mark.parametrize("cast_before_weight,offset", [(True, 0.0), (False, 1.0)])  # Llama's form, Gemma's
@pytest.mark.parametrize("m", [1, 5])
def test_rms_norm_forms_with_bias_and_split_k(cast_before_weight, offset, m):
    """Gemma's norm (fp32 product, weight offset 1) and Llama's; a bias; K split in 3 (the reduce kernel adds bias
    and residual)."""
    x, weight, kwargs = _inputs(m, 40, 1536, torch.float16, "rms_norm", bias=True, norm_offset=offset)
    kwargs["norm_cast_before_weight"] = cast_before_weight
    with triton_on_cpu(), _forced_split(3):
        y = fused_linear(x, weight, **kwargs)
    _assert_close(y, _expected(x, weight, kwargs), torch.float16, roundings=2)


class _forced_split:
    """Force the heuristic's split_k (the op form resolves its config itself)."""

    def __init__(self, split_k: int):
        self.split_k = split_k

    def __enter__(self):
        self.original = sg._config
        sg._config = lambda *a, **kw: {**self.original(*a, **kw), "split_k": self.split_k}

    def __exit__(self, *exc):
        sg._config = self.original


def test_the_cpu_path_is_the_reference_and_more_rows_take_the_unfused_kernels():
    x, weight, kwargs = _inputs(20, 24, 64, torch.float32, "rms_norm")
    assert torch.equal(fused_linear(x, weight, **kwargs), fused_linear_ref(x, weight, **kwargs))
    with triton_on_cpu():  # 20 rows > 16: the norm kernel, F.linear, the add
        y = fused_linear(x, weight, **kwargs)
    _assert_close(y, _expected(x, weight, kwargs), torch.float32, roundings=2)
    x3 = x.reshape(4, 5, 64)
    r3 = kwargs["residual"].reshape(4, 5, 24)
    out = torch.empty(4, 5, 24)
    fused_linear(x3, weight, **{**kwargs, "residual": r3}, out=out)
    assert torch.equal(out.reshape(20, 24), fused_linear_ref(x, weight, **kwargs))


def test_opcheck():
    """The registered op (schema, fake kernel, CPU dispatch), on the references and in the interpreter."""
    op = torch.ops.fastllm.fused_linear.default
    x, weight, kwargs = _inputs(3, 24, 64, torch.float32, "rms_norm")
    out = torch.empty(3, 24)
    args = (x, weight, None, kwargs["residual"], kwargs["norm_weight"], None, out, "rms_norm", 1e-5, 0.0, True)
    torch.library.opcheck(op, args)
    with triton_on_cpu():
        torch.library.opcheck(op, args)
    gate_up, weight, kwargs = _inputs(2, 24, 64, torch.float32, "silu")
    torch.library.opcheck(op, (gate_up, weight, None, None, None, None, torch.empty(2, 24), "silu", 1e-6, 0.0, True))
    qweight, scale = _quantized(weight, "int8")
    torch.library.opcheck(op, (gate_up, qweight, None, None, None, scale, torch.empty(2, 24), "silu", 1e-6, 0.0, True))


def test_bad_inputs_are_refused_with_what_is_allowed():
    x, weight, kwargs = _inputs(2, 8, 16, torch.float32, "rms_norm")
    with pytest.raises(ValueError, match="prologue must be None or one of"):
        fused_linear(x, weight, prologue="relu")
    with pytest.raises(ValueError, match="needs norm_weight"):
        fused_linear(x, weight, prologue="rms_norm")
    with pytest.raises(ValueError, match="norm_eps must be a finite number"):
        fused_linear(x, weight, **{**kwargs, "norm_eps": float("nan")})
    with pytest.raises(ValueError, match="norm_eps must be >= 0"):
        fused_linear(x, weight, **{**kwargs, "norm_eps": -1.0})
    with pytest.raises(TypeError, match="must have x's dtype"):
        fused_linear(x.half(), weight.half(), **{**kwargs, "residual": None})
    with pytest.raises(ValueError, match="x's last dim must be 2 \\* 16"):
        fused_linear(x, weight, prologue="silu")
    with pytest.raises(ValueError, match="residual must be"):
        fused_linear(x, weight, residual=torch.zeros(2, 9))
    qweight, scale = _quantized(weight, "int8")
    with pytest.raises(TypeError, match="a weight with weight_scale must be one of"):
        fused_linear(x, weight, weight_scale=scale)
    with pytest.raises(ValueError, match="weight_scale must be \\[8\\]"):
        fused_linear(x, qweight, weight_scale=scale[:7])
    with pytest.raises(TypeError, match="weight_scale must be float32"):
        fused_linear(x, qweight, weight_scale=scale.half())
    with pytest.raises(ValueError, match="bias must be"):
        fused_linear(x, qweight, torch.zeros(8, dtype=torch.float16), weight_scale=scale)


@pytest.mark.gpu
@pytest.mark.parametrize("prologue", PROLOGUE_CASES)
@pytest.mark.parametrize("m,n,k", [(1, 6144, 4096), (1, 4096, 14336), (7, 28672, 4096), (16, 4096, 4096),
                                   (3, 33, 1500)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_against_the_unfused_references(prologue, m, n, k, dtype):
    """Llama-3.1-8B's decode shapes (qkv with its input norm, down with SiLU * up and the residual) and odd ones."""
    x, weight, kwargs = _inputs(m, n, k, dtype, prologue, device="cuda")
    y = fused_linear(x, weight, **kwargs)
    _assert_close(y, _expected(x, weight, kwargs), dtype, roundings=2)


@pytest.mark.gpu
def test_gpu_fused_equals_the_unfused_kernels_bit_for_bit_where_the_rounding_is_the_same():
    """SiLU * up and the residual add have no freedom: with the same launch settings (the same K chunks and splits)
    the fused kernel's output equals the skinny GEMM's of the silu_and_mul kernel's output plus the residual,
    element for element."""
    from fastllm.kernels import silu_and_mul

    x, weight, kwargs = _inputs(1, 4096, 4096, torch.bfloat16, "silu", device="cuda")
    fused = fused_linear(x, weight, **kwargs)
    unfused = _skinny_with_fused_settings(silu_and_mul(x), weight, "silu") + kwargs["residual"]
    assert torch.equal(fused, unfused)


_HAS_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [pytest.param("fp8", marks=pytest.mark.skipif(
    not _HAS_FP8, reason="the float8 type in Triton needs compute capability 8.9+")), "int8"])
@pytest.mark.parametrize("prologue", [None, "rms_norm", "silu"])
@pytest.mark.parametrize("m,n,k", [(1, 6144, 4096), (1, 4096, 14336), (3, 33, 1500), (16, 4096, 4096)])
def test_gpu_quantized_weights_against_the_unfused_references(scheme, prologue, m, n, k):
    """quantization="fp8" | "int8" decode shapes of Llama-3.1-8B and odd ones, bf16 activations: against the exact
    product with the dequantized weight; SiLU * up bit for bit against the unfused kernels under the same settings."""
    from fastllm.kernels import silu_and_mul

    x, weight, kwargs = _inputs(m, n, k, torch.bfloat16, prologue, device="cuda")
    qweight, scale = _quantized(weight, scheme)
    y = fused_linear(x, qweight, weight_scale=scale, **kwargs)
    _assert_close(y, _expected(x, _dequantized(qweight, scale), kwargs), torch.bfloat16, roundings=2)
    if prologue == "silu":
        unfused = _skinny_with_fused_settings(silu_and_mul(x), qweight, prologue, weight_scale=scale)
        assert torch.equal(y, unfused + kwargs["residual"])


def test_a_gemm_with_a_prologue_launches_without_pdl(monkeypatch):
    """PDL measured slower with the activation prologue's GEMM (kernels/_registry.py): that launch goes without it
    where the plain GEMM takes it (the kernel replaced by a recorder of its launch keywords)."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    monkeypatch.setattr(sg, "_skinny_gemm_kernel", Recorder())
    monkeypatch.setattr(sg, "pdl_options", lambda t: {"USE_PDL": True, "launch_pdl": True})
    x, w, out = torch.randn(1, 64), torch.randn(32, 32), torch.empty(1, 32)
    cfg = {**sg._config(1, 32, 32, x.dtype, x.device), "split_k": 1}
    sg._launch(x[:, :32], w, None, out, None, cfg)
    sg._launch(x, w, None, out, None, cfg, prologue="silu")
    assert launches[0].get("USE_PDL") is True and "USE_PDL" not in launches[1]


# Launch settings of the activation prologue other than the heuristic's (fused_linear.ACT_PROLOGUE_*: rows of W a
# program, columns a chunk, NUM_STAGES, K splits), as benchmarks/bench_act_down.py sweeps them
ACT_PROLOGUE_VARIANTS = [(4, 1024, 3, 1), (4, 512, 4, 1), (16, 256, 3, 1), (2, 1024, 3, 1), (8, 512, 3, 2),
                         (4, 1024, 3, 2)]  # fmt: skip


def _set_act_prologue(monkeypatch, variant):
    for knob, value in zip(("ACT_PROLOGUE_BLOCK_N", "ACT_PROLOGUE_BLOCK_K", "ACT_PROLOGUE_STAGES",
                            "ACT_PROLOGUE_SPLIT_K"), variant):  # fmt: skip
        monkeypatch.setattr(fl, knob, value)


@pytest.mark.parametrize("variant", ACT_PROLOGUE_VARIANTS)
def test_act_prologue_settings_on_the_interpreter(variant, monkeypatch):
    """Each setting the sweep tries computes the same product (ragged K chunks, N past the last block); with one K
    split it equals the unfused kernels under the same settings element for element."""
    _set_act_prologue(monkeypatch, variant)
    m, n, k, dtype = 1, 40, 1500, torch.float16
    x, weight, kwargs = _inputs(m, n, k, dtype, "silu")
    with triton_on_cpu():
        y = fused_linear(x, weight, **kwargs)
        if variant[3] == 1:
            cfg = {**sg._config(m, n, k, dtype, x.device, prologue=True), "BLOCK_N": variant[0],
                   "BLOCK_K": variant[1], "NUM_STAGES": variant[2], "split_k": 1}
            unfused = torch.empty(m, n, dtype=dtype)
            sg._launch(_prologue(x, "silu", None, 0.0, 0.0, True, reference=False), weight, None, unfused, None, cfg)
    _assert_close(y, _expected(x, weight, kwargs), dtype, roundings=2)
    if variant[3] == 1:
        assert torch.equal(y, unfused + kwargs["residual"])


def test_act_prologue_settings_and_pdl_reach_the_launch(monkeypatch):
    """The ACT_PROLOGUE_* settings are what the kernel is launched with (a split adds the reduce kernel), and
    PDL_WITH_GATED_PROLOGUE gives the activation prologue's launch PDL where a plain launch has it; the norm
    prologue's launch is unchanged (the kernels replaced by recorders of their launch keywords)."""
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, grid, kwargs))

    monkeypatch.setattr(sg, "_skinny_gemm_kernel", Recorder("gemm"))
    monkeypatch.setattr(sg, "_split_k_reduce_kernel", Recorder("reduce"))
    monkeypatch.setattr(sg, "pdl_options", lambda t: {"USE_PDL": True, "launch_pdl": True})
    _set_act_prologue(monkeypatch, (16, 256, 4, 2))
    monkeypatch.setattr(sg, "PDL_WITH_GATED_PROLOGUE", True)
    x, weight, kwargs = _inputs(1, 64, 1024, torch.float32, "silu", residual=False)
    with triton_on_cpu():
        fused_linear(x, weight, **kwargs)
    (name, grid, gemm), (reduce_name, _, reduce) = launches
    assert (name, reduce_name) == ("gemm", "reduce") and grid == (4, 2)  # 64 rows / 16, 1024 columns in 2 splits
    assert (gemm["BLOCK_N"], gemm["BLOCK_K"], gemm["NUM_STAGES"], gemm["SPLIT"]) == (16, 256, 4, True)
    assert gemm.get("USE_PDL") is True and reduce.get("USE_PDL") is True
    launches.clear()
    monkeypatch.setattr(sg, "PDL_WITH_GATED_PROLOGUE", False)
    with triton_on_cpu():
        fused_linear(x, weight, **kwargs)
    assert "USE_PDL" not in launches[0][2]
    launches.clear()
    x, weight, kwargs = _inputs(1, 64, 1024, torch.float32, "rms_norm", residual=False)
    monkeypatch.setattr(sg, "PDL_WITH_GATED_PROLOGUE", True)
    with triton_on_cpu():
        fused_linear(x, weight, **kwargs)
    gemm = launches[0][2]
    assert gemm["BLOCK_N"] == sg.PROLOGUE_BLOCK_N and "USE_PDL" not in gemm  # the norm prologue: its own settings


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ACT_PROLOGUE_VARIANTS)
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("n,k", [(4096, 11008), (4096, 14336), (33, 1500)])
def test_gpu_act_prologue_settings(variant, pdl, n, k, monkeypatch):
    """The down projections of Llama-2-7B and Llama-3.1-8B (and an odd shape) at one row under each setting the sweep
    tries, with and without PDL, against the exact product."""
    _set_act_prologue(monkeypatch, variant)
    monkeypatch.setattr(sg, "PDL_WITH_GATED_PROLOGUE", pdl)
    x, weight, kwargs = _inputs(1, n, k, torch.bfloat16, "silu", device="cuda")
    y = fused_linear(x, weight, **kwargs)
    torch.cuda.synchronize()
    _assert_close(y, _expected(x, weight, kwargs), torch.bfloat16, roundings=2)
