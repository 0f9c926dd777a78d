"""skinny_linear: the Triton skinny GEMM (interpreter on CPU, GPU when present) against F.linear, the split-K path,
the cuBLAS fallback above 16 rows, input checks, op registration and CUDA-graph capture.

Tolerances: a GEMM is judged by its error against `skinny_linear_ref` (F.linear) evaluated in higher precision on
the same inputs (fp64 on the CPU; fp32 with TF32 off on the GPU, whose own error, ~sqrt(K) * 2^-24 relative, is far
below the half-precision bounds), by two measures: the relative norm ||y - y_ref|| / ||y_ref||, and the largest
element error over max |y_ref| (a few wrong columns of 128256 would hide in the norm).
- float32: only the summation order differs (fp32 accumulation in chunks and splits): ~sqrt(K) * 2^-24 ~ 4e-6 at
  K = 5125 at worst, seen ~1e-7 on the CPU: 1e-5.
- float16: plus one rounding of each output to fp16, at most 2^-11 ~ 4.9e-4 relative (seen 2e-4 in norm): 1e-3.
- bfloat16 (GPU only: the interpreter truncates fp32 -> bf16): one rounding to bf16, at most 2^-8 ~ 3.9e-3
  relative, plus the fp32 accumulation: 1e-2 (cuBLAS's bf16 output meets the same bound).
"""

import pytest
import torch

from fastllm.kernels import skinny_gemm as sg
from fastllm.kernels import skinny_linear, skinny_linear_ref, triton_on_cpu

TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.bfloat16, torch.float16]

# (N, K, bias): odd sizes leave masked rows of W and a ragged last K chunk; 769 x 5125 is kept to two cases (the
# interpreter runs the broadcast form's small tiles slowly).
SHAPES = [(769, 64, True), (96, 5125, False)]
ROWS = [1, 3, 16]  # broadcast form with one row, with several, and the tl.dot form


def _inputs(m, n, k, dtype, *, bias=True, device="cpu", lead=()):
    """x [*lead, m, k], weight [n, k] / sqrt(k) (outputs of unit scale) and bias [n] or None."""
    g = torch.Generator(device).manual_seed(m * 1000003 + n * 101 + k)
    x = torch.randn(*lead, m, k, generator=g, device=device).to(dtype)
    weight = (torch.randn(n, k, generator=g, device=device) * k**-0.5).to(dtype)
    b = torch.randn(n, generator=g, device=device).to(dtype) if bias else None
    return x, weight, b


