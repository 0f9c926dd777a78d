"""W1 (single-stream decode, TTFT) and W3 (start-up) on random-weight Llama shapes, beside HF baselines.

    PYTHONPATH=. python benchmarks/bench_decode.py [--models llama2_7b llama31_8b] \
        [--providers hf_eager hf_static_compile fastllm] [--new-tokens 256] [--out DIR]

Per BENCHMARKS.md: seeded random prompt of 128 tokens, greedy, EOS ignored; decode tok/s =
(new - 1) / (t(generate new) - t(generate 1)); TTFT = t(generate 1) at prompts of 128 and 2048 tokens (median
of 3 after a warm-up). For the HF baselines "generate 1" is a `new`-token generate stopped after one token, so
the static cache has one shape and compiles once. W3 start-up = seconds from `fastllm.optimize()` to the first
token: cold in the benchmark's process (an emptied graph cache, so dynamo traces; Triton compiles unless its disk
cache is warm), warm in a second process started afterwards (`--warm-startup MODEL`: the graph cache and Triton's
disk cache now hold the model's graph and every kernel). Each start records its phases (`startup_phases_*`:
capture = trace or cached graph + passes + first forward, kv_cache, cuda_graphs) and whether the graph came from
the cache. Only the first fastllm provider of a model starts truly cold: later ones find its graph.
Writes DIR/W1-<gpu>-<yyyymmdd>.json; exits 2 without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import torch
from _common import copy_bandwidth_gb_s, latest_result_path, missing_gpu, write_result

MODELS = {
    "llama2_7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama31_8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
}
# fastllm_sync: async_scheduling=False; gptfast: gpt-fast's own model file, run by ../shared/anchors/gptfast_decode.py
# (BSD, not part of fastllm) from the folder --anchors names, in its own process.
# fastllm_decode_fusion: fastllm with the opt-in decode_fusion pass (norms, activations and residual adds inside the
# decode GEMMs); fastllm_no_act_fusion: without the default decode_act_fusion (SiLU * up inside down_proj);
# fastllm_no_rope_table: without the default rope_table (rotary cos/sin computed in every step, not read from a table);
# fastllm_two_row: a lone sequence's decode step padded to 2 rows, as before the 1-row decode graph became the default
# (FASTLLM_ONE_ROW_DECODE=0, model_runner.ONE_ROW_DECODE); fastllm_autotune: FASTLLM_SKINNY_AUTOTUNE=1 with an empty
# tuning cache (its start-up includes the tuning; the tuned settings are recorded); each beside the default in the
# same call; fastllm_pdl: programmatic dependent launch on for every launch (FASTLLM_PDL=1: kernels/_registry.py; the
# default: steps of at most 16 rows); fastllm_no_pdl: off (FASTLLM_PDL=0); fastllm_pdl_no_act_fusion: PDL on and
# without decode_act_fusion; fastllm_combine_kernel: decode attention's splits merged by the separate combine kernel
# (paged_attention.COMBINE_IN_DECODE_KERNEL = False) instead of inside the decode kernel; fastllm_fused_decode_rotary:
# decode steps' rotary and KV write inside the decode attention kernel (paged_attention.FUSE_ROTARY_INTO_DECODE);
# fastllm_torch_argmax: greedy tokens by torch.argmax instead of kernels/argmax.py (argmax.MAX_ROWS = 0).
OPT_IN_PASSES = {"fastllm_decode_fusion": "decode_fusion"}
LEFT_OUT_PASSES = {"fastllm_no_act_fusion": "decode_act_fusion", "fastllm_pdl_no_act_fusion": "decode_act_fusion",
                   "fastllm_no_rope_table": "rope_table"}
PROVIDERS = ("hf_eager", "hf_static_compile", "fastllm", "fastllm_sync", *OPT_IN_PASSES, *LEFT_OUT_PASSES,
             "fastllm_two_row", "fastllm_autotune", "fastllm_pdl", "fastllm_no_pdl", "fastllm_combine_kernel",
             "fastllm_fused_decode_rotary", "fastllm_torch_argmax", "gptfast")


def _build(name: str, device: str = "cuda"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**MODELS[name], eos_token_id=None, bos_token_id=None, pad_token_id=0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def step_bytes(model, scheme: str | None, group_size: int = 128) -> int:
    """Bytes a decode step reads: each weight as stored with its scales (fp8 and int8 one byte an element and 4 an
    output channel; int4 half a byte and 4 a group); the LM head in the model's dtype (excluded by default)."""
    head = model.get_output_embeddings().weight
    total = head.numel() * head.element_size()
    for name, p in model.named_parameters():
        if p.dim() != 2 or "embed" in name or p is head:
            continue
        n, k = p.shape
        if scheme in ("fp8", "int8"):
            total += n * k + 4 * n
        elif scheme == "int4":
            total += n * k // 2 + 4 * n * (k // group_size)
        else:
            total += p.numel() * p.element_size()
    return total


