"""The benchmark tooling that runs without a GPU: RESULTS.md is what summarize.py makes of the committed results,
every result file appears in it, and each GPU script's command line parses (and says it needs a GPU)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _summarize():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import summarize

        return summarize.summarize(BENCHMARKS / "results")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_results_md_is_generated_from_the_result_files():
    text = _summarize()
    assert (BENCHMARKS / "RESULTS.md").read_text() == text, "run `python benchmarks/summarize.py` and commit"
    for path in (BENCHMARKS / "results").iterdir():
        assert f"`{path.name}`" in text, f"{path.name} is not summarized"
    for path in (BENCHMARKS / "results").glob("*.json"):
        result = json.loads(path.read_text())
        if "workload" in result:  # a workload's file holds the versions and the baselines' section
            assert {"gpu", "torch", "date", "config", "fastllm", "baselines"} <= set(result)


GPU_SCRIPTS = ["bench_decode.py", "bench_throughput.py", "bench_kernels.py", "bench_attention.py", "bench_gemv.py",
               "bench_serve.py", "bench_quant.py", "bench_quant_gemv.py", "bench_fused_linear.py",
               "bench_deferred_norm.py", "bench_act_down.py", "profile_step.py", "profile_startup.py",
               "profile_first_start.py", "profile_throughput.py", "replay_ab.py", "bench_startup.py"]

# Runs each script as `python SCRIPT ARGS` would (runpy, as __main__), all in one process: a process a script was
# 2 x 17 imports of torch, 228 s of CI's 2 cores (2026-12-03). Prints {script: [[code, stdout, stderr] per ARGS]}.
_RUN_SCRIPTS = """
import contextlib, io, json, runpy, sys
results = {}
for script in sys.argv[1:]:
    runs = []
    for args in (["--help"], ["--out", "/nonexistent-not-written"]):
        out, err = io.StringIO(), io.StringIO()
        sys.argv = [script, *args]
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException as error:
            code, err = 1, io.StringIO(f"{err.getvalue()}{type(error).__name__}: {error}")
        runs.append([code, out.getvalue(), err.getvalue()])
    results[script] = runs
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def script_runs():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent), str(BENCHMARKS)])}
    run = subprocess.run([sys.executable, "-c", _RUN_SCRIPTS, *GPU_SCRIPTS], capture_output=True, text=True, env=env,
                         cwd=BENCHMARKS, timeout=600)
    assert run.returncode == 0 and "RESULTS" in run.stdout, run.stderr[-3000:]
    return json.loads(run.stdout.split("RESULTS", 1)[1])


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_scripts_parse_their_arguments(script, script_runs):
    (help_code, help_out, help_err), (code, _, err) = script_runs[script]
    assert help_code == 0 and "usage" in help_out, help_err[-2000:]
    if not torch.cuda.is_available():
        assert code == 2 and "GPU" in err, err[-2000:]


def test_quant_quality_script_parses_its_arguments():
    """benchmarks/quant_quality.py runs on the CPU (the demo model); here only its command line (the demo-model test
    in test_demo_model.py computes the same perplexities)."""
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    run = subprocess.run([sys.executable, str(BENCHMARKS / "quant_quality.py"), "--help"], capture_output=True,
                         text=True, env=env, cwd=BENCHMARKS, timeout=120)
    assert run.returncode == 0 and "perplexity" in run.stdout, run.stderr[-2000:]


