"""A/B of a batch-1 decode step's CUDA-graph replay time with and without one pass (W1's model, random weights):
the graph alone, no host, so differences of ~0.1% show that W1's tok/s (±1% between runs) cannot.

    PYTHONPATH=. python benchmarks/replay_ab.py [--model llama31_8b] [--without rope_table] [--rounds 3] [--out DIR]

Each round optimizes the same model with the default passes, then without the one named (released in between),
and times 5 x 40 replays of the decode graph (median). Writes DIR/W1-replay-ab-<gpu>-<yyyymmdd>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from _common import missing_gpu, write_result
from bench_decode import _build, _prompt, _timed_generate


def _replay_ms(graph, replays: int = 40, repeats: int = 5) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama31_8b")
    parser.add_argument("--without", default="rope_table")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if missing_gpu(__file__):
        return 2
    import fastllm

    model = _build(args.model)
    ids = _prompt(128, model.config.vocab_size)
    variants = {"default": fastllm.DEFAULT_PASSES,
                f"without_{args.without}": tuple(p for p in fastllm.DEFAULT_PASSES if p != args.without)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, passes in variants.items():
            fastllm.optimize(model, max_num_seqs=8, passes=passes)
            _timed_generate(model, ids, 8)
            runner = model._fastllm_state.core.runner
            times[name].append(_replay_ms(runner._graphs[("decode", runner.buckets[0])].graph))
            fastllm.release(model)
    result = {name: {"replay_ms": statistics.median(t), "replay_ms_rounds": t} for name, t in times.items()}
    config = {"model": args.model, "without": args.without, "rounds": args.rounds,
              "timing": "median of 5 x 40 replays of the batch-1 decode graph, per round; rounds alternate"}
    path = write_result("W1-replay-ab", torch.cuda.get_device_name(), config, {args.model: result}, {}, args.out)
    for name, r in result.items():
        rounds = [round(t * 1e3, 1) for t in r["replay_ms_rounds"]]
        print(f"{name:<24} replay {r['replay_ms'] * 1e3:8.1f} us  rounds {rounds}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