def _prompt(length: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(length)
    return torch.randint(1, vocab, (1, length), generator=g).cuda()


class _StopAfter:
    """A stopping criterion: stop once `n` new tokens exist. HF's static cache is sized by max_new_tokens, so
    t(generate 1) is measured with the same max_new_tokens as t(generate new) and stopped here instead;
    otherwise every different length is a new cache shape and a recompilation inside the timing."""

    def __init__(self, prompt_len: int, n: int):
        self.end = prompt_len + n

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.end, dtype=torch.bool,
                          device=input_ids.device)


def _timed_generate(model, ids, new, *, stop_after=None, **kwargs) -> float:
    if stop_after is not None:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopAfter(ids.shape[1], stop_after)])
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0, **kwargs)
    torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + (stop_after or new), out.shape
    return time.perf_counter() - start


def measure(model, new_tokens: int, vocab: int, same_cache_shape: bool = False, **kwargs) -> dict:
    """W1 timings. same_cache_shape: time 1-token runs as `new_tokens` runs stopped after one token."""
    ids128, ids2048 = _prompt(128, vocab), _prompt(2048, vocab)
    one = dict(kwargs, stop_after=1) if same_cache_shape else kwargs
    new_one = new_tokens if same_cache_shape else 1
    first = _timed_generate(model, ids128, new_tokens, **kwargs)  # warm-up (compiles, for the compiled ones)
    t1 = statistics.median(_timed_generate(model, ids128, new_one, **one) for _ in range(3))
    tn = statistics.median(_timed_generate(model, ids128, new_tokens, **kwargs) for _ in range(2))
    _timed_generate(model, ids2048, new_one, **one)
    t2048 = statistics.median(_timed_generate(model, ids2048, new_one, **one) for _ in range(3))
    return {"decode_tok_s": (new_tokens - 1) / (tn - t1), "ttft_ms_128": 1e3 * t1, "ttft_ms_2048": 1e3 * t2048,
            "first_call_s": first}


# The graph cache (fastllm/capture/graph_cache.py) of the benchmark's processes: emptied by the cold run, read by
# the warm one.
GRAPH_CACHE = pathlib.Path("/tmp/fastllm-bench-graph-cache")


def _startup_s(model, **options) -> tuple[float, dict]:
    """(seconds from optimize() to the first token, the runner's start-up phases and graph-cache use)."""
    import fastllm

    torch.cuda.synchronize()
    start = time.perf_counter()
    fastllm.optimize(model, max_num_seqs=8, **options)
    _timed_generate(model, _prompt(128, model.config.vocab_size), 1)
    seconds = time.perf_counter() - start
    state = model._fastllm_state
    return seconds, {**state.startup_seconds, "graph_from_cache": state.compiled.from_graph_cache,
                     "layers_stamped": state.compiled.layers_stamped}


def _record_warm_startup(name: str, out_dir: str) -> None:
    """W3 warm: optimize() to first token in this process, run after the benchmark's (so every Triton kernel is in
    the disk cache), added to today's W1 result file as fastllm[name]["startup_s_warm"]."""
    import json

    startup, phases = _startup_s(_build(name))
    print(f"fastllm {name} startup warm {startup:.2f} s {phases}", flush=True)
    path = latest_result_path("W1", torch.cuda.get_device_name(), out_dir)
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run the benchmark (cold start) first, in another process")
    result = json.loads(path.read_text())
    result["fastllm"].setdefault(name, {}).update(startup_s_warm=startup, startup_phases_warm=phases)
    path.write_text(json.dumps(result, indent=2) + "\n")