def test_fold_quality_script_parses_its_arguments_and_folds_as_the_pass_does(tmp_path, monkeypatch):
    """benchmarks/fold_quality.py runs on the CPU (the demo model, ~1 min); here its command line, and its fold of a
    plain model (what "folded first" measures): each q/k/v and gate/up W's columns times its norm's weight, in fp32,
    rounded once; the norms' weights 1; the model's function kept (fp32: to rounding)."""
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    run = subprocess.run([sys.executable, str(BENCHMARKS / "fold_quality.py"), "--help"], capture_output=True,
                         text=True, env=env, cwd=BENCHMARKS, timeout=120)
    assert run.returncode == 0 and "folding the RMSNorm weights" in run.stdout, run.stderr[-2000:]
    from tests._models import build, with_random_norms

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import fold_quality

    model = with_random_norms(build("llama", tmp_path))
    layer = model.model.layers[0]
    q, gate = layer.self_attn.q_proj.weight.clone(), layer.mlp.gate_proj.weight.clone()
    scale, scale2 = layer.input_layernorm.weight.clone(), layer.post_attention_layernorm.weight.clone()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = model(ids).logits
        fold_quality.fold_norms(model)
        after = model(ids).logits
    assert torch.equal(layer.self_attn.q_proj.weight, q * scale)
    assert torch.equal(layer.mlp.gate_proj.weight, gate * scale2)
    assert all(torch.all(x.input_layernorm.weight == 1) and torch.all(x.post_attention_layernorm.weight == 1)
               for x in model.model.layers)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_sass_count_compiles_a_kernel_for_sm90_on_the_cpu():
    """benchmarks/sass_count.py: registers and SASS of a kernel compiled for Hopper without a GPU (triton's bundled
    ptxas / cuobjdump / nvdisasm); with --pdl the griddepcontrol instructions appear."""
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    run = subprocess.run([sys.executable, str(BENCHMARKS / "sass_count.py"), "fastllm.kernels.argmax:_chunk_kernel",
                          "CHUNK=256", "USE_PDL=True", "--ptr", "KEYS=*i64", "--pdl"], capture_output=True, text=True,
                         env=env, cwd=BENCHMARKS, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    registers = re.search(r"REG \['(\d+)'\]", run.stdout)
    count = re.search(r"instructions (\d+)", run.stdout)
    assert registers and 0 < int(registers.group(1)) <= 255 and count and int(count.group(1)) > 10, run.stdout
    assert "ACQBULK" in run.stdout or "ACQBULK" in run.stdout.upper(), run.stdout  # griddepcontrol.wait


def test_host_step_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/bench_host_step.py measures host time with the model stubbed: it runs anywhere; both sampler paths
    give every request its tokens (the script checks), and the result names its baseline."""
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    run = subprocess.run([sys.executable, str(BENCHMARKS / "bench_host_step.py"), "--seqs", "8", "--out",
                          str(tmp_path)], capture_output=True, text=True, env=env, cwd=BENCHMARKS, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (path,) = tmp_path.glob("host-step-*.json")
    result = json.loads(path.read_text())
    for entry in (result["fastllm"]["seqs_8"], result["baselines"]["per_row"]["seqs_8"]):
        assert entry["steps"] > 0 and entry["ms_per_step"] > 0
        assert set(entry["phase_ms_per_step"]) == {"schedule", "execute", "sample", "update"}


def test_attention_summary_renders_a_missing_baseline_and_the_decode_sweep():
    """A W5-attention file with a case no fused SDPA backend took, a fused decode step beside its unfused kernels,
    and --sweep's table: the default setting's time beside the fastest (the numbers here are made up for the
    renderer, not measured)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import summarize
    finally:
        sys.path.remove(str(BENCHMARKS))
    timings = [{"BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "ms_cudagraph": 0.010},
               {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "ms_cudagraph": 0.012},
               {"BLOCK_N": 128, "num_warps": 2, "num_stages": 3, "error": "out of resources"}]
    result = {"fastllm": {"decode_b512_ctx192": {"gb_s_cudagraph": 2000.0},
                          "decode_b1_ctx1024_rotary": {"gb_s_cudagraph": 1000.0, "ms_cudagraph": 0.0042,
                                                       "ms_cudagraph_unfused": 0.0063}},
              "baselines": {"torch_ref": {"decode_b512_ctx192": None}, "copy": {"gb_s": 4000.0},
                            "decode_sweep": {"decode_b512_ctx192": {
                                "default": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}, "timings": timings}}}}
    lines = summarize._w5_attention(result)
    assert "| decode_b512_ctx192 | 2000 GB/s | – | – |" in lines
    assert "| decode_b512_ctx192 | 64 / 4 / 2 | 12.0 | 32 / 4 / 2 | 10.0 |" in lines
    assert "| decode_b1_ctx1024_rotary | 1000 GB/s, 4.2 us | unfused kernels: 6.3 us | – |" in lines


def test_int4_chunk_sweep_of_the_dot_form_launches_the_configs_it_records(monkeypatch):
    """bench_quant_gemv's int4 sweep at 3-16 rows (--int4-chunk-groups): every config it records is the one the
    kernel was launched with (its groups an iteration, its K splits), each checked against the reference first. On
    the CPU through the interpreter (fp32 rows, the dot form); the one-row packed loop needs a GPU."""
    from fastllm.kernels import quant_linear, triton_on_cpu
    from fastllm.quant import int_weight

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_quant_gemv
    finally:
        sys.path.remove(str(BENCHMARKS))
    monkeypatch.setattr(bench_quant_gemv, "WORKING_SET", 0)  # no weight copies beyond the first
    torch.manual_seed(0)
    m, n, k, group = 4, 48, 1024, 128
    tensors = int_weight.quantize_int4(torch.randn(n, k) * 0.05, group)
    x = torch.randn(m, k)
    launched = []
    kernel = quant_linear._int4_gemv_kernel

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((grid[1], kwargs["CHUNK_GROUPS"]))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(quant_linear, "_int4_gemv_kernel", Recording())
    timed = []

    def bench(fn):
        launched.clear()
        fn()
        timed.append(launched[-1])
        return 0.01

    with triton_on_cpu():
        results = bench_quant_gemv._sweep_int4(x, tensors, quant_linear.int4_linear, bench, chunk_groups=[1, 2, 4])
    assert {r["CHUNK_GROUPS"] for r in results} == {1, 2, 4} and all(r["USE_DOT"] for r in results)
    # what each timing launched: its chunk groups, and K in whole chunks split as asked (possibly fewer)
    assert sorted(timed) == sorted(
        (quant_linear.skinny_gemm._split(k // group, r["CHUNK_GROUPS"], r["split_k"])[0], r["CHUNK_GROUPS"])
        for r in results)
    assert quant_linear._INT4_CONFIGS.get((m, n, k, group, x.device, False, 1)) is None  # the sweep's config gone


def test_quant_kernel_settings_name_real_flags_and_take_effect_on_int4_launch_settings():
    """bench_quant --kernel-settings: each setting names a flag its module has; inside a setting the flag holds its
    value and int4 launch settings are worked out anew under it (their cache key does not hold every flag), and
    afterwards the flag and the launch settings are as before. int4_programs1 asks a quarter of the default's programs
    of the one-row loop in chunks of several groups: Llama-3.1-8B's o_proj (64 blocks of 64 rows) then splits K 2
    ways, not 8."""
    import importlib

    from fastllm.kernels import quant_linear

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_quant
    finally:
        sys.path.remove(str(BENCHMARKS))
    for module_name, flag, _ in bench_quant.KERNEL_SETTINGS.values():
        assert hasattr(importlib.import_module(module_name), flag), (module_name, flag)
    cpu = torch.device("cpu")
    before = quant_linear._int4_config(1, 4096, 4096, 128, cpu, packed_bf16=True)
    assert before["CHUNK_GROUPS"] == quant_linear.INT4_CHUNK_GROUPS > 1 and before["split_k"] == 8
    with bench_quant.kernel_setting("int4_programs1"):
        assert quant_linear.INT4_ONE_ROW_PROGRAMS_PER_SM == 1
        assert quant_linear._int4_config(1, 4096, 4096, 128, cpu, packed_bf16=True)["split_k"] == 2
    assert quant_linear.INT4_ONE_ROW_PROGRAMS_PER_SM == 4
    assert quant_linear._int4_config(1, 4096, 4096, 128, cpu, packed_bf16=True) == before


def test_the_split_gpu_test_stages_cover_every_file_with_gpu_tests():
    """run_on_gpu.sh's tests-kernels / tests-quant / tests-runtime are the whole `pytest -m gpu` in three device calls:
    a new file of GPU tests must be named in one of them, or a session running the three would skip it unknowingly."""
    script = (BENCHMARKS / "run_on_gpu.sh").read_text()
    stages = re.findall(r"^\s*tests-(?:kernels|quant|runtime)\) gpu_tests (.*?);;", script, re.S | re.M)
    assert len(stages) == 3
    tests = BENCHMARKS.parent / "tests"
    named = set()
    for stage in stages:
        for word in stage.replace("\\", " ").split():
            if word.startswith("tests/"):
                named |= {path.name for path in tests.glob(word.removeprefix("tests/"))}
    with_gpu_tests = {path.name for path in tests.glob("test_*.py")
                      if re.search(r"mark\.gpu\b", path.read_text())}
    assert with_gpu_tests and named == with_gpu_tests, (sorted(with_gpu_tests - named), sorted(named - with_gpu_tests))
