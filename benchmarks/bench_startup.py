"""W3 start-up, A/B: `optimize()` → first token of a random-weight Llama shape, each start in a process of its own,
with layer stamping (capture/layer_stamp.py, the default) and without (FASTLLM_LAYER_STAMP=0), in one call.

    PYTHONPATH=. python benchmarks/bench_startup.py [--model llama31_8b] [--out DIR]

Starts, in this order, each in a new process: (1) without stamping, Triton's disk cache empty: a cold start as a
fresh machine sees it; (2) with stamping and (3) without, each with an empty graph cache but Triton's kernels now
on disk: the trace alone differs between them; (4) with stamping again, its graph cache kept from (2): the warm
start. `--runs` picks others (stamped_triton_cold: stamping with Triton's cache empty, the true cold start). Every
start then greedily generates 32 tokens from one seeded prompt: the tokens of all must be equal (a stamped graph
computes what the full trace does). Writes DIR/W3-<gpu>-<yyyymmdd>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from _common import missing_gpu, write_result


def timed_start(model_name: str, profile=None):
    """In a start's own process: build `model_name` (random weights), then time `optimize()` → the first token of a
    128-token prompt. `profile`: a cProfile.Profile enabled over just that span. Returns (seconds, model, prompt)."""
    import torch
    from bench_decode import _build, _prompt

    import fastllm

    model = _build(model_name)
    prompt = _prompt(128, model.config.vocab_size)
    torch.cuda.synchronize()
    start = time.perf_counter()
    if profile is not None:
        profile.enable()
    fastllm.optimize(model, max_num_seqs=8)
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    if profile is not None:
        profile.disable()
    return time.perf_counter() - start, model, prompt


START = """
import json, sys
sys.path.insert(0, {bench!r})
from bench_startup import timed_start
from fastllm.kernels import compile_ahead

seconds, model, prompt = timed_start({model!r})
tokens = model.generate(prompt, attention_mask=prompt.new_ones(prompt.shape), max_new_tokens=32, do_sample=False,
                        pad_token_id=0)[0, 128:].tolist()
state = model._fastllm_state
print(json.dumps({{"startup_s": seconds, "phases": state.startup_seconds,
                   "graph_from_cache": state.compiled.from_graph_cache,
                   "layers_stamped": state.compiled.layers_stamped, "compiled_ahead": compile_ahead.stats,
                   "tokens": tokens}}))
"""

RUNS = (  # (name, layer stamping, keep the graph cache of the run before)
    ("full_trace_triton_cold", False, False),
    ("stamped", True, False),
    ("full_trace", False, False),
    ("stamped_warm", True, True),
)
# --runs stamped_triton_cold stamped_warm: W3 as the goal reads it, a cold start with the default (stamping) on a
# machine whose Triton cache is empty, then the warm start of a second process. stamped_triton_cold_serial: the same
# cold start with FASTLLM_COMPILE_AHEAD=0 (each kernel compiled when the forward reaches it; kernels/compile_ahead.py).
EXTRA_RUNS = {"stamped_triton_cold": True, "stamped_triton_cold_serial": True}
# A start whose name has "triton_cold" gets an empty Triton cache of its own, which the starts after it then share.


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama31_8b")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--runs", nargs="+", default=[name for name, *_ in RUNS],
                        choices=[*(name for name, *_ in RUNS), *EXTRA_RUNS], help="which starts, in this order")
    args = parser.parse_args(argv)
    settings = {name: (stamp, keep) for name, stamp, keep in RUNS} | {n: (s, False) for n, s in EXTRA_RUNS.items()}
    runs = [(name, *settings[name]) for name in args.runs]
    if missing_gpu(__file__):
        return 2
    import torch

    scratch = pathlib.Path(tempfile.mkdtemp(prefix="fastllm-startup-"))
    bench = str(pathlib.Path(__file__).resolve().parent)
    results: dict[str, dict] = {}
    graphs, triton = scratch / "graphs-0", scratch / "triton"
    for i, (name, stamp, keep_graphs) in enumerate(runs):
        if not keep_graphs:
            graphs = scratch / f"graphs-{i}"
        if "triton_cold" in name:
            triton = scratch / f"triton-{i}"
        env = {**os.environ, "FASTLLM_LAYER_STAMP": "1" if stamp else "0", "FASTLLM_GRAPH_CACHE_DIR": str(graphs),
               "TRITON_CACHE_DIR": str(triton), "FASTLLM_COMPILE_AHEAD": "0" if name.endswith("_serial") else "1"}
        done = subprocess.run([sys.executable, "-c", START.format(bench=bench, model=args.model)], env=env,
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return 1
        key = name if name not in results else f"{name}#{i + 1}"  # a start asked for twice (A/B/A/B)
        results[key] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{key}: {results[key]['startup_s']:.2f} s {results[key]['phases']} {results[key]['compiled_ahead']}",
              flush=True)
    tokens = {name: r.pop("tokens") for name, r in results.items()}
    same = len({tuple(t) for t in tokens.values()}) == 1
    path = write_result("W3", torch.cuda.get_device_name(),
                        {"model": args.model, "weights": "random, seed 0", "runs": args.runs,
                         "greedy_tokens_equal": same}, results, {}, args.out)
    print(f"\n{path.name}\n| start | layers stamped | graph from cache | seconds | capture s |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['layers_stamped']} | {r['graph_from_cache']} | {r['startup_s']:.2f} | "
              f"{r['phases'].get('capture', 0.0):.2f} |")
    print(f"greedy tokens of the {len(runs)} starts equal: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
