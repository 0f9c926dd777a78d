"""Regenerate benchmarks/RESULTS.md from the result files in benchmarks/results/ (never edit numbers by hand).

    python benchmarks/summarize.py          # rewrites benchmarks/RESULTS.md

One section per result file, newest first: the headline numbers and the ratio to each baseline measured in the
same run. Workloads without a formatter below are listed with their file name only.
"""

from __future__ import annotations

import json
import pathlib

HERE = pathlib.Path(__file__).parent


def _w5(result: dict) -> list[str]:
    """Kernels: GB/s at the largest prefill shape (bandwidth-bound) beside torch and the copy ceiling."""
    copy = result["baselines"]["copy"]["gb_s"]
    torch_ref = result["baselines"]["torch_ref"]
    largest: dict[str, str] = {}
    for key in result["fastllm"]:
        op = key.rsplit("_", 1)[0]
        largest[op] = key  # keys are written in increasing size
    lines = [f"Device-to-device copy: {copy:.0f} GB/s (same run).", "",
             "| op | shape | fastllm GB/s | % of copy | torch GB/s | fastllm / torch |", "|---|---|---|---|---|---|"]
    for op, key in largest.items():
        ours, ref = result["fastllm"][key]["gb_s"], torch_ref[key]["gb_s"]
        shape = key.rsplit("_", 1)[1]
        lines.append(f"| {op} | {shape} | {ours:.0f} | {100 * ours / copy:.0f}% | {ref:.0f} | {ours / ref:.2f}× |")
    return lines


def _scheduling(key: str, entry: dict) -> str:
    """"async" or "sync": the step loop a fastllm entry ran. Entries record it since async scheduling became the
    default; before that a plain key was the synchronous loop and `<key>_async` the opt-in one."""
    if "async_scheduling" in entry:
        return "async" if entry["async_scheduling"] else "sync"
    return "async" if key.endswith("_async") else "sync"


def _opt_in(entry: dict) -> str:
    """", <pass>" for each decode fusion pass an entry's run matched (its recorded matches; decode_act_fusion is on by
    default since 2026-11-30, decode_fusion opt-in)."""
    return "".join(f", {name}" for name in ("decode_act_fusion", "decode_fusion") if entry.get("matches", {}).get(name))


def _w5_fused_linear(result: dict) -> list[str]:
    """A layer's decode GEMM chain, fused vs unfused, per rows of x and per prologue rows of W a program."""
    cases = result["fastllm"]
    block_ns = sorted({int(k.rsplit("block_n", 1)[1]) for r in cases.values() for k in r if "_ms_block_n" in k})
    lines = ["Microseconds a layer (CUDA-graph replays, kernel boundaries included); `bn`: the prologue's rows of W a "
             "program.", "", "| case | unfused us | " + " | ".join(f"fused bn{b} us" for b in block_ns) + " |",
             "|---|---|" + "---|" * len(block_ns)]
    for case, r in cases.items():
        lines.append(f"| {case} chain | {1e3 * r['unfused_chain_ms']:.1f} | "
                     + " | ".join(f"{1e3 * r[f'fused_chain_ms_block_n{b}']:.1f}" for b in block_ns) + " |")
        for op in ("qkv_norm", "o_residual", "gate_up_norm", "down_silu_residual"):
            lines.append(f"| {case} {op} | {1e3 * r[f'{op}_unfused_ms']:.1f} | "
                         + " | ".join(f"{1e3 * r[f'{op}_fused_ms_block_n{b}']:.1f}" for b in block_ns) + " |")
    return lines


def _other_fastllm_ratios(result: dict) -> list[str]:
    """A fastllm configuration run as a baseline (fastllm_unfused: the default beside an opt-in pass) against the
    other baselines of the same call."""
    lines = []
    baselines = result["baselines"]
    for name, per_model in baselines.items():
        if not name.startswith("fastllm"):
            continue
        for model, r in per_model.items():
            for other, theirs in baselines.items():
                if other.startswith("fastllm") or "decode_tok_s" not in theirs.get(model, {}):
                    continue
                ours, base = r["decode_tok_s"], theirs[model]["decode_tok_s"]
                lines.append(f"{name} on {model} against {other} in the same call: {ours:.1f} / {base:.1f} tok/s = "
                             f"{ours / base:.2f}×.")
    return ["", *lines] if lines else []


