"""W5-attention: fastllm paged attention beside torch SDPA on a contiguous cache, on one CUDA GPU.

Llama-3.1-8B attention (32 query heads, 8 kv heads, head dim 128), block size 16, blocks at shuffled ids:
- decode: batch 1/32/128 x context 1k/4k/32k, and W2's decode shapes (batch 256 at context 256, 512 at 192: short
  contexts, one program a (sequence, kv head)), one query token a sequence; `_merged` cases: the splits merged inside
  the decode kernel (split_counters, what runtime steps do) instead of the combine kernel; `_rotary` cases:
  decode_attention_with_rotary beside the rotary-and-write kernel then the decode kernel. GB/s = the K/V bytes
  every sequence's context holds (read once) plus q and out, over the median time (`triton.testing.do_bench`, L2
  flushed), and
  the same inside a CUDA graph (`do_bench_cudagraph`), which removes the launch overhead that dominates at batch 1.
- prefill: one causal 2048-token prompt. TFLOP/s = 2 * S^2 * D * Hq (QK^T and PV, the causal half) / time; GB/s
  (q, k, v read and out written once) is recorded too.
The baseline (`torch_ref`) is `scaled_dot_product_attention(..., enable_gqa=True)` on a contiguous
[B, Hkv, S, D] copy of the same cache, timed the same way in the same run; the device-to-device copy bandwidth is
measured as the ceiling. Every fastllm output is checked against `paged_attention_ref` (fp32) before timing.

    PYTHONPATH=. python benchmarks/bench_attention.py [--dtype bf16] [--quick] [--sweep] [--out DIR]

--sweep also times the decode kernel's launch settings (BLOCK_N x num_warps x num_stages) at W2's decode shapes and
at batch 1 (checked against the reference first), recorded under baselines.decode_sweep with the default's time.

Writes DIR/W5-attention-<gpu>-<yyyymmdd>.json (BENCHMARKS.md, "Result files"); exits 2 without a GPU.
"""

import argparse
import functools
import sys

import torch
from _common import copy_bandwidth_gb_s, missing_gpu, write_result
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastllm.kernels import paged_attention, paged_attention_ref, rotary_and_write_kv
from fastllm.kernels.paged_attention import decode_attention_with_rotary, default_num_splits

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Correctness gate against the fp32 ref: tests/test_kernel_paged_attention.py says why.
TOLERANCES = {torch.bfloat16: 2e-2, torch.float16: 2e-3}
HQ, HKV, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16  # Llama-3.1-8B
SCALE = HEAD_DIM**-0.5


def _paged_cache(batch, ctx, dtype):
    """Random K/V for `batch` sequences of `ctx` tokens in shuffled blocks, and a contiguous [B, Hkv, ctx, D] copy."""
    num_blocks = batch * (ctx // BLOCK_SIZE)
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, HKV, HEAD_DIM, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, -1)

    def contiguous(cache):
        return cache[block_tables.long()].view(batch, ctx, HKV, HEAD_DIM).transpose(1, 2).contiguous()

    return k_cache, v_cache, block_tables, contiguous(k_cache), contiguous(v_cache)


def _sdpa(q, k, v, causal):
    # Fused backends only: the math fallback would repeat K/V for GQA (4x a 17 GB cache at batch 128 x 32k).
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(backends):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=SCALE,
                                                                enable_gqa=True)  # fmt: skip


def _time_baseline(name, fn, bench, bench_graph):
    """(ms, graph ms or None) of the SDPA baseline, or None where no fused SDPA backend takes the shape."""
    try:
        fn()
    except RuntimeError as err:
        print(f"{name}: no fused SDPA backend ({str(err).splitlines()[0]}); baseline not timed", file=sys.stderr)
        return None
    return bench(fn), bench_graph(fn) if bench_graph else None


# Sequences the reference takes at once: it gathers and upcasts their K/V (and repeats them for the query heads), which
# for all 128 sequences of 32k keys asked for 64 GiB more on an H200 (2026-12-02).
_CHECK_SEQS = 8


