"""kernels/compile_ahead.py: a start-up forward's new Triton kernels compiled side by side in a dry run, then the
forward run for real.

On the CPU the orchestration is tested with a stand-in for Triton's hook call (the interpreter never compiles, so
the real hook never fires there); on a GPU, real kernels: a fresh kernel compiled ahead gives the result of a plain
launch, and a whole model started with an empty Triton cache decodes as HF eager does, as it does without it.
"""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastllm.kernels import compile_ahead

REPO = Path(__file__).resolve().parents[1]


class FakeKernel:
    """Stands in for a JIT function: `launch` asks the hook, as Triton's run() does when a specialization is not
    compiled yet, and launches (writes its output) unless the hook skipped it."""

    def __init__(self):
        self.compiled: set[str] = set()
        self.preloads: list[str] = []
        self.device_caches = {0: ({},)}
        self.compile_seconds = 0.06  # as the compiler takes (QUICK_COMPILE_S: a disk cache's answer)

    def launch(self, key: str, out: list) -> None:
        if key not in self.compiled:
            skipped = compile_ahead._hook(key=key, fn=SimpleNamespace(jit_function=self), is_manual_warmup=False,
                                          compile={"specialization_data": key, "constants": {}, "device": None})
            if skipped:
                return
            self.compiled.add(key)  # compiled in place, as Triton does without the hook
        out.append(key)


@pytest.fixture
def fake_triton(monkeypatch):
    """run_compiling_ahead as on CUDA, the hook taken as ours, and each compile recorded (after a short sleep, so
    pool threads overlap) instead of reaching Triton."""
    monkeypatch.setattr(compile_ahead, "_usable", lambda device: True)
    monkeypatch.setattr(compile_ahead, "_install_hook", lambda: True)
    monkeypatch.setitem(compile_ahead._last_dry_run, "on_disk", False)
    kernel = FakeKernel()

    def compile_(jit_function, specialization, constants, device):
        time.sleep(kernel.compile_seconds)
        jit_function.preloads.append(specialization)
        jit_function.compiled.add(specialization)

    monkeypatch.setattr(compile_ahead, "_compile", compile_)
    return kernel


def test_a_forward_with_nothing_to_compile_runs_once(fake_triton):
    fake_triton.compiled = {"a", "b"}
    calls = []

    def forward():
        out = []
        calls.append(1)
        fake_triton.launch("a", out)
        fake_triton.launch("b", out)
        return out

    assert compile_ahead.run_compiling_ahead(forward, device=torch.device("cuda")) == ["a", "b"]
    assert len(calls) == 1 and fake_triton.preloads == []


def test_new_kernels_compile_once_each_in_the_dry_run_then_the_forward_runs_for_real(fake_triton):
    calls, dry_runs = [], compile_ahead.stats["dry_runs"]

    def forward():
        out = []
        calls.append(compile_ahead._dry_run.get() is not None)
        for key in ("norm", "gemm", "norm", "gemm", "attention"):  # a layer's kernels met again in the next one
            fake_triton.launch(key, out)
        return out

    result = compile_ahead.run_compiling_ahead(forward, device=torch.device("cuda"))
    assert calls == [True, False]  # a dry run, then the real one
    assert result == ["norm", "gemm", "norm", "gemm", "attention"]
    assert sorted(fake_triton.preloads) == ["attention", "gemm", "norm"]  # each once, on the pool
    assert compile_ahead.stats["dry_runs"] == dry_runs + 1
    # Compiled now: a second forward runs once (in dry mode, but nothing was skipped: it was the real run).
    calls.clear()
    assert compile_ahead.run_compiling_ahead(forward, device=torch.device("cuda")) == result
    assert len(calls) == 1 and compile_ahead.stats["dry_runs"] == dry_runs + 1


def test_after_a_dry_run_whose_compiles_came_from_disk_forwards_run_once(fake_triton):
    """Kernels that Triton's disk cache holds compile in milliseconds: a dry run would cost a forward for nothing."""
    fake_triton.compile_seconds = 0.001
    calls = []

    def forward(key):
        out = []
        calls.append(key)
        fake_triton.launch(key, out)
        return out

    assert compile_ahead.run_compiling_ahead(forward, "first", device=torch.device("cuda")) == ["first"]
    assert calls == ["first", "first"] and compile_ahead._last_dry_run["on_disk"]
    assert compile_ahead.run_compiling_ahead(forward, "second", device=torch.device("cuda")) == ["second"]
    assert calls[2:] == ["second"] and "second" not in fake_triton.preloads  # compiled in place, in one run


