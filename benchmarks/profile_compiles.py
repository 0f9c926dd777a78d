"""W3's Triton share: how many kernels a cold start compiles, how long each takes, and whether threads compile
them in parallel (Llama-3.1-8B shape, random weights, a fresh Triton cache and no graph cache).

    PYTHONPATH=. python benchmarks/profile_compiles.py [--model llama31_8b] [--out DIR] [--threads 8]

Times every `triton.compiler.compile` call of `optimize()` → first token (the seconds since start each began, and
the start-up phase it fell in), then compiles the same sources again into two more fresh caches: one after the
other, and from a thread pool (what a parallel warm-up would do: Triton's AsyncCompileMode runs compiles on an
executor). Writes DIR/profile-compiles-<model>.json and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from _common import missing_gpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama31_8b")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="fastllm-compiles-"))
    os.environ["TRITON_CACHE_DIR"] = str(scratch / "triton-cold")  # before anything imports triton
    os.environ["FASTLLM_CACHE_DIR"] = str(scratch / "fastllm")  # no saved graph: a cold capture
    if missing_gpu(__file__):
        return 2
    import torch
    import triton
    import triton.compiler
    from bench_decode import _build, _startup_s

    records: list[dict] = []
    original = triton.compiler.compile
    start = time.perf_counter()

    def timed_compile(src, target=None, options=None, _env_vars=None):
        began = time.perf_counter()
        kernel = original(src, target=target, options=options, _env_vars=_env_vars)
        records.append({"kernel": getattr(getattr(src, "fn", None), "__name__", str(src)), "began_s": began - start,
                        "seconds": time.perf_counter() - began, "_call": (src, target, options)})
        return kernel

    # A JITFunction binds `triton.compiler.compile` when it first launches, so patch before any launch.
    triton.compiler.compile = timed_compile
    model = _build(args.model)
    startup, phases = _startup_s(model)
    calls = [r.pop("_call") for r in records]
    compile_s = sum(r["seconds"] for r in records)
    print(f"cold start {startup:.2f} s, {len(records)} compiles, {compile_s:.2f} s compiling; phases {phases}",
          flush=True)

    def recompile(cache: str, threads: int) -> float:
        triton.knobs.cache.dir = str(scratch / cache)
        began = time.perf_counter()
        if threads <= 1:
            for src, target, options in calls:
                original(src, target=target, options=options)
        else:
            with ThreadPoolExecutor(threads) as pool:
                futures = [pool.submit(original, src, target=target, options=options) for src, target, options in calls]
            for future in futures:
                future.result()
        return time.perf_counter() - began

    serial_s = recompile("triton-serial", 1)
    threaded_s = recompile("triton-threads", args.threads)
    by_kernel: dict[str, list[float]] = {}
    for r in records:
        by_kernel.setdefault(r["kernel"], []).append(r["seconds"])
    result = {
        "profile": "W3-compiles", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": args.model,
        "startup_s_cold": startup, "startup_phases_cold": phases, "num_compiles": len(records),
        "compile_s": compile_s, "recompile_serial_s": serial_s, "recompile_threads_s": threaded_s,
        "threads": args.threads, "compiles": records,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile-compiles-{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| kernel | compiles | seconds |\n|---|---|---|")
    for name, seconds in sorted(by_kernel.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {name} | {len(seconds)} | {sum(seconds):.2f} |")
    print(f"same {len(calls)} sources again: one after the other {serial_s:.2f} s, "
          f"{args.threads} threads {threaded_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