def run_gptfast(name: str, anchors: pathlib.Path) -> dict:
    """W1 of gpt-fast (compiled with inductor and CUDA graphs) in a process of its own: its JSON line, with
    decode_tok_s, compile_s, ttft_ms_128."""
    import json
    import subprocess

    script = anchors / "gptfast_decode.py"
    if not script.exists():
        raise SystemExit(f"{script} not found: copy ../shared/anchors/ into the working tree and pass --anchors")
    done = subprocess.run([sys.executable, str(script), "--shape", name], capture_output=True, text=True,
                          timeout=900, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_provider(provider: str, name: str, new_tokens: int, anchors: pathlib.Path | None = None) -> dict:
    if provider == "gptfast":
        return run_gptfast(name, anchors)
    model = _build(name)
    vocab = model.config.vocab_size
    if provider == "hf_eager":
        return measure(model, new_tokens, vocab, same_cache_shape=True)
    if provider == "hf_static_compile":
        return measure(model, new_tokens, vocab, same_cache_shape=True, cache_implementation="static")
    import fastllm

    async_scheduling = provider != "fastllm_sync"
    options = {"async_scheduling": async_scheduling}
    if provider in OPT_IN_PASSES:
        options["passes"] = (*fastllm.DEFAULT_PASSES, OPT_IN_PASSES[provider])
    if provider in LEFT_OUT_PASSES:
        options["passes"] = tuple(p for p in fastllm.DEFAULT_PASSES if p != LEFT_OUT_PASSES[provider])
    from fastllm.runtime import model_runner

    paged_attention = importlib.import_module("fastllm.kernels.paged_attention")  # the module (the package exports
    # the function under its name)

    default_one_row = model_runner.ONE_ROW_DECODE
    model_runner.ONE_ROW_DECODE = default_one_row and provider != "fastllm_two_row"
    default_merge = paged_attention.COMBINE_IN_DECODE_KERNEL
    paged_attention.COMBINE_IN_DECODE_KERNEL = default_merge and provider != "fastllm_combine_kernel"
    default_fusion = paged_attention.FUSE_ROTARY_INTO_DECODE
    paged_attention.FUSE_ROTARY_INTO_DECODE = default_fusion or provider == "fastllm_fused_decode_rotary"
    argmax = importlib.import_module("fastllm.kernels.argmax")
    default_argmax_rows = argmax.MAX_ROWS
    argmax.MAX_ROWS = 0 if provider == "fastllm_torch_argmax" else default_argmax_rows
    try:
        pdl_setting = "1" if provider.startswith("fastllm_pdl") else "0" if provider == "fastllm_no_pdl" else None
        with _autotuning(provider == "fastllm_autotune") as tuned, pdl(pdl_setting):
            startup, phases = _startup_s(model, **options)
            result = measure(model, new_tokens, vocab)
    finally:
        model_runner.ONE_ROW_DECODE = default_one_row
        paged_attention.COMBINE_IN_DECODE_KERNEL = default_merge
        paged_attention.FUSE_ROTARY_INTO_DECODE = default_fusion
        argmax.MAX_ROWS = default_argmax_rows
    report = fastllm.explain(model)
    result.update(startup_s_cold=startup, startup_phases_cold=phases, async_scheduling=async_scheduling,
                  matches=report.matches, unfused=report.unfused_ops)
    if tuned:
        result["skinny_gemm_tuned"] = tuned
    return result


@contextlib.contextmanager
def pdl(setting: str | None):
    """Programmatic dependent launch as FASTLLM_PDL=setting would have it ("1" every launch, "0" none) for what runs
    inside, None: as configured; as it was afterwards."""
    from fastllm.kernels import _registry

    saved = _registry._PDL_SETTING
    _registry._PDL_SETTING = saved if setting is None else setting
    try:
        yield
    finally:
        _registry._PDL_SETTING = saved


@contextlib.contextmanager
def _autotuning(enabled: bool):
    """With `enabled`: skinny_gemm's autotuner on, its disk cache in a fresh folder (nothing tuned before), and
    afterwards forgotten again, so the providers after this one run the heuristic; yields the tuned settings."""
    from fastllm.kernels import skinny_gemm

    tuned: dict[str, dict] = {}
    if not enabled:
        yield tuned
        return
    saved = os.environ.get("FASTLLM_CACHE_DIR")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["FASTLLM_CACHE_DIR"] = folder
        skinny_gemm.AUTOTUNE = True
        try:
            yield tuned
        finally:
            tuned.update({",".join(map(str, key[:3])): cfg for key, cfg in skinny_gemm._TUNED.items()})
            skinny_gemm.AUTOTUNE = False
            skinny_gemm._TUNED.clear()
            skinny_gemm._ON_DISK._entries.clear()
            if saved is None:
                os.environ.pop("FASTLLM_CACHE_DIR")
            else:
                os.environ["FASTLLM_CACHE_DIR"] = saved


def _write(results: dict, args) -> pathlib.Path:
    config = {"prompt": 128, "new_tokens": args.new_tokens, "dtype": "bf16", "weights": "random, seed 0",
              "max_num_seqs": 8, "copy_gb_s": args.copy_gb_s}
    return write_result("W1", torch.cuda.get_device_name(), config, *_split(results), args.out)


def _split(results: dict) -> tuple[dict, dict]:
    """(fastllm's results, the baselines'): fastllm_sync's runs join fastllm's as <model>_sync."""
    ours = {**results.get("fastllm", {}), **{f"{m}_sync": r for m, r in results.get("fastllm_sync", {}).items()}}
    return ours, {k: v for k, v in results.items() if k not in ("fastllm", "fastllm_sync")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS[:3]), choices=PROVIDERS)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--anchors", type=pathlib.Path, default=pathlib.Path(".anchors"),
                        help="folder holding gptfast_decode.py and gpt-fast's model file (the gptfast provider)")
    parser.add_argument("--warm-startup", metavar="MODEL", choices=list(MODELS),
                        help="measure W3 warm start of MODEL in this process, add it to today's result, exit")
    args = parser.parse_args(argv)
    os.environ["FASTLLM_GRAPH_CACHE_DIR"] = str(GRAPH_CACHE)
    if args.warm_startup:
        _record_warm_startup(args.warm_startup, args.out)
        return 0
    if missing_gpu(__file__):
        return 2
    shutil.rmtree(GRAPH_CACHE, ignore_errors=True)  # a cold start traces
    from triton.testing import do_bench

    args.copy_gb_s = copy_bandwidth_gb_s(functools.partial(do_bench, return_mode="median"))
    results: dict[str, dict[str, dict]] = {p: {} for p in args.providers}  # fastllm_sync lands in "fastllm"
    for name in args.models:
        # The copy roofline: a decode step reads every weight once (bf16), at the copy bandwidth measured above.
        roofline = args.copy_gb_s * 1e9 / step_bytes(_build(name, device="meta"), None)
        for provider in args.providers:
            result = run_provider(provider, name, args.new_tokens, args.anchors)
            result.update(roofline_tok_s=roofline, fraction_of_roofline=result["decode_tok_s"] / roofline)
            results[provider][name] = result
            print(provider, name, {k: round(v, 2) for k, v in results[provider][name].items()
                                   if isinstance(v, float)}, flush=True)
            torch._dynamo.reset()  # dynamo's caches hold compiled models (and fastllm's KV cache) otherwise
            gc.collect()
            torch.cuda.empty_cache()
            path = _write(results, args)  # after every run: a call cut short keeps what it measured
    ours, baselines = _split(results)
    out = {"fastllm": ours, "baselines": baselines}
    print(f"copy bandwidth {args.copy_gb_s:.0f} GB/s")
    print(f"{'provider':<18} {'model':<11} {'decode tok/s':>12} {'roofline':>8} {'TTFT128 ms':>10} {'TTFT2048 ms':>11}")
    for provider, per_model in [("fastllm", out["fastllm"]), *out["baselines"].items()]:
        for name, r in per_model.items():
            print(f"{provider:<18} {name:<11} {r['decode_tok_s']:>12.1f} {r['fraction_of_roofline']:>8.1%} "
                  f"{r.get('ttft_ms_128', 0):>10.1f} {r.get('ttft_ms_2048', 0):>11.1f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