def test_a_failing_dry_run_falls_back_to_the_real_run_and_a_real_error_is_raised(fake_triton):
    calls = []

    def forward_failing_only_dry():
        calls.append(1)
        out = []
        fake_triton.launch("x", out)
        if not out:  # the skipped kernel's output is missing: a later op trips over it
            raise RuntimeError("garbage in the dry run")
        return out

    assert compile_ahead.run_compiling_ahead(forward_failing_only_dry, device=torch.device("cuda")) == ["x"]
    assert len(calls) == 2

    def forward_always_failing():
        raise ValueError("a real error")

    with pytest.raises(ValueError, match="a real error"):
        compile_ahead.run_compiling_ahead(forward_always_failing, device=torch.device("cuda"))


def test_launches_for_real_inside_a_dry_run_compile_in_place(fake_triton):
    seen = []

    def forward():
        out = []
        with compile_ahead.launches_for_real():  # the passes quantizing weights: must really run
            fake_triton.launch("quantize", out)
        seen.append(list(out))
        fake_triton.launch("gemm", out)
        return out

    assert compile_ahead.run_compiling_ahead(forward, device=torch.device("cuda")) == ["quantize", "gemm"]
    assert seen[0] == ["quantize"]  # launched in the dry run too
    assert fake_triton.preloads == ["gemm"]


def test_the_hook_does_nothing_outside_a_dry_run_or_for_a_manual_warmup():
    kernel = FakeKernel()
    info = {"key": "k", "fn": SimpleNamespace(jit_function=kernel),
            "compile": {"specialization_data": "k", "constants": {}, "device": None}}
    assert compile_ahead._hook(is_manual_warmup=False, **info) is None
    dry = compile_ahead._DryRun(executor=None)
    token = compile_ahead._dry_run.set(dry)
    try:
        assert compile_ahead._hook(is_manual_warmup=True, **info) is None
    finally:
        compile_ahead._dry_run.reset(token)
    assert dry.futures == {}


def test_the_hook_is_a_thread_s_own():
    """Another thread's launches (a second engine's) compile in place while this thread runs dry."""
    kernel, results = FakeKernel(), []
    info = {"key": "k", "fn": SimpleNamespace(jit_function=kernel), "is_manual_warmup": False,
            "compile": {"specialization_data": "k", "constants": {}, "device": None}}
    token = compile_ahead._dry_run.set(compile_ahead._DryRun(executor=None))
    try:
        other = threading.Thread(target=lambda: results.append(compile_ahead._hook(**info)))
        other.start()
        other.join()
    finally:
        compile_ahead._dry_run.reset(token)
    assert results == [None]


def test_cpu_tensors_and_a_foreign_hook_run_the_forward_once(monkeypatch):
    calls = []

    def forward(x):
        calls.append(compile_ahead._dry_run.get())
        return x + 1

    assert compile_ahead.run_compiling_ahead(forward, torch.ones(2), device=torch.device("cpu")).tolist() == [2, 2]
    assert calls == [None]
    pytest.importorskip("triton")
    from triton import knobs

    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kwargs: None)  # another library's
    assert compile_ahead._install_hook() is False


def test_a_kernel_compiled_with_other_constants_than_asked_is_forgotten():
    """Preload's JSON round trip must give the launch's constexprs; where it did not, the kernel is dropped from the
    JIT cache so the real launch compiles its own."""
    kernel = SimpleNamespace(src=SimpleNamespace(constants={(3,): "fp32"}), name="k")
    cache = {"key": kernel}
    jit = SimpleNamespace(preload=lambda spec: kernel, device_caches={0: (cache,)})
    compile_ahead._compile(jit, "spec", {(3,): "float32"}, None)
    assert cache == {}
    kept = SimpleNamespace(src=SimpleNamespace(constants={(3,): 64}), name="k", metadata=None)
    cache["key"] = kept
    jit = SimpleNamespace(preload=lambda spec: kept, device_caches={0: (cache,)})
    compile_ahead._compile(jit, "spec", {(3,): SimpleNamespace(value=64)}, None)  # tl.constexpr(64) as launched
    assert cache == {"key": kept}


