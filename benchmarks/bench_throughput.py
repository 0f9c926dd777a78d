"""W2 (offline throughput) and W4 (KV-cache capacity, peak memory) beside HF continuous batching.

    PYTHONPATH=. python benchmarks/bench_throughput.py [--model llama31_8b] [--workloads fixed mixed]
        [--num-requests 1000] [--providers fastllm fastllm_sync hf_continuous_batching]
        [--settings default seqs=512 seqs=1024,tokens=16384] [--quantization fp8|int8|int4|fp8_kv [--bf16-baseline]]
        [--out DIR]

`--settings` runs fastllm once per engine setting: "default" is `fastllm.LLM(model)` with no options at all (the
defaults sized from the card), "seqs=N[,tokens=M]" sets max_num_seqs (and max_num_batched_tokens), "passes+=NAME"
adds an opt-in pass to the defaults (e.g. passes+=fp8_input_quant; combinable: "seqs=512,passes+=NAME"). Results
are keyed `<model>_<workload>` for the first setting and `<model>_<workload>_<setting>` for the others.

Per BENCHMARKS.md: random-weight model (seed 0), random prompt ids, greedy, EOS ignored so every request produces
exactly its requested tokens. "fixed": 1000 × 128 prompt / 128 new; "mixed": 1000 requests, prompt lengths uniform
in [32, 1024], output lengths uniform in [32, 512], seed 2. Output tok/s = generated tokens / wall time of the
whole batch; TTFT and time per output token per request (all arrive at t=0: an offline batch). W4: KV tokens the
cache holds at kv_cache_memory_fraction 0.9, and the peak GPU memory of the run.
The profile of each fastllm run: steps, host milliseconds per step in each phase of the engine's loop (schedule,
prepare + launch, sample = wait for the GPU, bookkeeping), and the GPU busy fraction (kernel time over wall time,
torch.profiler) of a second run of the workload's first 256 requests.
The compute ceiling of each fastllm run: the workload's matmul FLOPs (every prompt and output token through every
weight but the embedding) at the bf16 GEMM rate measured in the same run on the model's own shapes (cuBLAS, 16384
rows), as output tok/s, and the run's fraction of it.
Writes DIR/W2-<gpu>-<yyyymmdd>.json (W4's figures inside, under "w4"); exits 2 without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time

import torch
from _common import missing_gpu, write_result
from _profile import profile_gpu
from bench_decode import MODELS, _build


def _requests(kind: str, n: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(0 if kind == "fixed" else 2)
    out = []
    for _ in range(n):
        prompt_len, new = (128, 128) if kind == "fixed" else (rng.randint(32, 1024), rng.randint(32, 512))
        out.append(([rng.randrange(1, vocab) for _ in range(prompt_len)], new))
    return out


def _percentiles(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return statistics.median(values), values[min(len(values) - 1, int(0.99 * len(values)))]


def _setting(text: str) -> dict:
    """`default` -> {} (LLM's own defaults); `seqs=512,tokens=16384` -> the engine options; `passes+=NAME` -> the
    default passes and NAME."""
    if text == "default":
        return {}
    import fastllm

    names = {"seqs": "max_num_seqs", "tokens": "max_num_batched_tokens"}
    options = {}
    for part in text.split(","):
        if part.startswith("passes+="):
            options["passes"] = (*options.get("passes", fastllm.DEFAULT_PASSES), part.removeprefix("passes+="))
        else:
            key, value = part.split("=")
            options[names[key]] = int(value)
    return options


def run_fastllm(model, requests, options: dict, async_scheduling: bool = True) -> tuple[dict, dict]:
    """One fastllm run of the workload (LLM with `options`, e.g. quantization); returns (W2 entry, W4 entry)."""
    import fastllm

    start = time.perf_counter()
    llm = fastllm.LLM(model, **options, **({} if async_scheduling else {"async_scheduling": False}))
    engine_start_s = time.perf_counter() - start
    max_num_seqs = llm.scheduler.max_num_seqs
    prompts = [p for p, _ in requests]
    params = [fastllm.SamplingParams(max_tokens=new, temperature=0, ignore_eos=True) for _, new in requests]
    # Warm-up on the workload's first full batch, 2 tokens each: its prefill steps are the largest the timed run
    # has, so kernels that compile per shape class (Triton specializes on sizes) do it here, not in the timing.
    n = min(max_num_seqs, len(prompts))
    llm.generate(prompts[:n], [fastllm.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)] * n,
                 use_tqdm=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = llm.metrics()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    after = llm.metrics()
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert generated == sum(new for _, new in requests), "every request must produce exactly its tokens"
    ttft = [o.metrics.time_to_first_token for o in outputs]
    tpot = [o.metrics.time_per_output_token for o in outputs if o.metrics.time_per_output_token is not None]
    (t50, t99), (p50, p99) = _percentiles(ttft), _percentiles(tpot)
    runner = llm.runner
    w2 = {"output_tok_s": generated / wall, "requests_s": len(requests) / wall, "ttft_ms_p50": 1e3 * t50,
          "ttft_ms_p99": 1e3 * t99, "tpot_ms_p50": 1e3 * p50, "tpot_ms_p99": 1e3 * p99, "wall_s": wall,
          "num_preemptions": llm.num_preemptions, "async_scheduling": llm.async_scheduling,
          "options": options or "defaults", "max_num_seqs": max_num_seqs,
          "max_num_batched_tokens": llm.scheduler.max_num_batched_tokens, "engine_start_s": engine_start_s}
    steps = after["num_steps"] - before["num_steps"]
    w2["profile"] = {
        "steps": steps,
        "host_ms_per_step": {k: 1e3 * (after["step_seconds"][k] - before["step_seconds"][k]) / steps
                             for k in after["step_seconds"]},
    }
    gpu = profile_gpu(lambda: llm.generate(prompts[:256], params[:256], use_tqdm=False), top=8)
    w2["profile"]["gpu_busy_fraction_256_requests"] = gpu["busy_fraction"]
    w2["profile"]["top_kernels_256_requests"] = gpu["top_kernels"]
    w4 = {"kv_tokens": runner.pool.num_blocks * runner.block_size,
          "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}
    return w2, w4


def linear_shapes(model) -> list[tuple[int, int]]:
    """The model's distinct linear weight shapes (read before optimize(): a quantized model lets its float weights
    go)."""
    return sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})


def measure_gemm_rate(shapes: list[tuple[int, int]], rows: int = 16384, repeats: int = 20, fp8: bool = False) -> float:
    """The card's GEMM rate (TFLOP/s) on this model's own linear shapes at `rows` tokens, best of `repeats` timed
    passes over every shape: bf16 through torch.mm, or with `fp8` e4m3 operands with row-wise scales through
    torch._scaled_mm (what fastllm's fp8 runs at prefill sizes)."""
    x = torch.randn(rows, max(k for _, k in shapes), device="cuda", dtype=torch.bfloat16)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for n, k in shapes]
    flops = sum(2 * rows * n * k for n, k in shapes)
    if fp8:
        e4m3 = torch.float8_e4m3fn
        xq, x_scale = x.to(e4m3), torch.ones(rows, 1, device="cuda")
        weights = [(w.to(e4m3), torch.ones(1, w.shape[0], device="cuda")) for w in weights]

    def one_pass():
        for w in weights:
            if fp8:
                torch._scaled_mm(xq[:, : w[0].shape[1]], w[0].t(), scale_a=x_scale, scale_b=w[1],
                                 out_dtype=torch.bfloat16)
            else:
                torch.mm(x[:, : w.shape[1]], w.t())

    one_pass()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        one_pass()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return flops / best / 1e12