def _exact(x, weight, bias, dtype=torch.float64):
    return skinny_linear_ref(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def _assert_gemm_close(actual, expected, dtype):
    assert actual.dtype == dtype and actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    err = actual.to(expected.dtype) - expected
    tol = TOLERANCES[dtype]
    rel = (err.norm() / expected.norm()).item()
    worst = (err.abs().max() / expected.abs().max()).item()
    assert rel <= tol and worst <= tol, f"relative error {rel:.2e}, worst element {worst:.2e} (tolerance {tol:.0e})"


def _run_cpu(x, weight, bias, **kwargs):
    with triton_on_cpu():
        return skinny_linear(x, weight, bias, **kwargs)


@pytest.mark.parametrize("n,k,bias", SHAPES)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_triton_cpu(n, k, bias, m, dtype):
    x, weight, b = _inputs(m, n, k, dtype, bias=bias)
    _assert_gemm_close(_run_cpu(x, weight, b), _exact(x, weight, b), dtype)


@pytest.mark.parametrize("m", [1, 16])
def test_large_odd_shape_cpu(m):
    # 769 x 5125 with the heuristic's own choice: no split at M = 1 (193 programs), 10 splits at M = 16 (13).
    x, weight, b = _inputs(m, 769, 5125, torch.float16)
    _assert_gemm_close(_run_cpu(x, weight, b), _exact(x, weight, b), torch.float16)


# (M, N, K, split_k); 16 asks for more splits than K has chunks.
SPLITS = [(1, 96, 5125, 3), (3, 96, 5125, 3), (16, 96, 5125, 3), (2, 33, 1500, 16), (4, 33, 1500, 16)]


@pytest.mark.parametrize("m,n,k,split_k", SPLITS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_split_k_forced(m, n, k, split_k, dtype):
    x, weight, b = _inputs(m, n, k, dtype)
    assert sg.workspace_numel(m, n, k, dtype, x.device, split_k) > 0  # the split path runs
    _assert_gemm_close(_run_cpu(x, weight, b, split_k=split_k), _exact(x, weight, b), dtype)


def test_split_k_workspace_given_or_allocated():
    m, n, k = 3, 40, 2048
    x, weight, b = _inputs(m, n, k, torch.float32)
    numel = sg.workspace_numel(m, n, k, x.dtype, x.device, 4)
    workspace = torch.full((numel + 5,), float("nan"))  # larger than needed; stale contents never read
    out = torch.empty(m, n)
    y = _run_cpu(x, weight, b, out=out, workspace=workspace, split_k=4)
    assert y is out
    _assert_gemm_close(y, _exact(x, weight, b), torch.float32)
    assert not torch.isnan(workspace[:numel]).any()  # the partials went there

    # No workspace: one allocated for the call (nothing cached in the module, which would outlive the model).
    _assert_gemm_close(_run_cpu(x, weight, b, split_k=4), _exact(x, weight, b), torch.float32)
    assert not any(isinstance(v, dict) and any(isinstance(t, torch.Tensor) for t in v.values())
                   for v in vars(sg).values())


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_out_3d_and_strided(dtype):
    n, k = 96, 200
    # x [2, 3, K] (M = 6: the dot form) whose rows are a slice of a wider buffer, out given as [2, 3, N].
    wide = torch.randn(6, k + 24).to(dtype)
    x = wide[:, :k].view(2, 3, k)
    _, weight, b = _inputs(6, n, k, dtype)
    out = torch.empty(2, 3, n, dtype=dtype)
    y = _run_cpu(x, weight, b, out=out)
    assert y is out
    _assert_gemm_close(y, _exact(x, weight, b), dtype)
    # x [1, 2, K] (M = 2, broadcast form) into a row-strided out (a slice of a wider buffer).
    x2, weight2, _ = _inputs(2, n, k, dtype, bias=False, lead=(1,))
    big = torch.zeros(2, n + 7, dtype=dtype)
    _run_cpu(x2, weight2, None, out=big[:, :n].view(1, 2, n))
    _assert_gemm_close(big[:, :n].view(1, 2, n), _exact(x2, weight2, None), dtype)
    assert (big[:, n:] == 0).all()


def test_more_than_16_rows_is_f_linear():
    x, weight, b = _inputs(17, 96, 200, torch.float32)
    expected = torch.nn.functional.linear(x, weight, b)
    assert torch.equal(_run_cpu(x, weight, b), expected)
    out = torch.empty(17, 96)
    assert _run_cpu(x, weight, b, out=out) is out and torch.equal(out, expected)
    x3 = x.view(17, 1, 200)  # M = prod(leading dims) = 17
    assert torch.equal(_run_cpu(x3, weight, b), torch.nn.functional.linear(x3, weight, b))


def test_cpu_dispatch_is_the_reference():
    x, weight, b = _inputs(3, 96, 200, torch.float16)
    assert torch.equal(skinny_linear(x, weight, b), skinny_linear_ref(x, weight, b))


def test_empty_and_k_zero():
    assert _run_cpu(torch.randn(0, 8), torch.randn(5, 8), None).shape == (0, 5)
    assert _run_cpu(torch.randn(2, 8), torch.randn(0, 8), None).shape == (2, 0)
    bias = torch.randn(5)
    assert torch.equal(_run_cpu(torch.randn(2, 0), torch.randn(5, 0), bias), bias.expand(2, 5))


def test_heuristic_table():
    """The split choices the heuristic makes at Llama decode shapes (132 SMs on the CPU, as on an H100)."""
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert sg._heuristic(1, 4096, 4096, bf16, cpu)["split_k"] == 1  # 1024 programs of 4 rows
    assert sg._heuristic(4, 4096, 4096, bf16, cpu)["split_k"] == 1  # 512 programs of 8 rows
    dot = sg._heuristic(16, 4096, 4096, bf16, cpu)  # 64 programs of 64 rows: 4 splits of 1024 columns
    assert dot["USE_DOT"] and dot["split_k"] == 4 and sg._split(4096, dot["BLOCK_K"], 4) == (4, 1024)
    assert sg._heuristic(16, 12288, 4096, bf16, cpu)["split_k"] == 1  # 192 programs
    assert sg._heuristic(16, 4096, 14336, bf16, cpu)["split_k"] == 4
    assert sg._heuristic(16, 96, 700, bf16, cpu)["split_k"] == 1  # K too short to split
    assert sg._split(700, 128, 16) == (6, 128)  # never an empty split


def test_bad_inputs():
    x, weight, b = _inputs(3, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=r"weight has shape \(8, 15\), but x's last dim is 16"):
        skinny_linear(x, weight[:, :15], b)
    with pytest.raises(TypeError, match="weight has dtype torch.float16, expected x's dtype torch.float32"):
        skinny_linear(x, weight.half(), b)
    with pytest.raises(TypeError, match="bias has dtype"):
        skinny_linear(x, weight, b.half())
    with pytest.raises(ValueError, match="bias must have shape"):
        skinny_linear(x, weight, b[:7])
    with pytest.raises(ValueError, match="weight must be"):
        skinny_linear(x, weight.view(8, 4, 4), b)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        skinny_linear(x.int(), weight, b)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        skinny_linear(x, torch.randn(16, 8).t(), b)
    with triton_on_cpu():
        with pytest.raises(ValueError, match="out has shape"):
            skinny_linear(x, weight, b, out=torch.empty(3, 7))
        with pytest.raises(ValueError, match="split_k must be"):
            skinny_linear(x, weight, b, split_k=0)
        x2, w2, _ = _inputs(3, 8, 2048, torch.float32)
        with pytest.raises(ValueError, match="workspace has 10 elements"):
            skinny_linear(x2, w2, split_k=2, workspace=torch.empty(10))
        with pytest.raises(ValueError, match="contiguous float32"):
            skinny_linear(x2, w2, split_k=2, workspace=torch.empty(100, dtype=torch.float16))


def test_opcheck():
    op = torch.ops.fastllm.skinny_linear.default
    x, weight, b = _inputs(3, 40, 1100, torch.float32)
    out = torch.empty(3, 40)
    torch.library.opcheck(op, (x, weight, b, out, None, 1))
    workspace = torch.empty(sg.workspace_numel(3, 40, 1100, x.dtype, x.device, 2))
    with triton_on_cpu():
        torch.library.opcheck(op, (x, weight, None, out, workspace, 2))


# --- GPU: bf16/fp16 at the decode shapes of Llama-2-7B and Llama-3.1-8B ----------------------------------------

# (N, K): qkv (7B), o_proj, gate_up (7B), gate_up (8B), down (7B), down (8B), lm_head (7B), lm_head (8B).
GPU_SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (28672, 4096), (4096, 11008), (4096, 14336),
              (32000, 4096), (128256, 4096)]  # fmt: skip
GPU_ROWS = [1, 4, 16]


def _exact_gpu(x, weight, bias):
    """fp32 F.linear of the same inputs with TF32 off (restored after)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _exact(x, weight, bias, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("m", GPU_ROWS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_decode_shapes_gpu(n, k, m, dtype):
    x, weight, _ = _inputs(m, n, k, dtype, bias=False, device="cuda")
    _assert_gemm_close(skinny_linear(x, weight), _exact_gpu(x, weight, None), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize("split_k", [None, 3])  # the heuristic (1 at M <= 2, 2 at M 3-4, 10 above; 132 SMs), 3
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_odd_shapes_bias_gpu(m, split_k, dtype):
    x, weight, b = _inputs(m, 769, 5125, dtype, device="cuda", lead=(1,))
    _assert_gemm_close(skinny_linear(x, weight, b, split_k=split_k), _exact_gpu(x, weight, b), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_float32_gpu(m):
    # fp32 runs tl.dot in "ieee" precision (not tf32): the fp32 tolerance holds.
    x, weight, b = _inputs(m, 4096, 4096, torch.float32, device="cuda")
    _assert_gemm_close(skinny_linear(x, weight, b), _exact_gpu(x, weight, b), torch.float32)


@pytest.mark.gpu
def test_split_k_is_deterministic_gpu():
    x, weight, b = _inputs(16, 4096, 4096, torch.bfloat16, device="cuda")
    assert sg.workspace_numel(16, 4096, 4096, x.dtype, x.device) > 0
    first = skinny_linear(x, weight, b)
    assert all(torch.equal(skinny_linear(x, weight, b), first) for _ in range(3))


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(16, 4096, 4096), (4, 4096, 11008), (1, 22016, 4096)])
def test_cuda_graph_replay(m, n, k):
    """Captured with out= and workspace= (nothing allocated in the capture), replayed after x changes; and captured
    without a workspace once an eager call has cached one."""
    dtype = torch.bfloat16
    x, weight, b = _inputs(m, n, k, dtype, device="cuda")
    static_x = x.clone()
    out = torch.empty(m, n, dtype=dtype, device="cuda")
    out2 = torch.empty_like(out)
    numel = sg.workspace_numel(m, n, k, dtype, x.device)
    workspace = torch.empty(max(numel, 1), dtype=torch.float32, device="cuda")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles, caches the workspace) outside the capture
        skinny_linear(static_x, weight, b, out=out, workspace=workspace)
        skinny_linear(static_x, weight, b, out=out2)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        # Measured inside the capture: torch's own capture bookkeeping (the generators' graph-safe state, 1 KB on
        # torch 2.11) is allocated when a capture begins and is not the launch's.
        allocated = torch.cuda.memory_allocated()
        skinny_linear(static_x, weight, b, out=out, workspace=workspace)
        assert torch.cuda.memory_allocated() == allocated
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2):
        skinny_linear(static_x, weight, b, out=out2)

    for seed in (1, 2):
        static_x.copy_(torch.randn(m, k, generator=torch.Generator("cuda").manual_seed(seed), device="cuda"))
        graph.replay()
        graph2.replay()
        torch.cuda.synchronize()
        expected = _exact_gpu(static_x, weight, b)
        _assert_gemm_close(out, expected, dtype)
        assert torch.equal(out2, out)


@pytest.mark.gpu
def test_autotune_gpu(monkeypatch, tmp_path):
    """The opt-in autotuner times its candidates, keeps the fastest, and capture then uses it without tuning."""
    monkeypatch.setenv("FASTLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(sg.AUTOTUNE_TILES, "broadcast", [(4, 1024, 4, 3), (8, 512, 4, 2)])
    monkeypatch.setattr(sg, "AUTOTUNE_SPLITS", (1, 2))
    monkeypatch.setattr(sg, "_TUNED", {})
    x, weight, _ = _inputs(1, 4096, 4096, torch.float16, device="cuda")
    results = sg.autotune(x, weight)
    assert len(results) == 4 and [ms for _, ms in results] == sorted(ms for _, ms in results)
    assert all(ms > 0 for _, ms in results)
    assert sg._config(1, 4096, 4096, x.dtype, x.device) == results[0][0]
    _assert_gemm_close(skinny_linear(x, weight), _exact_gpu(x, weight, None), torch.float16)


# ---- tuned settings on disk: a later process on the same GPU model starts with them --------------------------


def test_tuning_cache_round_trip_per_gpu(tmp_path, monkeypatch):
    from fastllm.kernels._tuning_cache import TuningCache

    monkeypatch.setenv("FASTLLM_CACHE_DIR", str(tmp_path))
    TuningCache("k").put("GPU A", "1,2,3,bfloat16", {"BLOCK_N": 4, "split_k": 2})
    TuningCache("k").put("GPU A", "4,5,6,bfloat16", {"BLOCK_N": 8, "split_k": 1})  # merged, not overwritten
    later = TuningCache("k")  # as in a new process
    assert later.get("GPU A", "1,2,3,bfloat16") == {"BLOCK_N": 4, "split_k": 2}
    assert later.get("GPU A", "4,5,6,bfloat16") == {"BLOCK_N": 8, "split_k": 1}
    assert later.get("GPU B", "1,2,3,bfloat16") is None
    later.path("GPU B").write_text("{broken")
    with pytest.warns(RuntimeWarning, match="unreadable tuning file"):
        assert TuningCache("k").get("GPU B", "1,2,3,bfloat16") is None


def test_skinny_config_prefers_settings_tuned_by_an_earlier_process(tmp_path, monkeypatch):
    from fastllm.kernels import skinny_gemm

    monkeypatch.setenv("FASTLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(skinny_gemm, "_ON_DISK", skinny_gemm.TuningCache("skinny_gemm"))
    monkeypatch.setattr(skinny_gemm, "_gpu_name", lambda device: "Fake GPU")
    monkeypatch.setattr(skinny_gemm, "sm_count", lambda device: 132)
    monkeypatch.setattr(skinny_gemm, "_TUNED", {})
    monkeypatch.setattr(skinny_gemm, "_HEURISTIC", {})
    cuda = torch.device("cuda", 0)  # only a key here: nothing is launched
    heuristic = skinny_gemm._heuristic(3, 96, 200, torch.bfloat16, cuda)
    tuned = {**heuristic, "split_k": heuristic["split_k"] + 1}
    skinny_gemm.TuningCache("skinny_gemm").put("Fake GPU", skinny_gemm._disk_key(3, 96, 200, torch.bfloat16), tuned)
    assert skinny_gemm._config(3, 96, 200, torch.bfloat16, cuda) == tuned
    assert skinny_gemm._config(3, 97, 200, torch.bfloat16, cuda) == skinny_gemm._heuristic(
        3, 97, 200, torch.bfloat16, cuda)  # an untuned shape: the heuristic