def _check(name, actual, q, k_cache, v_cache, meta, dtype):
    """actual against paged_attention_ref (an fp32 q; it upcasts the gathered K/V), _CHECK_SEQS sequences at a time."""
    block_tables, seq_lens, cu, max_q = meta
    tol = TOLERANCES[dtype]
    cu_host = cu.tolist()
    for first in range(0, seq_lens.shape[0], _CHECK_SEQS):
        last = min(first + _CHECK_SEQS, seq_lens.shape[0])
        rows = slice(cu_host[first], cu_host[last])
        part = (block_tables[first:last], seq_lens[first:last], cu[first:last + 1] - cu_host[first], max_q)
        expected = paged_attention_ref(q[rows].float(), k_cache, v_cache, *part, scale=SCALE)
        try:
            torch.testing.assert_close(actual[rows].float(), expected, rtol=tol, atol=tol)
        except AssertionError as err:
            sys.exit(f"{name}: fastllm output of sequences {first}-{last - 1} does not match paged_attention_ref, "
                     f"not timing it:\n{err}")


# W2 (1000 x 128/128, max_num_seqs 512): contexts of 129-256 tokens; the batch is 512 while the first wave decodes.
THROUGHPUT_DECODE = [(256, 256), (512, 192)]


def _decode(batch, ctx, dtype, bench, bench_graph, merged=False):
    k_cache, v_cache, block_tables, k, v = _paged_cache(batch, ctx, dtype)
    q = torch.randn(batch, HQ, HEAD_DIM, device="cuda", dtype=dtype)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    meta = (block_tables, seq_lens, cu, 1)
    out = torch.empty_like(q)
    counters = torch.zeros(batch * HKV, dtype=torch.int32, device="cuda") if merged else None
    ours = functools.partial(paged_attention, q, k_cache, v_cache, *meta, scale=SCALE, out=out,
                             split_counters=counters)  # fmt: skip
    q4 = q.view(batch, HQ, 1, HEAD_DIM)
    theirs = functools.partial(_sdpa, q4, k, v, False)
    _check(f"decode b{batch} ctx{ctx}", ours(), q, k_cache, v_cache, meta, dtype)
    nbytes = 2 * k_cache.numel() * k_cache.element_size() + 2 * q.numel() * q.element_size()
    timings = {"ours": (bench(ours), bench_graph(ours)),
               "theirs": _time_baseline(f"decode b{batch} ctx{ctx}", theirs, bench, bench_graph)}  # fmt: skip
    splits = default_num_splits(batch, HKV, block_tables.shape[1] * BLOCK_SIZE, q.device)
    return nbytes, timings, {"num_splits": splits}


