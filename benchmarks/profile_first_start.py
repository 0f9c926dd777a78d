"""W3: where a start-up's seconds go, by function (cProfile, wall clock), for starts in new processes one after the
other, each with empty Triton and graph caches (Llama-3.1-8B shape, random weights, layer stamping on).

    PYTHONPATH=. python benchmarks/profile_first_start.py [--model llama31_8b] [--out DIR] [--starts 2]

On a machine just started, the first such start took 17.6 s and the next ones 9.9-11.7 s with every cache of
fastllm and Triton as empty (W3-nvidia-h200-20261202.json, 2026-12-02): something outside those caches is cold in
the first process. This profiles `optimize()` → first token of each start and lists the functions whose cumulative
time differs most between the first start and the last. Writes DIR/profile-first-start-<model>-<yyyymmdd>.json and
prints a short table.
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

from _common import missing_gpu

START = """
import cProfile, json, pstats, sys
sys.path.insert(0, {bench!r})
from bench_startup import timed_start

profile = cProfile.Profile()
seconds, model, _ = timed_start({model!r}, profile)
stats = pstats.Stats(profile).stats
rows = {{f"{{path.rsplit('/site-packages/', 1)[-1]}}:{{line}}({{name}})": [calls, total, cumulative]
        for (path, line, name), (_, calls, total, cumulative, _) in stats.items() if cumulative > 0.05}}
print(json.dumps({{"startup_s": seconds, "phases": model._fastllm_state.startup_seconds, "functions": rows}}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama31_8b")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--starts", type=int, default=2)
    args = parser.parse_args(argv)
    if missing_gpu(__file__):
        return 2
    import torch

    scratch = pathlib.Path(tempfile.mkdtemp(prefix="fastllm-first-start-"))
    bench = str(pathlib.Path(__file__).resolve().parent)
    starts = []
    for i in range(args.starts):
        env = {**os.environ, "TRITON_CACHE_DIR": str(scratch / f"triton-{i}"),
               "FASTLLM_CACHE_DIR": str(scratch / f"fastllm-{i}")}
        done = subprocess.run([sys.executable, "-c", START.format(bench=bench, model=args.model)], env=env,
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return 1
        starts.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"start {i}: {starts[-1]['startup_s']:.2f} s (profiled) {starts[-1]['phases']}", flush=True)
    first, last = starts[0]["functions"], starts[-1]["functions"]
    differences = sorted(((first[f][2] - last.get(f, [0, 0, 0])[2], f) for f in first), reverse=True)[:60]
    slowest = sorted(((v[1], f) for f, v in first.items()), reverse=True)[:40]
    result = {
        "profile": "W3-first-start-functions",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": args.model,
        "starts": [{"startup_s": s["startup_s"], "phases": s["phases"]} for s in starts],
        "cumulative_first_minus_last": [{"function": f, "seconds": round(d, 3),
                                         "first": [round(x, 3) for x in first[f]],
                                         "last": [round(x, 3) for x in last.get(f, [0, 0, 0])]}
                                        for d, f in differences],
        "first_start_own_time": [{"function": f, "seconds": round(t, 3)} for t, f in slowest],
    }
    out = pathlib.Path(args.out) / f"profile-first-start-{args.model}-{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{out.name}\n| function (cumulative, first - last start) | s |\n|---|---|")
    for row in result["cumulative_first_minus_last"][:25]:
        print(f"| {row['function'][-90:]} | {row['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
