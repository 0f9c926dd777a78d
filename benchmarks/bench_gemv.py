"""W5-gemv: fastllm's skinny GEMM (`skinny_linear`) beside cuBLAS (`F.linear`) at decode shapes, on one CUDA GPU.

The linear layers of Llama-2-7B and Llama-3.1-8B (N x K: qkv, o_proj, gate_up, down, lm_head) at M = 1 and 16 rows.
GB/s = (weight + x + out bytes) / median time. Each provider is timed with `triton.testing.do_bench` (L2 flushed
between calls) and inside a CUDA graph (`do_bench_cudagraph`, no launch overhead). Both cycle through enough copies
of the weight (>= 256 MB in all) that no call finds its weight in the 50 MB L2, graph replays included. The
device-to-device copy bandwidth (1 GiB, bytes read + written) is measured in the same run as the ceiling. Every
fastllm output is checked against an fp32 F.linear of the same inputs before timing (tests/test_kernel_skinny_gemm.py
gives the tolerances).

    PYTHONPATH=. python benchmarks/bench_gemv.py [--dtype bf16] [--quick] [--sweep] [--shapes qkv_8b ...] [--out DIR]

--sweep also times every autotune candidate of fastllm/kernels/skinny_gemm.py per case and records the fastest next
to the heuristic's choice (the measured numbers stay the heuristic's). Writes DIR/W5-gemv-<gpu>-<yyyymmdd>.json
(BENCHMARKS.md, "Result files"); exits 2 without a GPU.
"""

import argparse
import functools
import itertools
import sys

import torch
from _common import copy_bandwidth_gb_s, missing_gpu, write_result

from fastllm.kernels import skinny_gemm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCES = {torch.bfloat16: 1e-2, torch.float16: 1e-3}  # relative error; the test module says why
# (name, N, K): Llama-2-7B / Llama-3.1-8B decode GEMMs.
SHAPES = [
    ("qkv_7b", 12288, 4096),
    ("qkv_8b", 6144, 4096),
    ("o_proj", 4096, 4096),
    ("gate_up_7b", 22016, 4096),
    ("gate_up_8b", 28672, 4096),
    ("down_7b", 4096, 11008),
    ("down_8b", 4096, 14336),
    ("lm_head_7b", 32000, 4096),
    ("lm_head_8b", 128256, 4096),
]
QUICK_SHAPES = ["o_proj", "gate_up_7b", "down_8b", "lm_head_8b"]
ROWS = [1, 16]
WORKING_SET = 256 * 2**20  # bytes of weight copies cycled through: 5x the H100's 50 MB L2


def _check(key, y, x, weight, dtype):
    expected = torch.nn.functional.linear(x.float(), weight.float())
    err = y.float() - expected
    rel = (err.norm() / expected.norm()).item()
    worst = (err.abs().max() / expected.abs().max()).item()
    if not rel <= TOLERANCES[dtype] or not worst <= TOLERANCES[dtype]:
        sys.exit(f"{key}: skinny_linear is off from F.linear in fp32 (relative {rel:.2e}, worst element "
                 f"{worst:.2e}); not timing it")  # fmt: skip
    return rel


def _entry(nbytes, ms, graph_ms):
    return {"gb_s": nbytes / (ms * 1e-3) / 1e9, "ms": ms, "gb_s_cudagraph": nbytes / (graph_ms * 1e-3) / 1e9,
            "ms_cudagraph": graph_ms}  # fmt: skip