def matmul_params(model) -> int:
    """Weights every token multiplies by: the embedding is a lookup, the LM head counts (also when tied). Read before
    optimize(), as `linear_shapes`."""
    embed = model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p.data_ptr() != embed.data_ptr())
    if model.get_output_embeddings().weight.data_ptr() == embed.data_ptr():  # tied: the head still multiplies
        params += embed.numel()
    return params


def compute_ceiling(params: int, requests, gemm_tflop_s: float) -> dict:
    """W2's compute ceiling: every token of every request (prompt and output) through the model's `params` matmul
    weights (the LM head counted for every token as a dense model's FLOPs usually are), at the measured GEMM rate; as
    output tok/s."""
    tokens = sum(len(p) + new for p, new in requests)
    seconds = 2 * params * tokens / (gemm_tflop_s * 1e12)
    return {"gemm_tflop_s": gemm_tflop_s, "model_tflop": 2 * params * tokens / 1e12, "ceiling_s": seconds,
            "ceiling_output_tok_s": sum(new for _, new in requests) / seconds}


def run_hf_continuous_batching(model, requests) -> dict:
    from transformers import GenerationConfig

    groups: dict[int, list[list[int]]] = {}
    for prompt, new in requests:  # generate_batch takes one generation config: one call per output length
        groups.setdefault(new, []).append(prompt)
    torch.cuda.synchronize()
    start = time.perf_counter()
    generated = 0
    for new, prompts in groups.items():
        config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        results = model.generate_batch(prompts, generation_config=config, progress_bar=False)
        generated += sum(len(r.generated_tokens) for r in results.values())
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"output_tok_s": generated / wall, "requests_s": len(requests) / wall, "wall_s": wall,
            "num_calls": len(groups)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama31_8b", choices=list(MODELS))
    parser.add_argument("--workloads", nargs="+", default=["fixed", "mixed"], choices=["fixed", "mixed"])
    parser.add_argument("--providers", nargs="+", default=["fastllm", "hf_continuous_batching"],
                        choices=["fastllm", "fastllm_sync", "hf_continuous_batching"],
                        help="fastllm_sync: the engine with async_scheduling=False (results keyed <workload>_sync)")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--baseline-workloads", nargs="*", default=["fixed"], choices=["fixed", "mixed"],
                        help="workloads the HF baseline runs on (its mixed run takes minutes of device time)")
    parser.add_argument("--settings", nargs="+", default=["default"],
                        help='engine settings: "default" (LLM(model) with no options) or "seqs=N[,tokens=M]", '
                             '"passes+=NAME" (an opt-in pass besides the defaults)')
    parser.add_argument("--quantization", choices=["fp8", "int8", "int4", "fp8_kv"],
                        help="every fastllm run quantized so (the file is then W2-<quantization>; the compute ceiling "
                             "of an fp8 run is measured with FP8 GEMMs)")
    parser.add_argument("--bf16-baseline", action="store_true",
                        help="with --quantization: also run fastllm unquantized on each workload, first, and record it "
                             "as baselines.fastllm_bf16 (the same call's reference for the quantized numbers)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if missing_gpu(__file__):
        return 2
    workload = f"W2-{args.quantization}" if args.quantization else "W2"
    fastllm_results, baselines, w4 = {}, {"hf_continuous_batching": {}}, {}
    runs = [(kind, provider, setting) for kind in args.workloads
            for provider in sorted(args.providers, key=lambda p: p.startswith("fastllm"))  # baseline first
            for setting in (args.settings if provider.startswith("fastllm") else [None])]
    if args.quantization and args.bf16_baseline:
        baselines["fastllm_bf16"] = {}
        runs = [(kind, "fastllm_bf16", args.settings[0]) for kind in args.workloads] + runs
    for kind, provider, setting in runs:
        if provider == "fastllm_bf16":
            model = _build(args.model)
            key = f"{args.model}_{kind}"
            entry, entry["w4"] = run_fastllm(model, _requests(kind, args.num_requests, model.config.vocab_size),
                                             _setting(setting), async_scheduling=True)
            baselines["fastllm_bf16"][key] = entry
            print(provider, key, entry, flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()
            continue
        ours = provider.startswith("fastllm")
        if not ours and kind not in args.baseline_workloads:
            continue
        key = f"{args.model}_{kind}" + ("_sync" if provider == "fastllm_sync" else "")
        if ours and setting != args.settings[0]:
            key += f"_{setting.replace('=', '').replace(',', '_')}"
        model = _build(args.model)
        requests = _requests(kind, args.num_requests, model.config.vocab_size)
        if ours:
            options = {**_setting(setting), **({"quantization": args.quantization} if args.quantization else {})}
            shapes, params = linear_shapes(model), matmul_params(model)
            fastllm_results[key], w4[key] = run_fastllm(model, requests, options,
                                                        async_scheduling=provider != "fastllm_sync")
            ceiling = compute_ceiling(params, requests, measure_gemm_rate(shapes, fp8=args.quantization == "fp8"))
            ceiling["fraction"] = fastllm_results[key]["output_tok_s"] / ceiling["ceiling_output_tok_s"]
            fastllm_results[key]["compute_ceiling"] = ceiling
        else:
            try:
                baselines["hf_continuous_batching"][key] = run_hf_continuous_batching(model, requests)
            except Exception as error:  # recorded, not hidden: the baseline's failure is a result too
                baselines["hf_continuous_batching"][key] = {"error": f"{type(error).__name__}: {error}"[:300]}
        print(provider, key, fastllm_results[key] if ours else baselines["hf_continuous_batching"][key], flush=True)
        del model
        torch._dynamo.reset()  # the HF baseline's compiled state; an optimized model frees itself
        gc.collect()
        torch.cuda.empty_cache()
        config = {"model": args.model, "num_requests": args.num_requests, "settings": args.settings,
                  "quantization": args.quantization,
                  "dtype": "bf16", "weights": "random, seed 0", "w4": w4}
        # After every run: a call cut short at the device's time limit keeps what it measured.
        path = write_result(workload, torch.cuda.get_device_name(), config, fastllm_results, baselines, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
