"""W2's profile at full batch: where the GPU's time goes over a whole offline run (1000 x 128/128 by default).

    PYTHONPATH=. python benchmarks/profile_throughput.py [--model llama31_8b] [--num-requests 1000] [--out DIR]

`fastllm.LLM(model)` with its defaults, warmed as bench_throughput.py warms it; then the workload runs `--repeats`
times timed (the Triton kernels compiled during each run counted), then once under torch.profiler (kernel activity
only). Reported: output tok/s, GPU busy fraction of the profiled
run, the kernels by total time grouped into classes (GEMM, attention, norm, rotary/KV write, activation, sampling,
copies, other), and the GEMMs' achieved TFLOP/s (the model's matmul FLOPs for the tokens the run processed, over
the GEMM kernels' time). Writes DIR/profile-W2-<model>.json; exits 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch
from _common import missing_gpu
from _profile import profile_gpu
from bench_decode import _build
from bench_throughput import _requests

# Kernel name fragments -> class (first match wins; names are lower-cased).
CLASSES = (("attention", ("attention", "attn", "flash", "fmha")),
           ("gemm", ("gemm", "sm90_xmma", "cutlass", "nvjet", "skinny", "matmul", "_mm_")),
           ("norm", ("rms_norm", "layer_norm", "norm")),
           ("rotary_kv_write", ("rotary", "kv_cache", "reshape_and_cache")),
           ("activation", ("silu", "gelu", "act_and_mul")),
           ("sampling", ("sort", "argmax", "topk", "softmax", "multinomial", "exponential", "cumsum", "scatter")),
           ("copies", ("memcpy", "memset", "copy", "cat", "index")))


def _class(name: str) -> str:
    lowered = name.lower()
    for label, fragments in CLASSES:
        if any(f in lowered for f in fragments):
            return label
    return "other"


def _matmul_params(model) -> int:
    """Weights every token multiplies through (embeddings are a lookup; the LM head runs once per sampled row, so it
    is counted apart)."""
    head = model.get_output_embeddings().weight
    return sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n
               and p.data_ptr() != head.data_ptr())


def _count_triton_compiles() -> list:
    """From now on, every Triton kernel compiled in this process appends (kernel name, seconds) to the list."""
    from triton.runtime.jit import JITFunction

    compiles: list = []
    do_compile = JITFunction._do_compile

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return do_compile(self, *args, **kwargs)
        finally:
            compiles.append((self.__name__, time.perf_counter() - start))

    JITFunction._do_compile = timed
    return compiles


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama31_8b")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs before the profiled one")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if missing_gpu(__file__):
        return 2
    import fastllm

    model = _build(args.model)
    requests = _requests("fixed", args.num_requests, model.config.vocab_size)
    prompts = [p for p, _ in requests]
    params = [fastllm.SamplingParams(max_tokens=new, temperature=0, ignore_eos=True) for _, new in requests]
    llm = fastllm.LLM(model)
    n = min(llm.scheduler.max_num_seqs, len(prompts))
    llm.generate(prompts[:n], [fastllm.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)] * n,
                 use_tqdm=False)
    torch.cuda.synchronize()
    compiles = _count_triton_compiles()
    runs = []
    for _ in range(args.repeats):  # the first run after the warm-up is what bench_throughput.py reports
        compiles.clear()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        runs.append({"wall_s": time.perf_counter() - start, "triton_compiles": len(compiles),
                     "triton_compile_s": sum(s for _, s in compiles),
                     "compiled": sorted({name for name, _ in compiles})})
        print(f"run {len(runs)}: {runs[-1]}")
    wall = runs[0]["wall_s"]
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    before = llm.metrics()
    gpu = profile_gpu(lambda: llm.generate(prompts, params, use_tqdm=False), top=40)
    after = llm.metrics()
    steps = after["num_steps"] - before["num_steps"]
    classes: dict[str, float] = {}
    for name, (ms, _) in gpu["top_kernels"].items():
        classes[_class(name)] = classes.get(_class(name), 0.0) + ms
    classes["(not in the top 40)"] = gpu["gpu_busy_ms"] - sum(classes.values())
    # Tokens through the body: every prompt token and every generated token but the last of each request.
    body_tokens = sum(len(p) for p in prompts) + generated - len(requests)
    head_rows = generated
    flops = 2 * (_matmul_params(model) * body_tokens + model.get_output_embeddings().weight.numel() * head_rows)
    gemm_ms = classes.get("gemm", 0.0)
    result = {"model": args.model, "gpu": torch.cuda.get_device_name(), "num_requests": len(requests),
              "output_tok_s": generated / wall, "wall_s": wall, "runs": runs, "profiled_wall_ms": gpu["wall_ms"],
              "gpu_busy_ms": gpu["gpu_busy_ms"], "busy_fraction": gpu["busy_fraction"], "steps": steps,
              "gpu_ms_per_step": gpu["gpu_busy_ms"] / max(steps, 1), "kernels": gpu["num_kernels"],
              "class_ms": classes, "gemm_tflop_s": flops / (gemm_ms / 1e3) / 1e12 if gemm_ms else None,
              "model_tflop": flops / 1e12, "top_kernels": gpu["top_kernels"],
              "host_ms_per_step": {k: 1e3 * (after["step_seconds"][k] - before["step_seconds"][k]) / max(steps, 1)
                                   for k in after["step_seconds"]}}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile-W2-{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"W2 {args.model}: {result['output_tok_s']:.0f} tok/s (wall {wall:.2f} s); profiled: busy "
          f"{gpu['busy_fraction']:.2f}, {steps} steps, GPU {result['gpu_ms_per_step']:.1f} ms/step, "
          f"host ms/step {json.dumps({k: round(v, 1) for k, v in result['host_ms_per_step'].items()})}")
    print(f"model matmul work {result['model_tflop']:.0f} TFLOP; GEMM kernels {gemm_ms:.0f} ms -> "
          f"{result['gemm_tflop_s'] or 0:.0f} TFLOP/s")
    for label, ms in sorted(classes.items(), key=lambda kv: -kv[1]):
        print(f"  {label:22} {ms:9.1f} ms")
    for name, (ms, calls) in list(gpu["top_kernels"].items())[:25]:
        print(f"  {ms:9.1f} ms {calls:6d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