def _decode_rotary(batch, ctx, dtype, bench, bench_graph):
    """A decode step's rotary + KV write + attention: decode_attention_with_rotary (one launch) against the kernels it
    replaces (rotary_and_write_kv, then paged_attention), both merging their splits in the kernel, in CUDA graphs.
    Recorded as the fused entry with the unfused one's time beside it (ms_cudagraph_unfused); no SDPA baseline."""
    k_cache, v_cache, block_tables, _, _ = _paged_cache(batch, ctx, dtype)
    q = torch.randn(batch, HQ, HEAD_DIM, device="cuda", dtype=dtype)
    k_new, v_new = (torch.randn(batch, HKV, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(2))
    angles = torch.randn(batch, HEAD_DIM // 2, device="cuda")
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    rows = torch.arange(batch, device="cuda")
    slots = block_tables[rows, (ctx - 1) // BLOCK_SIZE].long() * BLOCK_SIZE + (ctx - 1) % BLOCK_SIZE
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    counters = [torch.zeros(batch * HKV, dtype=torch.int32, device="cuda") for _ in range(2)]
    outs = [torch.empty_like(q) for _ in range(2)]
    fused = functools.partial(decode_attention_with_rotary, q, k_new, v_new, cos, sin, k_cache, v_cache, slots,
                              block_tables, seq_lens, cu, scale=SCALE, out=outs[0], split_counters=counters[0])

    def unfused():
        q_rot = rotary_and_write_kv(q, k_new, v_new, cos, sin, k_cache, v_cache, slots)
        return paged_attention(q_rot, k_cache, v_cache, block_tables, seq_lens, cu, 1, scale=SCALE, out=outs[1],
                               split_counters=counters[1])

    tol = TOLERANCES[dtype]
    try:
        torch.testing.assert_close(fused().float(), unfused().float(), rtol=tol, atol=tol)
    except AssertionError as err:
        sys.exit(f"decode b{batch} ctx{ctx} rotary: fused output differs from the unfused kernels', not timing:\n{err}")
    nbytes = 2 * batch * ctx * HKV * HEAD_DIM * k_cache.element_size() + 2 * q.numel() * q.element_size()
    timings = {"ours": (bench(fused), bench_graph(fused)), "theirs": None}
    return nbytes, timings, {"ms_cudagraph_unfused": bench_graph(unfused)}


def _prefill(seq, dtype, bench, bench_graph):
    k_cache, v_cache, block_tables, k, v = _paged_cache(1, seq, dtype)
    q = torch.randn(seq, HQ, HEAD_DIM, device="cuda", dtype=dtype)
    meta = (block_tables, torch.tensor([seq], dtype=torch.int32, device="cuda"),
            torch.tensor([0, seq], dtype=torch.int32, device="cuda"), seq)  # fmt: skip
    out = torch.empty_like(q)
    ours = functools.partial(paged_attention, q, k_cache, v_cache, *meta, scale=SCALE, out=out)
    theirs = functools.partial(_sdpa, q.transpose(0, 1).unsqueeze(0), k, v, True)
    _check(f"prefill {seq}", ours(), q, k_cache, v_cache, meta, dtype)
    nbytes = (2 * q.numel() + 2 * k.numel()) * q.element_size()
    flops = 2 * seq * seq * HEAD_DIM * HQ
    timings = {"ours": (bench(ours), None), "theirs": _time_baseline(f"prefill {seq}", theirs, bench, None)}
    return nbytes, timings, {"flops": flops}


# The decode kernel's launch settings --sweep times: (BLOCK_N, num_warps, num_stages).
SWEEP = [(bn, w, st) for bn in (16, 32, 64, 128) for w in (2, 4, 8) for st in (1, 2, 3)]


def _decode_sweep(dtype, bench_graph):
    """Per W2 decode shape and batch 1 at 1k: each launch setting's graph-replay time (ms), fastest first."""
    import importlib

    attention = importlib.import_module("fastllm.kernels.paged_attention")  # the module, not the function
    tile_sizes = attention._tile_sizes
    results = {}
    for batch, ctx in [*THROUGHPUT_DECODE, (1, 1024)]:
        k_cache, v_cache, block_tables, _, _ = _paged_cache(batch, ctx, dtype)
        q = torch.randn(batch, HQ, HEAD_DIM, device="cuda", dtype=dtype)
        meta = (block_tables, torch.full((batch,), ctx, dtype=torch.int32, device="cuda"),
                torch.arange(batch + 1, dtype=torch.int32, device="cuda"), 1)  # fmt: skip
        counters = torch.zeros(batch * HKV, dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        timings = []
        for block_n, warps, stages in SWEEP:
            def sized(*args, _b=block_n, _w=warps, _s=stages):
                cfg = tile_sizes(*args)
                cfg["decode"] = {**cfg["decode"], "BLOCK_N": _b, "num_warps": _w, "num_stages": _s}
                return cfg

            attention._tile_sizes = sized
            try:
                run = functools.partial(paged_attention, q, k_cache, v_cache, *meta, scale=SCALE, out=out,
                                        split_counters=counters)  # fmt: skip
                _check(f"sweep b{batch} ctx{ctx} {block_n}/{warps}/{stages}", run(), q, k_cache, v_cache, meta, dtype)
                timings.append({"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages,
                                "ms_cudagraph": bench_graph(run)})  # fmt: skip
            except Exception as err:  # a setting Triton cannot compile (shared memory, registers): recorded, skipped
                timings.append({"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages,
                                "error": str(err).splitlines()[0][:200]})  # fmt: skip
            finally:
                attention._tile_sizes = tile_sizes
        default = tile_sizes(HEAD_DIM, dtype, HQ // HKV)["decode"]
        timed = sorted((t for t in timings if "ms_cudagraph" in t), key=lambda t: t["ms_cudagraph"])
        results[f"decode_b{batch}_ctx{ctx}"] = {"default": {k: default[k] for k in ("BLOCK_N", "num_warps",
                                                                                   "num_stages")},
                                                "timings": timed + [t for t in timings if "error" in t]}
        torch.cuda.empty_cache()
    return results


def _entry(nbytes, ms, graph_ms, extra):
    entry = {"gb_s": nbytes / (ms * 1e-3) / 1e9, "ms": ms, "bytes": nbytes}
    if graph_ms is not None:
        entry.update(gb_s_cudagraph=nbytes / (graph_ms * 1e-3) / 1e9, ms_cudagraph=graph_ms)
    if "flops" in extra:
        entry["tflop_s"] = extra["flops"] / (ms * 1e-3) / 1e12
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result file")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help="batch 1 and 32 at 1k and 4k only, shorter timing")
    parser.add_argument("--sweep", action="store_true", help="also time the decode kernel's launch settings")
    args = parser.parse_args()
    if missing_gpu(__file__):
        return 2

    import triton
    import triton.testing

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    batches, contexts = ([1, 32], [1024, 4096]) if args.quick else ([1, 32, 128], [1024, 4096, 32768])
    timing = {"rep": 30} if args.quick else {}
    bench = functools.partial(triton.testing.do_bench, return_mode="median", **timing)
    bench_graph = functools.partial(triton.testing.do_bench_cudagraph, return_mode="median", **timing)

    fastllm, baseline, rows = {}, {}, []
    cases = [(f"decode_b{b}_ctx{c}", functools.partial(_decode, b, c)) for b in batches for c in contexts]
    cases += [(f"decode_b1_ctx{c}_merged", functools.partial(_decode, 1, c, merged=True)) for c in contexts]
    cases += [(f"decode_b{b}_ctx{c}", functools.partial(_decode, b, c)) for b, c in THROUGHPUT_DECODE]
    cases += [(f"decode_b{b}_ctx{c}_rotary", functools.partial(_decode_rotary, b, c))
              for b, c in [(1, 1024), *THROUGHPUT_DECODE]]
    cases.append(("prefill_2048", functools.partial(_prefill, 2048)))
    for key, case in cases:
        nbytes, timings, extra = case(dtype, bench, bench_graph)
        fastllm[key] = {**_entry(nbytes, *timings["ours"], extra), **extra}
        baseline[key] = _entry(nbytes, *timings["theirs"], extra) if timings["theirs"] else None
        rows.append((key, fastllm[key], baseline[key]))
        torch.cuda.empty_cache()

    copy_gb_s = copy_bandwidth_gb_s(bench)
    sweep = _decode_sweep(dtype, bench_graph) if args.sweep else None

    gpu = torch.cuda.get_device_name()
    workload = "W5-attention" if args.dtype == "bf16" else f"W5-attention-{args.dtype}"
    config = {
        "dtype": args.dtype,
        "quick": args.quick,
        "heads": HQ,
        "kv_heads": HKV,
        "head_dim": HEAD_DIM,
        "block_size": BLOCK_SIZE,
        "decode_batches": batches,
        "decode_contexts": contexts,
        "throughput_decode": THROUGHPUT_DECODE,
        "prefill_tokens": 2048,
        "baseline": "torch_ref: F.scaled_dot_product_attention(enable_gqa=True) on a contiguous [B, Hkv, S, D] "
        "copy of the cache (causal for prefill)",
        "bytes": "decode: K/V of every context + q + out; prefill: q, k, v read and out written once",
        "timing": "triton.testing.do_bench median; *_cudagraph: do_bench_cudagraph median",
    }
    baselines = {"torch_ref": baseline, "copy": {"gb_s": copy_gb_s}}
    if sweep is not None:
        baselines["decode_sweep"] = sweep
    path = write_result(workload, gpu, config, fastllm, baselines, args.out)

    print(f"{gpu}, {args.dtype}; device-to-device copy {copy_gb_s:.0f} GB/s; wrote {path}")
    print(f"{'case':<22} {'splits':>6} {'fastllm GB/s':>12} {'(graph)':>8} {'sdpa GB/s':>10} {'(graph)':>8} "
          f"{'fastllm ms':>10} {'sdpa ms':>8} {'TFLOP/s':>8} {'sdpa':>6}")  # fmt: skip
    for key, ours, theirs in rows:
        print(f"{key:<22} {ours.get('num_splits', ''):>6} {_fmt(ours, 'gb_s', 12)} {_fmt(ours, 'gb_s_cudagraph', 8)} "
              f"{_fmt(theirs, 'gb_s', 10)} {_fmt(theirs, 'gb_s_cudagraph', 8)} {_fmt(ours, 'ms', 10, 4)} "
              f"{_fmt(theirs, 'ms', 8, 4)} {_fmt(ours, 'tflop_s', 8)} {_fmt(theirs, 'tflop_s', 6)}")  # fmt: skip
    return 0


def _fmt(entry, key, width, digits=0):
    value = (entry or {}).get(key)
    return f"{value:>{width}.{digits}f}" if value is not None else " " * width


if __name__ == "__main__":
    sys.exit(main())
