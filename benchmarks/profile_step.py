"""W1's profile: where a decode step's and a prefill's time goes (host vs GPU, per kernel) on a random-weight model.

    PYTHONPATH=. python benchmarks/profile_step.py [--model llama2_7b] [--quantization fp8] [--out DIR]

Decode: one step of `generate()` (tokens 2..N of a 128-token prompt, batch 1) against a bare replay of the
step's CUDA graph: the difference is the host's share (scheduler, inputs, sampling, the per-step sync).
Prefill: one prompt of --prefill-tokens (128), wall time against GPU busy time, and the TTFT of 7 such prompts one
by one (their spread: W1's TTFT medians moved by tens of percent between calls). With --quantization, the model is
optimized with that scheme (W1-fp8's step, kernel by kernel); --opt-in adds an opt-in pass (decode_fusion's prefill
beside the defaults'). Writes DIR/profile-<model>[-<scheme>][-<pass>].json (a later
run on the same name takes the next free -n).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
from _common import missing_gpu, unused_path
from _profile import profile_gpu
from bench_decode import _build, _prompt, _timed_generate


def _replay_ms(graph, n: int = 50) -> float:
    graph.replay()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama2_7b")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--quantization", choices=["fp8", "int8", "int4"], default=None)
    parser.add_argument("--timeline", type=int, default=0,
                        help="record this many of the replays' last kernels in order (3x as many of generate's)")
    parser.add_argument("--opt-in", action="append", default=[], metavar="PASS",
                        help="add this opt-in pass to the defaults (e.g. decode_fusion); repeatable")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if missing_gpu(__file__):
        return 2
    import fastllm

    model = _build(args.model)
    vocab = model.config.vocab_size
    passes = (*fastllm.DEFAULT_PASSES, *args.opt_in)
    fastllm.optimize(model, max_num_seqs=8, quantization=args.quantization, passes=passes)
    ids = _prompt(128, vocab)
    _timed_generate(model, ids, args.new_tokens)
    t1 = min(_timed_generate(model, ids, 1) for _ in range(3))
    tn = min(_timed_generate(model, ids, args.new_tokens) for _ in range(2))
    step_ms = 1e3 * (tn - t1) / (args.new_tokens - 1)
    runner = model._fastllm_state.core.runner
    graph = runner._graphs[("decode", runner.buckets[0])].graph
    replay_ms = _replay_ms(graph)
    decode_profile = profile_gpu(lambda: [graph.replay() for _ in range(5)], timeline=args.timeline)
    # The timeline of generate's last steps shows what runs between the graph's replays (inputs, sampling)
    generate_profile = profile_gpu(lambda: _timed_generate(model, ids, 33), timeline=3 * args.timeline)
    prefill_ids = _prompt(args.prefill_tokens, vocab)
    _timed_generate(model, prefill_ids, 1)
    ttft_each_ms = [1e3 * _timed_generate(model, prefill_ids, 1) for _ in range(7)]
    prefill_profile = profile_gpu(lambda: _timed_generate(model, prefill_ids, 1), top=20)
    result = {
        "model": args.model, "quantization": args.quantization, "opt_in_passes": args.opt_in,
        "gpu": torch.cuda.get_device_name(),
        "decode": {"generate_step_ms": step_ms, "graph_replay_ms": replay_ms,
                   "host_share_ms": step_ms - replay_ms, "tok_s": 1e3 / step_ms,
                   "replay_x5": decode_profile, "generate_33_tokens": generate_profile},
        f"prefill_{args.prefill_tokens}": {"ttft_ms": min(ttft_each_ms), "ttft_ms_each": ttft_each_ms,
                                           **prefill_profile},
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"profile-{args.model}" + (f"-{args.quantization}" if args.quantization else "") + \
        "".join(f"-{p}" for p in args.opt_in)
    unused_path(out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"decode: generate step {step_ms:.3f} ms, graph replay {replay_ms:.3f} ms "
          f"(host share {step_ms - replay_ms:.3f} ms); generate busy {generate_profile['busy_fraction']:.2f}")
    print(f"prefill {args.prefill_tokens}: TTFT {min(ttft_each_ms):.1f} ms (each: "
          f"{', '.join(f'{t:.1f}' for t in ttft_each_ms)}), GPU busy {prefill_profile['gpu_busy_ms']:.1f} ms "
          f"({prefill_profile['num_kernels']} kernels)")
    for name, (ms, calls) in decode_profile["top_kernels"].items():
        print(f"  decode x5 {ms:8.3f} ms {calls:5d}  {name}")
    for name, (ms, calls) in list(prefill_profile["top_kernels"].items())[:20]:
        print(f"  prefill   {ms:8.3f} ms {calls:5d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