def _w1(result: dict) -> list[str]:
    """Decode tok/s and TTFT per model, fastllm beside each baseline of the same run (with the ratio), and W3."""
    lines = ["| model | provider | decode tok/s | copy roofline | fastllm / provider | TTFT 128 ms | TTFT 2048 ms "
             "| start-up cold s | start-up warm s |", "|---|---|---|---|---|---|---|---|---|"]
    models = list(dict.fromkeys([*result["fastllm"], *(m for per in result["baselines"].values() for m in per)]))
    footnote = False
    for model in models:
        ours = result["fastllm"].get(model)
        rows = [(f"fastllm ({_scheduling(model, ours)}{_opt_in(ours)})", ours)] if ours else []
        # fastllm with the other scheduling mode (<model>_sync; older files: <model>_async), beside the same baselines
        base_model = model.removesuffix("_async").removesuffix("_sync")
        rows += [(name, per[base_model]) for name, per in result["baselines"].items() if base_model in per]
        for name, r in rows:
            if "decode_tok_s" not in r:  # a W3-only entry
                continue
            comparable = ours and "decode_tok_s" in ours and not name.startswith("fastllm")
            ratio = f"{ours['decode_tok_s'] / r['decode_tok_s']:.2f}×" if comparable else "–"
            cold, warm = (f"{r[k]:.1f}" if k in r else "" for k in ("startup_s_cold", "startup_s_warm"))
            if cold and r.get("startup_phases_cold", {}).get("graph_from_cache"):
                cold += "†"
                footnote = True
            ttft = [f"{r[k]:.1f}" if k in r else "–" for k in ("ttft_ms_128", "ttft_ms_2048")]  # gpt-fast: 128 only
            roofline = f"{r['fraction_of_roofline']:.1%}" if "fraction_of_roofline" in r else "–"  # since 2026-11-30
            lines.append(f"| {model} | {name} | {r['decode_tok_s']:.1f} | {roofline} | {ratio} | {ttft[0]} | {ttft[1]} "
                         f"| {cold} | {warm} |")
    if footnote:
        lines += ["", "† not a cold start: the graph came from the cache an earlier fastllm run of the same process "
                  "wrote (and Triton's kernels were compiled)."]
    if "copy_gb_s" in result["config"]:
        lines += ["", f"Copy roofline: every weight read once a token at the copy bandwidth measured in the call "
                  f"({result['config']['copy_gb_s']:.0f} GB/s)."]
    lines += _other_fastllm_ratios(result)
    if not result["fastllm"]:
        lines += ["", "No fastllm entry in this file: the run stopped before writing it (a `.log` of the same name "
                  "holds what it printed)."]
    return lines


