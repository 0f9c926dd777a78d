"""W3's profile: where `optimize()` → first token spends its seconds (cProfile, cumulative), Llama-2-7B shapes.

    PYTHONPATH=. python benchmarks/profile_startup.py [--model llama2_7b] [--out DIR]

Prints the CUDA-graph capture time and the 30 functions with the most cumulative time; writes
DIR/profile-startup-<model>.txt. cProfile slows Python-heavy phases (dynamo tracing) more than GPU-bound ones:
read the ranking, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pathlib
import pstats
import sys
import time

from _common import missing_gpu
from bench_decode import _build, _startup_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama2_7b")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if missing_gpu(__file__):
        return 2
    model = _build(args.model)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    _startup_s(model)
    profiler.disable()
    total = time.perf_counter() - start
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(30)
    runner = model._fastllm_state.core.runner
    head = f"startup under cProfile {total:.1f} s; CUDA graph capture {runner.startup_seconds['cuda_graphs']:.1f} s\n"
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile-startup-{args.model}.txt").write_text(head + stream.getvalue())
    print(head + "\n".join(line[:160] for line in stream.getvalue().splitlines()[:60]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