def _case(name, n, k, m, dtype, bench, bench_graph, sweep):
    key = f"{name}_{n}x{k}_m{m}"
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    weight = (torch.randn(n, k, device="cuda") * k**-0.5).to(dtype)
    w_bytes = weight.numel() * weight.element_size()
    weights = [weight] + [weight.clone() for _ in range(-(-WORKING_SET // w_bytes) - 1)]
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    numel = skinny_gemm.workspace_numel(m, n, k, dtype, x.device)
    workspace = torch.empty(max(numel, 1), device="cuda", dtype=torch.float32)
    rel = _check(key, skinny_gemm.skinny_linear(x, weight, out=out, workspace=workspace), x, weight, dtype)

    ours = functools.partial(skinny_gemm.skinny_linear, x, out=out, workspace=workspace)
    theirs = functools.partial(torch.nn.functional.linear, x)
    nbytes = w_bytes + (x.numel() + out.numel()) * x.element_size()
    timings = {}
    for provider, fn in (("fastllm", ours), ("cublas", theirs)):
        it = itertools.cycle(weights)
        ms = bench(lambda fn=fn, it=it: fn(next(it)))
        graph_ms = bench_graph(lambda fn=fn, it=it: fn(next(it)))
        timings[provider] = _entry(nbytes, ms, graph_ms)
    cfg = skinny_gemm._config(m, n, k, dtype, x.device)
    num_splits, _ = skinny_gemm._split(k, cfg["BLOCK_K"], cfg["split_k"])
    timings["fastllm"].update(bytes=nbytes, relative_error=rel, weight_copies=len(weights),
                              config={**cfg, "num_splits": num_splits})  # fmt: skip
    if sweep:
        results = skinny_gemm.autotune(x, weight)
        skinny_gemm._TUNED.clear()  # keep measuring the heuristic
        heuristic = next((ms for c, ms in results if c == cfg), None)
        timings["sweep"] = {
            "best": {**results[0][0], "gb_s": nbytes / (results[0][1] * 1e-3) / 1e9},
            "heuristic_gb_s": None if heuristic is None else nbytes / (heuristic * 1e-3) / 1e9,
            "heuristic_rank": next((i for i, (c, _) in enumerate(results) if c == cfg), None),
            "top5": [{**c, "gb_s": nbytes / (ms * 1e-3) / 1e9} for c, ms in results[:5]],
            "timing": "do_bench median, warmup 5, rep 20, L2 flushed, one weight copy",
        }
    del weights
    torch.cuda.empty_cache()
    return key, timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result file")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_SHAPES)} only, shorter timing")
    parser.add_argument("--sweep", action="store_true", help="also time every autotune candidate per case")
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS,
                        help="rows of x (M); a decode step of one sequence runs 2 (the runner pads a lone row)")
    parser.add_argument("--shapes", nargs="+", choices=[name for name, _, _ in SHAPES], help="these shapes only")
    args = parser.parse_args()
    if missing_gpu(__file__):
        return 2

    import triton
    import triton.testing

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    shapes = [s for s in SHAPES if s[0] in QUICK_SHAPES] if args.quick else SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s[0] in args.shapes]
    timing = {"rep": 30} if args.quick else {}
    bench = functools.partial(triton.testing.do_bench, return_mode="median", **timing)
    bench_graph = functools.partial(triton.testing.do_bench_cudagraph, return_mode="median", **timing)

    fastllm, cublas, sweep, rows = {}, {}, {}, []
    for (name, n, k), m in itertools.product(shapes, args.rows):
        key, timings = _case(name, n, k, m, dtype, bench, bench_graph, args.sweep)
        fastllm[key], cublas[key] = timings["fastllm"], timings["cublas"]
        if "sweep" in timings:
            sweep[key] = timings["sweep"]
        rows.append((key, fastllm[key], cublas[key], sweep.get(key)))

    copy_gb_s = copy_bandwidth_gb_s(bench)

    gpu = torch.cuda.get_device_name()
    workload = "W5-gemv" if args.dtype == "bf16" else f"W5-gemv-{args.dtype}"
    config = {
        "dtype": args.dtype,
        "quick": args.quick,
        "rows": args.rows,
        "shapes": {name: [n, k] for name, n, k in shapes},
        "bytes": "weight + x + out, each once",
        "baseline": "cublas: torch.nn.functional.linear on the same inputs",
        "timing": "triton.testing.do_bench median (L2 flushed); *_cudagraph: do_bench_cudagraph median; both "
        f"cycle through weight copies of >= {WORKING_SET >> 20} MB in all",
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
    }
    path = write_result(workload, gpu, config, fastllm, {"cublas": cublas, "copy": {"gb_s": copy_gb_s}}, args.out)

    print(f"{gpu}, {args.dtype}; device-to-device copy {copy_gb_s:.0f} GB/s; wrote {path}")
    print(f"{'case':<30} {'split':>5} {'fastllm GB/s':>12} {'(graph)':>8} {'cuBLAS GB/s':>11} {'(graph)':>8} "
          f"{'ratio':>6} {'(graph)':>7} {'% copy':>6}" + (f" {'swept best':>10}" if sweep else ""))  # fmt: skip
    for key, ours, theirs, swept in rows:
        line = (f"{key:<30} {ours['config']['num_splits']:>5} {ours['gb_s']:>12.0f} {ours['gb_s_cudagraph']:>8.0f} "
                f"{theirs['gb_s']:>11.0f} {theirs['gb_s_cudagraph']:>8.0f} {ours['gb_s'] / theirs['gb_s']:>6.2f} "
                f"{ours['gb_s_cudagraph'] / theirs['gb_s_cudagraph']:>7.2f} "
                f"{100 * ours['gb_s_cudagraph'] / copy_gb_s:>5.0f}%")  # fmt: skip
        if swept:
            line += f" {swept['best']['gb_s']:>10.0f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