def test_prepare_triton_runs_every_step_on_a_thread_and_a_failing_one_is_left_to_triton(monkeypatch):
    done = []

    def failing():
        done.append("key")
        raise OSError("libtriton.so unreadable")

    monkeypatch.setattr(compile_ahead, "_support_thread", None)
    monkeypatch.setattr(compile_ahead, "COMPILE_AHEAD", True)
    monkeypatch.setattr(compile_ahead, "HAS_TRITON", True)
    monkeypatch.setattr(compile_ahead, "_triton_key", failing)
    monkeypatch.setattr(compile_ahead, "_driver_module", lambda: done.append(("driver", threading.current_thread())))
    monkeypatch.setattr(compile_ahead, "_backend_hash", lambda: done.append("backend"))
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    compile_ahead.prepare_triton(torch.device("cpu"))  # not a CUDA device: nothing to prepare
    assert compile_ahead._support_thread is None
    compile_ahead.prepare_triton(torch.device("cuda", 0))
    compile_ahead._join_support_thread()
    assert done[0] == "key" and done[2] == "backend"
    assert done[1][0] == "driver" and done[1][1] is not threading.main_thread()


# GPU ------------------------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _scale_add(X, Y, n, alpha, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(Y + offsets, tl.load(X + offsets, mask=mask) * alpha + 1.0, mask=mask)
except ImportError:
    _scale_add = None


@pytest.mark.gpu
def test_gpu_kernels_compiled_ahead_give_the_plain_launch_result(monkeypatch):
    """A kernel not compiled yet in this process (two specializations: BLOCK 128 and 256, n odd), a torch op between
    them reading the first's output: a dry run, then the real run, equal to the same ops launched plainly."""
    monkeypatch.setitem(compile_ahead._last_dry_run, "on_disk", False)  # whatever this worker's earlier tests left
    x = torch.randn(1001, device="cuda")

    def forward(x):
        y = torch.empty_like(x)
        _scale_add[(triton.cdiv(x.numel(), 128),)](x, y, x.numel(), 2.0, BLOCK=128)
        z = torch.empty_like(x)
        _scale_add[(triton.cdiv(x.numel(), 256),)](y.square(), z, x.numel(), 0.5, BLOCK=256)
        return z

    compiles = compile_ahead.stats["compiles"]
    result = compile_ahead.run_compiling_ahead(forward, x, device=x.device)
    assert compile_ahead.stats["compiles"] == compiles + 2
    torch.testing.assert_close(result, (x * 2 + 1).square() * 0.5 + 1, rtol=0, atol=0)
    assert torch.equal(result, forward(x))


_START = """
import json, torch
from transformers import LlamaConfig, LlamaForCausalLM
import fastllm
from fastllm.kernels import compile_ahead

config = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=503, max_position_embeddings=512, eos_token_id=None,
                     bos_token_id=None, pad_token_id=0)
torch.manual_seed(0)
model = LlamaForCausalLM(config).to("cuda", torch.float32).eval()
ids = torch.randint(3, 503, (1, 37), device="cuda")
hf = model.generate(ids, max_new_tokens=24, do_sample=False)[0, 37:].tolist()
fastllm.optimize(model)
ours = model.generate(ids, max_new_tokens=24, do_sample=False)[0, 37:].tolist()
print(json.dumps({"hf": hf, "ours": ours, **compile_ahead.stats}))
"""


@pytest.mark.gpu
@pytest.mark.parametrize("ahead", ["1", "0"])
def test_gpu_a_cold_start_decodes_as_hf_eager_with_and_without_compiling_ahead(tmp_path, ahead):
    """A new process with Triton's cache and fastllm's empty (every kernel compiled at start-up): greedy tokens equal
    HF eager's (fp32, CUDA graphs), and with FASTLLM_COMPILE_AHEAD=1 the start-up forwards compiled ahead."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"), "FASTLLM_CACHE_DIR": str(tmp_path / "fastllm"),
           "FASTLLM_COMPILE_AHEAD": ahead, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _START], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ours"] == result["hf"]
    if ahead == "1":
        assert result["dry_runs"] >= 2 and result["compiles"] >= 5, result
    else:
        assert result["dry_runs"] == 0 and result["compiles"] == 0, result
