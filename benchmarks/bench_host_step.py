"""Host time per engine step: what the Python around the model costs at hundreds of sequences (W2's decode steps).

    PYTHONPATH=. python benchmarks/bench_host_step.py [--seqs 64 256 512 1024] [--out DIR]

On an H200, W2's profile (benchmarks/profile_throughput.py) showed the host spending ~20 ms a step in scheduling,
step inputs and sampling launches at 512 sequences, against 10-15 ms of GPU work for a decode step of that size:
the GPU waits on the host. This measures that host work on any machine: `fastllm.LLM` on a tiny random Llama with
the model's forward replaced by a stub that returns zero logits (the engine, scheduler, step inputs, sampler and
bookkeeping all run as they do on a GPU; only the model's arithmetic is gone). Greedy requests of 128 prompt tokens,
64 new tokens each, `max_num_seqs` = the sequence count, asynchronous scheduling (the default).

Per configuration: milliseconds per step of each phase (EngineCore.step_seconds: schedule, execute = step inputs
and the stub, sample = reading the previous step's tokens and their bookkeeping, update = this step's sampling
launch), per step overall, per sequence per step, and the garbage collector's pauses (ms a step, by generation,
from gc.callbacks). Three configurations run in the same process, the baselines beside the default: "fast" (the
default), "per_row" (every row's RowContext and per-row Python, the code before the plain-rows fast path) and
"heap_unfrozen" (the default without runtime/heap.py's freeze while stepping).

Writes DIR/host-step-<cpu>-<yyyymmdd>[-n].json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import sys
import time

import torch
from _common import unused_path

HERE = pathlib.Path(__file__).parent
VOCAB = 64  # small: the stub's logits and their argmax cost next to nothing on a CPU (a GPU does them on the device)


def _tiny_llm(num_seqs: int):
    import transformers as T

    import fastllm

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=512)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    llm = fastllm.LLM(model, max_num_seqs=num_seqs, max_num_batched_tokens=max(8192, num_seqs),
                      num_kv_tokens=num_seqs * 256)
    logits = torch.zeros(1, max(8192, num_seqs), VOCAB)
    llm.core.runner._forward = lambda buffers: logits[:, :buffers.logits_indices.shape[0]]  # the stub
    return llm


CONFIGS = {"fast": ("fast", True), "per_row": ("per_row", True), "heap_unfrozen": ("fast", False)}


class _GcPauses:
    """Seconds the cyclic collector ran, by generation, while installed (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            gen = info["generation"]
            self.seconds[gen] = self.seconds.get(gen, 0.0) + time.perf_counter() - self._start

    def __enter__(self) -> _GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)


def measure(num_seqs: int, sampler_path: str, new_tokens: int = 64, heap_freeze: bool = True) -> dict:
    import fastllm
    from fastllm.runtime import engine_core, heap

    llm = _tiny_llm(num_seqs)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (128,), generator=generator).tolist() for _ in range(num_seqs)]
    params = fastllm.SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine_core.PLAIN_ROWS_FAST_PATH = sampler_path == "fast"
    heap.FREEZE_WHILE_STEPPING = heap_freeze
    try:
        llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
        core = llm.core
        core.step_seconds = dict.fromkeys(core.step_seconds, 0.0)
        steps_before = core.num_steps
        with _GcPauses() as pauses:
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - start
    finally:
        engine_core.PLAIN_ROWS_FAST_PATH = True
        heap.FREEZE_WHILE_STEPPING = True
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
    steps = core.num_steps - steps_before
    phases = {phase: 1e3 * seconds / steps for phase, seconds in core.step_seconds.items()}
    llm.close()
    gc_ms = {f"gen{gen}": 1e3 * seconds / steps for gen, seconds in sorted(pauses.seconds.items())}
    return {"steps": steps, "ms_per_step": 1e3 * wall / steps, "phase_ms_per_step": phases,
            "us_per_sequence_step": 1e6 * wall / steps / num_seqs, "gc_ms_per_step": gc_ms}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[64, 256, 512, 1024])
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    results = {}
    for num_seqs in args.seqs:
        for name, (path, heap_freeze) in CONFIGS.items():
            r = results.setdefault(name, {})[f"seqs_{num_seqs}"] = measure(num_seqs, path, heap_freeze=heap_freeze)
            phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phase_ms_per_step"].items())
            gc_ms = ", ".join(f"{k} {v:.2f}" for k, v in r["gc_ms_per_step"].items())
            print(f"{num_seqs:4d} seqs, {name:13s}: {r['ms_per_step']:6.2f} ms a step ({phases}; gc {gc_ms}); "
                  f"{r['us_per_sequence_step']:.1f} us a sequence-step", flush=True)
    cpu = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = unused_path(out / f"host-step-cpu-{datetime.date.today():%Y%m%d}.json")
    config = {"vocab": VOCAB, "prompt": 128, "new_tokens": 64, "greedy": True, "model": "stub forward (zero logits)"}
    path.write_text(json.dumps({"workload": "host-step", "gpu": cpu, "torch": torch.__version__, "triton": None,
                                "transformers": None, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                                "config": config, "fastllm": results["fast"],
                                "baselines": {name: results[name] for name in CONFIGS if name != "fast"}},
                               indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
