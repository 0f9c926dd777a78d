"""A/B of a batch-1 decode step's CUDA-graph replay time with and without one pass, or with kernel settings other
than the defaults (W1's model, random weights): the graph alone, no host, so differences of ~0.1% show that W1's
tok/s (±1% between runs) cannot.

    PYTHONPATH=. python benchmarks/replay_ab.py [--model llama31_8b] [--without rope_table] [--rounds 3] [--out DIR]
    PYTHONPATH=. python benchmarks/replay_ab.py --without '' --setting \
        tiles4=fastllm.kernels.paged_attention._MIN_TILES_PER_SPLIT=4 [--setting NAME=MODULE.ATTR=VALUE,...] \
        [--setting NAME=+decode_fusion,MODULE.ATTR=VALUE] [--prompt 256]

Each round optimizes the same model with the default passes, then without the one named, then once per --setting
variant with its module attributes set (several joined by commas; values are Python literals; set before optimize()
captures, restored after release; a '+PASS' item adds an opt-in pass to that variant), and times 5 x 40 replays of
the decode graph (median) after a prompt of --prompt tokens and 8 generated.
Writes DIR/W1-replay-ab-<gpu>-<yyyymmdd>.json.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import statistics
import sys

import torch
from _common import forget_launch_settings, missing_gpu, write_result
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


def parse_setting(text: str) -> tuple[str, list[tuple[str, str, object]], tuple[str, ...]]:
    """'NAME=mod.ATTR=VALUE[,mod.ATTR=VALUE...][,+PASS...]' -> (NAME, [(module, attribute, value)], (PASS, ...)): a
    '+PASS' item adds an opt-in pass to the variant's passes."""
    name, _, assignments = text.partition("=")
    if not name or not assignments:
        raise ValueError(f"--setting wants NAME=module.ATTR=VALUE[,...], got {text!r}")
    parsed, passes = [], []
    for assignment in assignments.split(","):
        if assignment.startswith("+"):
            passes.append(assignment[1:])
            continue
        target, _, value = assignment.partition("=")
        module, _, attribute = target.rpartition(".")
        if not module or not value:
            raise ValueError(f"--setting {name}: {assignment!r} is not module.ATTR=VALUE")
        parsed.append((module, attribute, ast.literal_eval(value)))
    return name, parsed, tuple(passes)


@contextlib.contextmanager
def applied(assignments: list[tuple[str, str, object]]):
    """The module attributes set for the block, then restored (an attribute that does not exist is an error); the
    kernels' cached launch settings forgotten on both sides, so that settings they derive from take effect."""
    saved = []
    try:
        for module_name, attribute, value in assignments:
            module = importlib.import_module(module_name)
            saved.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, value)
        if assignments:
            forget_launch_settings()
        yield
    finally:
        for module, attribute, value in reversed(saved):
            setattr(module, attribute, value)
        if assignments:
            forget_launch_settings()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama31_8b")
    parser.add_argument("--without", default="rope_table")
    parser.add_argument("--setting", action="append", default=[], help="NAME=module.ATTR=VALUE[,...]: a variant")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens before the 8 generated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if missing_gpu(__file__):
        return 2
    import fastllm

    model = _build(args.model)
    ids = _prompt(args.prompt, model.config.vocab_size)
    variants = {"default": (fastllm.DEFAULT_PASSES, [])}
    if args.without:
        variants[f"without_{args.without}"] = (tuple(p for p in fastllm.DEFAULT_PASSES if p != args.without), [])
    for text in args.setting:
        name, assignments, extra_passes = parse_setting(text)
        variants[name] = ((*fastllm.DEFAULT_PASSES, *extra_passes), assignments)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (passes, assignments) in variants.items():
            with applied(assignments):
                fastllm.optimize(model, max_num_seqs=8, passes=passes)
                _timed_generate(model, ids, 8)
                runner = model._fastllm_state.core.runner
                times[name].append(_replay_ms(runner._graphs[("decode", runner.buckets[0])].graph))
                print(f"{name:<24} replay {times[name][-1] * 1e3:8.1f} us", flush=True)  # kept if the call is cut
                fastllm.release(model)
    result = {name: {"replay_ms": statistics.median(t), "replay_ms_rounds": t} for name, t in times.items()}
    config = {"model": args.model, "without": args.without, "rounds": args.rounds, "prompt": args.prompt,
              "settings": {name: [f"{m}.{a}={v!r}" for m, a, v in assignments]
                           + [f"+{p}" for p in passes if p not in fastllm.DEFAULT_PASSES]
                           for name, (passes, assignments) in variants.items() if name != "default"},
              "timing": "median of 5 x 40 replays of the batch-1 decode graph, per round; rounds alternate"}
    path = write_result("W1-replay-ab", torch.cuda.get_device_name(), config, {args.model: result}, {}, args.out)
    for name, r in result.items():
        rounds = [round(t * 1e3, 1) for t in r["replay_ms_rounds"]]
        print(f"{name:<24} replay {r['replay_ms'] * 1e3:8.1f} us  rounds {rounds}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