def _w2(result: dict) -> list[str]:
    """Offline throughput per workload: fastllm beside the HF continuous-batching baseline of the same run; the
    step-loop profile; W4 (KV tokens at memory fraction 0.9, peak memory)."""
    base = result["baselines"].get("hf_continuous_batching", {})
    w4 = result["config"].get("w4", {})
    lines = ["| workload | fastllm tok/s | HF CB tok/s | fastllm / HF | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
             "| GPU busy | host ms/step: schedule, launch, sample+wait, update | KV tokens | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in result["fastllm"].items():
        hf = base.get(key.removesuffix("_async").removesuffix("_sync"), {}).get("output_tok_s")
        profile = r.get("profile", {})
        host = profile.get("host_ms_per_step", {})
        host_text = ", ".join(f"{host[k]:.1f}" for k in ("schedule", "execute", "sample", "update") if k in host)
        busy = profile.get("gpu_busy_fraction_256_requests")
        hf_text, ratio = (f"{hf:.0f}", f"{r['output_tok_s'] / hf:.2f}×") if hf else ("–", "–")
        lines.append(
            f"| {key} ({_scheduling(key, r)}) | {r['output_tok_s']:.0f} | {hf_text} | {ratio} | "
            f"{r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f} | {r['tpot_ms_p50']:.1f} / {r['tpot_ms_p99']:.1f} | "
            f"{f'{busy:.2f}' if busy is not None else ''} | {host_text} | "
            f"{w4.get(key, {}).get('kv_tokens', '')} | {w4.get(key, {}).get('peak_mem_gb', 0):.1f} |")
    ceilings = [(key, r["compute_ceiling"]) for key, r in result["fastllm"].items() if "compute_ceiling" in r]
    if ceilings:
        lines += ["", "Compute ceiling (same run: the workload's matmul FLOPs at the bf16 GEMM rate measured on the "
                      "model's shapes):", "",
                  "| workload | GEMM TFLOP/s | ceiling tok/s | fastllm / ceiling |", "|---|---|---|---|"]
        lines += [f"| {key} | {c['gemm_tflop_s']:.0f} | {c['ceiling_output_tok_s']:.0f} | {c['fraction']:.2f} |"
                  for key, c in ceilings]
    return lines


def _w5_attention(result: dict) -> list[str]:
    """Decode: GB/s inside CUDA graphs (how the runtime runs it); prefill: TFLOP/s; beside torch SDPA."""
    ref = result["baselines"]["torch_ref"]
    lines = [f"Device-to-device copy: {result['baselines']['copy']['gb_s']:.0f} GB/s (same run). Baseline: SDPA on a "
             "contiguous copy of the cache.", "", "| case | fastllm | SDPA | fastllm / SDPA |", "|---|---|---|---|"]
    for key, ours in result["fastllm"].items():
        unit, field = ("TFLOP/s", "tflop_s") if "tflop_s" in ours else ("GB/s", "gb_s_cudagraph")
        if "ms_cudagraph_unfused" in ours:  # a fused decode step beside its unfused kernels (no SDPA baseline)
            lines.append(f"| {key} | {ours[field]:.0f} {unit}, {1e3 * ours['ms_cudagraph']:.1f} us | unfused kernels: "
                         f"{1e3 * ours['ms_cudagraph_unfused']:.1f} us | – |")
            continue
        if ref.get(key) is None:  # no fused SDPA backend took the shape
            lines.append(f"| {key} | {ours[field]:.0f} {unit} | – | – |")
            continue
        ratio = ours[field] / ref[key][field]
        lines.append(f"| {key} | {ours[field]:.0f} {unit} | {ref[key][field]:.0f} {unit} | {ratio:.2f}× |")
    sweep = result["baselines"].get("decode_sweep")
    if sweep:
        lines += ["", "Decode kernel launch settings (--sweep; BLOCK_N / warps / stages, graph-replay us):", "",
                  "| case | default | its us | fastest | its us |", "|---|---|---|---|---|"]
        for key, found in sweep.items():
            d = found["default"]
            timed = [t for t in found["timings"] if "ms_cudagraph" in t]
            mine = next((t for t in timed if all(t[k] == d[k] for k in d)), None)
            best = timed[0] if timed else None
            name = "{BLOCK_N} / {num_warps} / {num_stages}"
            lines.append(f"| {key} | {name.format(**d)} | {1e3 * mine['ms_cudagraph']:.1f} | "
                         f"{name.format(**best)} | {1e3 * best['ms_cudagraph']:.1f} |" if mine and best else
                         f"| {key} | {name.format(**d)} | – | – | – |")
    return lines


def _w5_gemv(result: dict) -> list[str]:
    """Small-batch GEMMs inside CUDA graphs (how decode runs them), beside cuBLAS (F.linear)."""
    copy = result["baselines"]["copy"]["gb_s"]
    cublas = result["baselines"]["cublas"]
    lines = [f"Device-to-device copy: {copy:.0f} GB/s (same run).", "",
             "| case | fastllm GB/s | % of copy | cuBLAS GB/s | fastllm / cuBLAS |", "|---|---|---|---|---|"]
    for key, ours in result["fastllm"].items():
        a, b = ours["gb_s_cudagraph"], cublas[key]["gb_s_cudagraph"]
        lines.append(f"| {key} | {a:.0f} | {100 * a / copy:.0f}% | {b:.0f} | {a / b:.2f}× |")
    return lines


def _w5_quant_gemv(result: dict) -> list[str]:
    """Quantized decode linears (fp8 / int8 / int4 weights) beside bf16, cuBLAS and tinygemm int4 (newer files),
    inside CUDA graphs."""
    copy = result["config"]["copy_gb_s"]
    cases = {**result["fastllm"], **result["baselines"].get("cublas_bf16", {}),
             **result["baselines"].get("tinygemm_int4", {})}
    lines = [f"Device-to-device copy: {copy:.0f} GB/s (same run); GB/s counts the stored weight, scales, x and out.",
             "", "| case | us | GB/s | % of copy | SQNR dB vs its _ref (silu cases: vs the unfused kernels) |",
             "|---|---|---|---|---|"]
    for key in sorted(cases):
        r = cases[key]
        lines.append(f"| {key} | {1e3 * r['ms']:.1f} | {r['gb_s']:.0f} | {100 * r['gb_s'] / copy:.0f}% | "
                     f"{r['sqnr_db']:.1f} |")
    return lines


def _w2_serve(result: dict) -> list[str]:
    """W2 through the HTTP server (streaming clients) beside offline `LLM` on the same model, same run."""
    offline = result["baselines"].get("offline_llm", {})
    config = result["config"]
    lines = [f"{config.get('clients')} client processes, HTTP parser {config.get('http_parser', 'h11')}.", "",
             "| workload | served tok/s | offline tok/s | served / offline | TTFT p50 / p99 ms (served; offline) "
             "| TPOT p50 / p99 ms (served; offline) | failed |", "|---|---|---|---|---|---|---|"]
    for key, r in result["fastllm"].items():
        o = offline.get(key, {})
        lines.append(f"| {key} | {r['output_tok_s']:.0f} | {o.get('output_tok_s', 0):.0f} | "
                     f"{r['fraction_of_offline']:.2f} | {r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f}; "
                     f"{o.get('ttft_ms_p50', 0):.0f} / {o.get('ttft_ms_p99', 0):.0f} | {r['tpot_ms_p50']:.1f} / "
                     f"{r['tpot_ms_p99']:.1f}; {o.get('tpot_ms_p50', 0):.1f} / {o.get('tpot_ms_p99', 0):.1f} | "
                     f"{r['failed_requests']} |")
    return lines


def _w1_quant(result: dict) -> list[str]:
    """W1 per quantization scheme beside fastllm bf16 of the same run, each against its own bandwidth roofline."""
    config = result["config"]
    lines = [f"Device-to-device copy: {config['copy_gb_s']:.0f} GB/s (same run).", "",
             "| model | scheme | decode tok/s | vs bf16 | of its roofline | TTFT 128 / 2048 ms |",
             "|---|---|---|---|---|---|"]
    for name, per_model in result["baselines"].items():  # fastllm_bf16[_pdl[<chunks>] | _no_pdl] (--pdl-variants)
        bf16, suffix = per_model.get(config["model"]), name.removeprefix("fastllm_bf16")
        if name.startswith("fastllm_bf16") and bf16 is not None:
            lines.append(f"| {config['model']} | bf16{suffix} | {bf16['decode_tok_s']:.1f} | 1.00× | "
                         f"{bf16['fraction_of_roofline']:.2f} | {bf16['ttft_ms_128']:.1f} / "
                         f"{bf16['ttft_ms_2048']:.1f} |")
    for key, r in result["fastllm"].items():
        scheme = key.removeprefix(config["model"] + "_")
        lines.append(f"| {config['model']} | {scheme} | {r['decode_tok_s']:.1f} | {r['vs_bf16']:.2f}× | "
                     f"{r['fraction_of_roofline']:.2f} | {r['ttft_ms_128']:.1f} / {r['ttft_ms_2048']:.1f} |")
    return lines


def _host_step(result: dict) -> list[str]:
    """Host milliseconds per engine step (stub model): the default beside the baselines of the same run (the per-row
    sampler; older files: only that one), with the collector's pauses where recorded."""
    lines = ["Host time per engine step, model forward stubbed (benchmarks/bench_host_step.py); greedy rows.", "",
             "| sequences | configuration | ms / step | schedule | execute | sample | update | us / sequence-step | "
             "gc ms / step |", "|---|---|---|---|---|---|---|---|---|"]
    configs = {"fast (default)": result["fastllm"], **result["baselines"]}
    for name, per_seqs in configs.items():
        for key, r in per_seqs.items():
            phases = r["phase_ms_per_step"]
            gc_ms = sum(r["gc_ms_per_step"].values()) if "gc_ms_per_step" in r else None
            lines.append(f"| {key.removeprefix('seqs_')} | {name} | {r['ms_per_step']:.2f} | "
                         f"{phases['schedule']:.2f} | {phases['execute']:.2f} | {phases['sample']:.2f} | "
                         f"{phases['update']:.2f} | {r['us_per_sequence_step']:.1f} | "
                         f"{'–' if gc_ms is None else f'{gc_ms:.2f}'} |")
    return lines


def _w1_replay_ab(result: dict) -> list[str]:
    """replay_ab.py: the decode graph's replay time with and without one pass, rounds alternating."""
    lines = ["| model | variant | replay us (median) | rounds us |", "|---|---|---|---|"]
    for model, variants in result["fastllm"].items():
        for name, r in variants.items():
            rounds = ", ".join(f"{t * 1e3:.1f}" for t in r["replay_ms_rounds"])
            lines.append(f"| {model} | {name} | {r['replay_ms'] * 1e3:.1f} | {rounds} |")
    return lines


def _median(values) -> float:
    values = sorted(values) if isinstance(values, list) else [values]
    return values[len(values) // 2]


def _w5_deferred_norm(result: dict) -> list[str]:
    """bench_deferred_norm.py: a layer's decode GEMMs with the norms deferred into their consumers against the default
    chain, microseconds a layer (medians of the rounds), and the consumers alone at 4 / 8 / 16 rows of W a program."""
    lines = ["| model | default chain | deferred (4 / 8 / 16 rows) | qkv: norm + GEMV, deferred 4 / 8 / 16, GEMV alone "
             "| gate-up: norm + GEMV, deferred 4 / 8 / 16 | o, o + residual |", "|---|---|---|---|---|---|"]
    folded = []
    for model, r in result["fastllm"].items():
        if "qkv_default_us" not in r:
            continue  # an earlier file's layout (its log has the numbers)

        def us(key):
            return f"{_median(r[key]):.1f}" if key in r else "–"

        lines.append(
            f"| {model} | {us('default_chain_us')} | {us('deferred_chain_us')} / {us('deferred_chain_block_n8_us')} / "
            f"{us('deferred_chain_block_n16_us')} | {us('qkv_default_us')}, {us('qkv_deferred_us')} / "
            f"{us('qkv_deferred_block_n8_us')} / {us('qkv_deferred_block_n16_us')}, {us('qkv_plain_us')} | "
            f"{us('gate_up_default_us')}, {us('gate_up_deferred_us')} / {us('gate_up_deferred_block_n8_us')} / "
            f"{us('gate_up_deferred_block_n16_us')} | {us('o_plain_us')}, {us('o_residual_us')} |")
        if "folded_chain_us" in r:
            folded.append(
                f"| {model} | {us('folded_chain_us')} / {us('folded_chain_block_n8_us')} / "
                f"{us('folded_chain_block_n16_us')} | {us('qkv_folded_us')} / {us('qkv_folded_block_n8_us')} / "
                f"{us('qkv_folded_block_n16_us')} | {us('gate_up_folded_us')} / {us('gate_up_folded_block_n8_us')} / "
                f"{us('gate_up_folded_block_n16_us')} |")
    if folded:
        lines += ["", "Norm weights folded into W (`rms_scale_deferred`), 4 / 8 / 16 rows of W a program:", "",
                  "| model | folded chain | qkv | gate-up |", "|---|---|---|---|", *folded]
    return [*lines, "", "Microseconds a layer, CUDA-graph replays (kernel boundaries included)."]


def _w5_act_down(result: dict) -> list[str]:
    """bench_act_down.py: the gate-up GEMV + down projection (SiLU * up in its loads) under each launch setting."""
    lines = ["| model | variant | pair us (median) | rounds us |", "|---|---|---|---|"]
    for model, r in result["fastllm"].items():
        for name, value in sorted(r["pair_us"].items(), key=lambda item: item[1]):
            rounds = ", ".join(f"{t:.1f}" for t in r["rounds_us"][name])
            marker = " (default)" if name == r["default"] else ""
            lines.append(f"| {model} | {name}{marker} | {value:.1f} | {rounds} |")
    return [*lines, "", "Microseconds a layer, CUDA-graph replays over two layers' weights; `unfused`: the activation "
            "kernel between the GEMVs."]


def _w3(result: dict) -> list[str]:
    """bench_startup.py: optimize() → first token, each start in its own process, in the order run."""
    lines = ["| start | layers stamped | graph from cache | seconds | capture s | kv_cache s |",
             "|---|---|---|---|---|---|"]
    for name, r in result["fastllm"].items():
        phases = r["phases"]
        lines.append(f"| {name} | {r['layers_stamped']} | {r['graph_from_cache']} | {r['startup_s']:.2f} | "
                     f"{phases.get('capture', 0.0):.2f} | {phases.get('kv_cache', 0.0):.2f} |")
    equal = result["config"].get("greedy_tokens_equal")
    return [*lines, "", f"Greedy tokens (32) of every start equal: {equal}. Model: {result['config']['model']}."]


FORMATTERS = {"W5": _w5, "W3": _w3, "W1": _w1, "W5-fused-linear": _w5_fused_linear,
              "W2": _w2, "W2-serve": _w2_serve,
              "W5-attention": _w5_attention, "W5-gemv": _w5_gemv, "W5-quant-gemv": _w5_quant_gemv,
              "W1-quant": _w1_quant, "W1-fp8": _w1_quant, "W1-int8": _w1_quant,
              "W1-int4": _w1_quant, "W2-fp8": _w2, "W2-int8": _w2, "W2-int4": _w2,
              "W2-fp8_kv": _w2, "host-step": _host_step, "W1-replay-ab": _w1_replay_ab,
              "W5-deferred-norm": _w5_deferred_norm, "W5-act-down": _w5_act_down}


def summarize(results_dir: pathlib.Path = HERE / "results") -> str:
    out = ["# Benchmark results", "",
           "Generated by `benchmarks/summarize.py` from the JSON files in `benchmarks/results/`; each file was",
           "written by a benchmark script on a GPU, its baselines measured in the same run.", ""]
    results = {path: json.loads(path.read_text()) for path in results_dir.glob("*.json")}
    profiles = sorted(p.name for p, r in results.items() if "workload" not in r)
    files = sorted((p for p, r in results.items() if "workload" in r), key=lambda p: results[p]["date"], reverse=True)
    for path in files:
        result = results[path]
        out.append(f"## {result['workload']}: {result['gpu']}, {result['date'][:10]} (`{path.name}`)")
        out.append(f"torch {result.get('torch')}, triton {result.get('triton')}, "
                   f"transformers {result.get('transformers')}.")
        out.append("")
        formatter = FORMATTERS.get(result["workload"])
        if formatter is not None:
            out += formatter(result)
        out.append("")
    others = profiles + sorted(p.name for p in results_dir.iterdir() if p.suffix in (".txt", ".log"))
    if others:
        out += ["## Profiles and logs", "", *(f"- `{name}`" for name in others), ""]
    return "\n".join(out)


if __name__ == "__main__":
    (HERE / "RESULTS.md").write_text(summarize())
    print((HERE / "RESULTS.md").read_text())
