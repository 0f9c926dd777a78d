"""W5-quant-gemv: the quantized decode linears (fp8 / int8 / int4 weights) beside the bf16 skinny GEMM and cuBLAS.

Llama-3.1-8B's decode shapes (N x K) at M = 1 and 8 rows; FP8 per output channel and in 128 x 128 blocks (a block-wise
checkpoint's layout). GB/s counts the bytes each kernel must read: the weight in its stored format with its scales, plus
x and out. Timing: `triton.testing.do_bench_cudagraph` (median, inside a CUDA graph as decode runs), cycling through
weight copies of >= 256 MB in all so no call finds its weight in L2. Every output is checked against its `_ref` (SQNR >=
28 dB, the issue's bar for FP8 GEMMs) before timing. With --sweep (1 row), the fp8/int8 skinny GEMM is also timed at
every autotune candidate of skinny_gemm.py (the heuristic was chosen for 2-byte weights), and the int4 GEMV at other
block sizes, warps and K splits. Baselines: cuBLAS bf16 and, where this torch has it, tinygemm
(`aten._weight_int4pack_mm`, torch's own int4 kernel) on the same int4 codes. The down projection at 1 row is also timed
as decode runs it with the decode_act_fusion pass (SiLU * up read inside the GEMM, `fused_linear`) beside silu_and_mul
and then the linear, per scheme, and for the one-byte weights at a few other launch settings (PROLOGUE_SWEEP).
With --prefill, the same shapes at 128, 512 and 2048 rows for block-scaled FP8 weights: the whole weight dequantized
into bf16 on each call, then cuBLAS (the default before 2026-12-02; now past BLOCK_FP8_GEMM_MAX_ROWS) beside
quant_linear.BLOCK_FP8_GEMM (the tiles dequantized in the GEMM's K loop; the default now); for int4 the dequantizing
GEMM beside the weight dequantized by a kernel, then cuBLAS; and cuBLAS bf16; and the block-scaled weight dequantized
by one kernel (BLOCK_FP8_DEQUANT_KERNEL), then cuBLAS (keys *_fp8_block128_dequant, *_fp8_block128_gemm,
*_fp8_block128_dequant_kernel, *_int4_gemm, *_int4_dequant_cublas, *_cublas_bf16; tflop_s added).

int4 runs as decode runs it, with split counters (its K splits summed in the kernel). --schemes times only the named
schemes (the activation-fusion cases need all of them).

    PYTHONPATH=. python benchmarks/bench_quant_gemv.py [--sweep] [--int4-splits 4 8 ...] [--prefill]
                                                       [--schemes int4 ...] [--rows 1 8]
                                                       [--out DIR]

Writes DIR/W5-quant-gemv-<gpu>-<yyyymmdd>.json; exits 2 without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import unittest.mock

import torch
from _common import copy_bandwidth_gb_s, missing_gpu, write_result

from fastllm.kernels import fused_linear, quant_linear, silu_and_mul, skinny_gemm
from fastllm.quant import fp8, int_weight

SHAPES = [("qkv_8b", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_8b", 28672, 4096), ("down_8b", 4096, 14336)]
ROWS = [1, 8]
WORKING_SET = 256 * 2**20
MIN_SQNR_DB = 28.0


def _sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    reference, approx = reference.float(), approx.float()
    return float(10 * torch.log10(reference.pow(2).mean() / (reference - approx).pow(2).mean()))


def _copies(tensors: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(-(-WORKING_SET // nbytes) - 1)]


def _tinygemm_int4(weight: torch.Tensor) -> tuple | None:
    """torch's own small-batch int4 GEMM (tinygemm, `aten._weight_int4pack_mm`: what gpt-fast's int4 runs) on our
    symmetric group-128 codes and scales, as (stored tensors, launcher, reference), or None where this torch or GPU
    lacks it. Its dequantization is (code - 8) * scale + zero with bf16 scales and zeros: zero 0 here."""
    packed, scales = int_weight.quantize_int4(weight, 128)
    high_first = ((packed & 15) << 4) | (packed >> 4)  # its bytes hold column 2j in the high nibble, ours in the low
    try:
        tiles = torch.ops.aten._convert_weight_to_int4pack(high_first, 8)
    except (RuntimeError, AttributeError, NotImplementedError) as error:
        print(f"tinygemm int4 not available: {error}")
        return None
    scales_and_zeros = torch.stack((scales.t(), torch.zeros_like(scales.t())), dim=-1).to(torch.bfloat16)
    return ((tiles, scales_and_zeros.contiguous()),
            lambda x, t, sz: torch.ops.aten._weight_int4pack_mm(x, t, 128, sz),
            lambda x, t, sz: quant_linear.int4_linear_ref(x, packed, scales))


def _int4_flag(flag: str, on: bool):
    """quant_linear's int4 path flag (INT4_PACKED_BF16) set to `on` for what runs inside; as it was afterwards."""
    return unittest.mock.patch.object(quant_linear, flag, on)


def _schemes(weight: torch.Tensor, names: list[str]) -> dict:
    """scheme -> (stored tensors, launcher(x, *tensors), reference(x, *tensors)) for the schemes in names; baselines'
    names in BASELINES. int4 runs as decode does: its K splits summed in the kernel with the model's counters."""
    linear = torch.nn.functional.linear
    tinygemm = _tinygemm_int4(weight) if "tinygemm_int4" in names else None
    counters = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    int4_linear = functools.partial(quant_linear.int4_linear, split_counters=counters)

    def int4_fp32(x, *tensors):  # the one- and two-row loop in fp32 (INT4_PACKED_BF16 off: the default before)
        with _int4_flag("INT4_PACKED_BF16", False):
            return int4_linear(x, *tensors)

    schemes = {
        "bf16": ((weight,), lambda x, w: skinny_gemm.skinny_linear(x, w), lambda x, w: linear(x.float(), w.float())),
        "cublas_bf16": ((weight,), linear, lambda x, w: linear(x.float(), w.float())),
        "fp8": (fp8.quantize_weight(weight), quant_linear.fp8_linear, quant_linear.fp8_linear_ref),
        # a block-wise FP8 checkpoint's layout (DeepSeek-V3's 128 x 128 blocks), weight-only
        "fp8_block128": (fp8.quantize_blocks(weight), quant_linear.fp8_linear, quant_linear.fp8_linear_ref),
        "int8": (int_weight.quantize_int8(weight), quant_linear.int8_linear, quant_linear.int8_linear_ref),
        "int4": (int_weight.quantize_int4(weight, 128), int4_linear, quant_linear.int4_linear_ref),
        "int4_fp32": (int_weight.quantize_int4(weight, 128), int4_fp32, quant_linear.int4_linear_ref),
        **({"tinygemm_int4": tinygemm} if tinygemm else {}),
    }
    return {name: case for name, case in schemes.items() if name in names}


BASELINES = ("cublas_bf16", "tinygemm_int4")
SCHEMES = ["bf16", "cublas_bf16", "fp8", "fp8_block128", "int8", "int4", "int4_fp32", "tinygemm_int4"]
PREFILL_ROWS = [128, 512, 2048]


def _timed_case(key: str, x: torch.Tensor, n: int, tensors: tuple, launch, reference, bench) -> dict:
    """launch(x, *tensors) -> [M, n], checked against reference(x, *tensors) (the run stops below MIN_SQNR_DB), then
    timed cycling copies of the tensors; its bytes are the stored tensors plus x and the output once (2-byte rows)."""
    sqnr = _sqnr(reference(x, *tensors), launch(x, *tensors))
    if not sqnr >= MIN_SQNR_DB:
        sys.exit(f"{key}: SQNR {sqnr:.1f} dB against its reference (< {MIN_SQNR_DB}); not timing it")
    copies = itertools.cycle(_copies(tensors))
    ms = bench(lambda: launch(x, *next(copies)))
    m, k = x.shape
    nbytes = sum(t.numel() * t.element_size() for t in tensors) + 2 * m * (n + k)
    return {"ms": ms, "gb_s": nbytes / (ms * 1e-3) / 1e9, "bytes": nbytes, "sqnr_db": sqnr}


def _prefill_cases(bench, prefill_rows=PREFILL_ROWS) -> dict:
    """Past 16 rows. Block-scaled FP8 weights: the dequantized weight and cuBLAS against BLOCK_FP8_GEMM. int4: the
    GEMM dequantizing W's tiles in its K loop against the weight dequantized by a kernel and multiplied by cuBLAS
    (int4_linear's choice by INT4_DEQUANT_MIN_ROWS). cuBLAS bf16 beside."""
    linear = torch.nn.functional.linear
    results = {}
    for (name, n, k), m in itertools.product(SHAPES, prefill_rows):
        weight = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        blocks = fp8.quantize_blocks(weight)
        int4 = int_weight.quantize_int4(weight, 128)

        def block_fp8(x, q, s, in_kernel, dequantize_kernel=False):
            with unittest.mock.patch.object(quant_linear, "BLOCK_FP8_GEMM", in_kernel), \
                    unittest.mock.patch.object(quant_linear, "BLOCK_FP8_DEQUANT_KERNEL", dequantize_kernel):
                return quant_linear.fp8_linear(x, q, s)

        def int4_dequant_cublas(x, packed, scales):
            return linear(x, quant_linear._int4_dequantize(packed, scales, None, x.dtype))

        fp8_ref = quant_linear.fp8_linear_ref
        variants = {
            "fp8_block128_dequant": (blocks, functools.partial(block_fp8, in_kernel=False), fp8_ref),
            "fp8_block128_gemm": (blocks, functools.partial(block_fp8, in_kernel=True), fp8_ref),
            "fp8_block128_dequant_kernel": (blocks, functools.partial(block_fp8, in_kernel=False,
                                                                      dequantize_kernel=True), fp8_ref),
            "int4_gemm": (int4, lambda x, p, s: quant_linear._int4_gemm(x, p, s, None, None),
                          quant_linear.int4_linear_ref),
            "int4_dequant_cublas": (int4, int4_dequant_cublas, quant_linear.int4_linear_ref),
            "cublas_bf16": ((weight,), linear, lambda x, w: linear(x.float(), w.float())),
        }
        for variant, (tensors, launch, reference) in variants.items():
            key = f"{name}_{n}x{k}_m{m}_{variant}"
            results[key] = _timed_case(key, x, n, tensors, launch, reference, bench)
            results[key]["tflop_s"] = 2 * m * n * k / (results[key]["ms"] * 1e-3) / 1e12
        del weight, blocks, int4
        torch.cuda.empty_cache()
    return results


def _sweep_skinny(x, tensors, bench) -> list[dict]:
    """The fp8/int8 skinny GEMM at every autotune candidate and a few more one-byte tiles, each checked against the
    reference first; weight copies cycled as in the main timing (the first sweep,
    W5-quant-gemv-nvidia-h200-20261130.json, reused one weight, which L2 held: it overstated the small shapes)."""
    m, k = x.shape
    n = tensors[0].shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    expected = quant_linear.fp8_linear_ref(x, *tensors) if tensors[0].dtype == fp8.FP8 else \
        quant_linear.int8_linear_ref(x, *tensors)
    copies = itertools.cycle(_copies(tensors))
    results = []
    for cfg in skinny_gemm._candidates(m, k, x.dtype) + [
        {**skinny_gemm._tile(m, k, x.dtype, bn, bk, w, s), "split_k": sk}
        for (bn, bk, w, s), sk in itertools.product([(8, 1024, 4, 3), (8, 1024, 8, 3), (16, 512, 4, 3),
                                                     (16, 1024, 8, 3), (8, 2048, 8, 2)], (1, 2))
        if m <= 4
    ]:
        num_splits, _ = skinny_gemm._split(k, cfg["BLOCK_K"], cfg["split_k"])
        ws = torch.empty(max(1, num_splits * m * n), dtype=torch.float32, device=x.device)
        skinny_gemm._launch(x, *tensors[:1], None, out, ws, cfg, weight_scale=tensors[1])
        if not _sqnr(expected, out) >= MIN_SQNR_DB:
            print(f"sweep: {cfg} off from the reference; not timed")
            continue

        def launch(cfg=cfg, ws=ws):
            w, scale = next(copies)
            skinny_gemm._launch(x, w, None, out, ws, cfg, weight_scale=scale)

        ms = bench(launch)
        results.append({**cfg, "ms": ms, "gb_s": (tensors[0].numel() + 4 * n) / (ms * 1e-3) / 1e9})
    return sorted(results, key=lambda r: r["ms"])[:5]


def _sweep_int4(x, tensors, launch, bench, splits=None, chunk_groups=None) -> list[dict]:
    """The int4 GEMV's packed bf16x2 loop (one row) at other block sizes, warps, pipeline stages and K splits than
    `_int4_config`'s, each checked first. (The fp32 loop's sweep: W5-quant-gemv-...-int4-mantissa-sweep.json and
    -int4packed-sweep.json; the dot form at one row, reading bytes or words, measured no faster than the fp32 loop:
    -int4next.json.) More splits and warps an SM put more bytes in flight and hide more latency; more registers a
    thread (wider blocks) fit fewer programs an SM. chunk_groups: instead, chunks of that many groups of each row
    (quant_linear.INT4_CHUNK_GROUPS) at 8 and 16 KB a chunk, 4 and 8 warps, 2, 4 and 8 K splits; at 3-16 rows (the
    dot form, INT4_DOT_CHUNK_GROUPS) that many groups an iteration at the default's block and warps, its K splits,
    half and twice as many."""
    m, k = x.shape
    n = tensors[0].shape[0]
    group = k // tensors[1].shape[1]
    expected = quant_linear.int4_linear_ref(x, *tensors)
    copies = itertools.cycle(_copies(tensors))
    packed = m <= 2
    default = quant_linear._int4_config(m, n, k, group, x.device, packed_bf16=packed)
    key = (m, n, k, group, x.device, packed, default["CHUNK_GROUPS"])  # _int4_config's cache key
    form = {"USE_DOT": False, "BLOCK_M": m} if packed else {}
    results = []
    try:
        if chunk_groups and not packed:
            default_split = default["split_k"]
            grid = [(default["BLOCK_N"], default["num_warps"], default["NUM_STAGES"], split, cg)
                    for cg, split in itertools.product(chunk_groups, sorted({max(1, default_split // 2), default_split,
                                                                              2 * default_split}))]  # fmt: skip
        elif chunk_groups:
            grid = [(rows // cg, warps, 3, split, cg) for cg, rows, warps, split in
                    itertools.product(chunk_groups, (default["BLOCK_N"], 2 * default["BLOCK_N"]), (4, 8), (2, 4, 8))]
        elif splits is None:
            grid = [(*c, 1) for c in itertools.product((64, 128), (2, 4, 8), (2, 3, 4), (4, 8))]
        else:
            grid = [(default["BLOCK_N"], default["num_warps"], default["NUM_STAGES"], s, default["CHUNK_GROUPS"])
                    for s in splits]
        for block_n, warps, stages, split, cg in grid:
            cfg = {**default, **form, "BLOCK_N": block_n, "num_warps": warps, "NUM_STAGES": stages, "split_k": split,
                   "CHUNK_GROUPS": cg}  # fmt: skip
            quant_linear._INT4_CONFIGS[key] = cfg
            if not _sqnr(expected, launch(x, *tensors)) >= MIN_SQNR_DB:
                print(f"int4 sweep: {cfg} off from the reference; not timed")
                continue
            ms = bench(lambda: launch(x, *next(copies)))
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            results.append({**cfg, "INT4_PACKED_BF16": packed, "ms": ms, "gb_s": nbytes / (ms * 1e-3) / 1e9})
    finally:
        quant_linear._INT4_CONFIGS.pop(key, None)
    for r in results if splits else ():
        print(f"int4 {n}x{k} split {r['split_k']}: {r['ms'] * 1e3:.1f} us, {r['gb_s']:.0f} GB/s")
    best = min(results, key=lambda r: r["ms"], default=None)
    if best:
        print(f"int4 sweep {n}x{k}: best BLOCK_N={best['BLOCK_N']} chunk groups={best['CHUNK_GROUPS']} "
              f"warps={best['num_warps']} "
              f"stages={best['NUM_STAGES']} split={best['split_k']}: {best['ms'] * 1e3:.1f} us, "
              f"{best['gb_s']:.0f} GB/s (default {default})")
    ranked = sorted(results, key=lambda r: r["ms"])
    return ranked if splits or chunk_groups else ranked[:5]


# (BLOCK_N, BLOCK_K, num_warps) of the one-byte prologue GEMM timed beside the default (8, 1024, 4): 8 x 512 measured
# 33.0 us against 22.8 (H200, 2026-11-30); wider blocks of W spread each chunk's SiLU * up over more rows.
PROLOGUE_SWEEP = [(8, 512, 4), (16, 1024, 8), (16, 512, 4), (32, 512, 8), (32, 256, 4)]


def _act_fusion_cases(bench) -> dict:
    """down_8b at 1 row from [gate | up]: fused (the prologue inside the GEMM) against the activation kernel and then
    the linear, for bf16, fp8 and int8 weights; the one-byte ones also at the PROLOGUE_SWEEP settings."""
    _, n, k = SHAPES[3]
    weight = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
    gate_up = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)
    schemes = {"bf16": ((weight,), skinny_gemm.skinny_linear, lambda w: {}),
               "fp8": (fp8.quantize_weight(weight), quant_linear.fp8_linear, lambda w, s: {"weight_scale": s}),
               "int8": (int_weight.quantize_int8(weight), quant_linear.int8_linear, lambda w, s: {"weight_scale": s})}
    results = {}
    for scheme, (tensors, linear, extra) in schemes.items():
        expected = linear(silu_and_mul(gate_up), *tensors)
        got = fused_linear(gate_up, tensors[0], prologue="silu", **extra(*tensors))
        sqnr = _sqnr(expected, got)
        if not sqnr >= 40.0:  # the same values up to the order of the fp32 sums
            sys.exit(f"down_8b {scheme}: fused SiLU * up off from the unfused kernels (SQNR {sqnr:.1f} dB)")
        copies = itertools.cycle(_copies(tensors))
        nbytes = sum(t.numel() * t.element_size() for t in tensors) + 2 * (n + 2 * k)
        out = torch.empty(1, n, dtype=gate_up.dtype, device="cuda")
        default = skinny_gemm._config(1, n, k, gate_up.dtype, gate_up.device, weight_bytes=1, prologue=True)

        def unfused(linear=linear, copies=copies):
            return linear(silu_and_mul(gate_up), *next(copies))

        def fused(extra=extra, copies=copies):
            w, *scale = next(copies)
            return fused_linear(gate_up, w, prologue="silu", **extra(w, *scale))

        def fused_with(cfg, copies=copies, out=out):  # one-byte weights: the launch settings forced
            def launch():
                w, scale = next(copies)
                skinny_gemm._launch(gate_up, w, None, out, None, cfg, weight_scale=scale, prologue="silu")
            return launch

        cases = {"unfused": unfused, "fused": fused}
        if scheme != "bf16":  # more rows of W a program share each chunk's SiLU * up (accumulators <= 64 a thread)
            for block_n, block_k, warps in PROLOGUE_SWEEP:
                cfg = {**default, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps,
                       "split_k": skinny_gemm._split_k(n, k, block_n, gate_up.device)}
                check = torch.empty_like(out)
                skinny_gemm._launch(gate_up, tensors[0], None, check, None, cfg, weight_scale=tensors[1],
                                    prologue="silu")
                if not _sqnr(expected, check) >= 40.0:
                    sys.exit(f"down_8b {scheme} at {cfg}: off from the unfused kernels; not timing it")
                cases[f"fused_bn{block_n}_bk{block_k}_w{warps}"] = fused_with(cfg)
        for case, launch in cases.items():
            ms = bench(launch)
            results[f"down_8b_{n}x{k}_m1_silu_{case}_{scheme}"] = {
                "ms": ms, "gb_s": nbytes / (ms * 1e-3) / 1e9, "bytes": nbytes, "sqnr_db": sqnr}
    return results


def _int4_gated_cases(bench) -> dict:
    """gate_up_8b at 1 row, int4 (group 128), as decode runs it with split counters: the linear alone, the linear and
    then silu_and_mul, and int4_linear_and_act (the opt-in int4_act_fusion pass's call: the GATED epilogue), checked
    equal first."""
    from fastllm.kernels import int4_linear_and_act

    _, n, k = SHAPES[2]
    tensors = int_weight.quantize_int4((torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16), 128)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    counters = torch.zeros(n, dtype=torch.int32, device="cuda")
    linear = functools.partial(quant_linear.int4_linear, split_counters=counters)
    gated = functools.partial(int4_linear_and_act, split_counters=counters)
    if not torch.equal(silu_and_mul(linear(x, *tensors)), gated(x, *tensors)):
        sys.exit("int4_linear_and_act differs from int4_linear then silu_and_mul; not timing it")
    copies = itertools.cycle(_copies(tensors))
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    cases = {"linear": lambda: linear(x, *next(copies)),
             "linear_then_silu": lambda: silu_and_mul(linear(x, *next(copies))),
             "gated": lambda: gated(x, *next(copies))}
    results = {}
    for case, fn in cases.items():
        ms = bench(fn)
        results[f"gate_up_8b_{n}x{k}_m1_int4_{case}"] = {"ms": ms, "gb_s": nbytes / (ms * 1e-3) / 1e9,
                                                         "bytes": nbytes, "sqnr_db": float("inf")}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--rows", nargs="+", type=int, default=ROWS, help="decode rows timed (1 to 16)")
    parser.add_argument("--prefill", action="store_true",
                        help="also block-scaled FP8 and int4 at 128, 512 and 2048 rows (or --prefill-rows)")
    parser.add_argument("--prefill-rows", nargs="+", type=int, default=PREFILL_ROWS,
                        help="the rows --prefill times (17 or more: fewer take the decode GEMV)")
    parser.add_argument("--int4-gated", action="store_true",
                        help="also int4 gate_up at 1 row: the linear, the linear then silu_and_mul, the GATED epilogue")
    parser.add_argument("--int4-splits", nargs="+", type=int, default=None,
                        help="instead of --sweep's grid for int4 at one row: the default launch settings at each of "
                             "these K split counts (all results kept)")
    parser.add_argument("--int4-chunk-groups", nargs="+", type=int, default=None,
                        help="instead of --sweep's grid for int4 at one row: chunks of these many groups of each row "
                             "(INT4_CHUNK_GROUPS) at a few block sizes, warps and K splits (two rows too, which "
                             "the default leaves at one group); at 3-16 rows, the dot form's groups an iteration "
                             "(INT4_DOT_CHUNK_GROUPS) at a few K splits")
    parser.add_argument("--schemes", nargs="+", default=SCHEMES, choices=SCHEMES,
                        help="the schemes timed (the activation-fusion cases only with all of them)")
    args = parser.parse_args()
    if missing_gpu(__file__):
        return 2
    import triton.testing

    torch.manual_seed(0)
    bench = functools.partial(triton.testing.do_bench_cudagraph, return_mode="median", rep=30)
    results, sweeps = {}, {}
    if not all(1 <= m <= 16 for m in args.rows):
        parser.error(f"--rows must be decode row counts from 1 to 16, got {args.rows}")
    if not all(m >= 17 for m in args.prefill_rows):
        parser.error(f"--prefill-rows must be 17 or more (fewer rows take the decode GEMV), got {args.prefill_rows}")
    for (name, n, k), m in itertools.product(SHAPES, args.rows):
        weight = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for scheme, (tensors, launch, reference) in _schemes(weight, args.schemes).items():
            key = f"{name}_{n}x{k}_m{m}_{scheme}"
            results[key] = _timed_case(key, x, n, tensors, launch, reference, bench)
            if args.sweep and m == 1 and scheme in ("fp8", "int8"):  # batch-1 decode's shapes
                sweeps[key] = _sweep_skinny(x, tensors, bench)
            if scheme == "int4" and (m == 1 and (args.sweep or args.int4_splits) or args.int4_chunk_groups):
                sweeps[key] = _sweep_int4(x, tensors, launch, bench, args.int4_splits, args.int4_chunk_groups)
        del weight
        torch.cuda.empty_cache()
    if args.schemes == SCHEMES:
        results.update(_act_fusion_cases(bench))
    if args.prefill:
        results.update(_prefill_cases(bench, args.prefill_rows))
    if args.int4_gated:
        results.update(_int4_gated_cases(bench))
    copy_gb_s = copy_bandwidth_gb_s(functools.partial(triton.testing.do_bench, return_mode="median"))
    gpu = torch.cuda.get_device_name()
    config = {"shapes": {name: [n, k] for name, n, k in SHAPES}, "rows": args.rows, "int4_group": 128,
              **({"prefill_rows": args.prefill_rows} if args.prefill else {}),
              "bytes": "stored weight + scales, x and out once", "timing": "do_bench_cudagraph median, rep 30, "
              f"cycling >= {WORKING_SET >> 20} MB of weight copies", "copy_gb_s": copy_gb_s}
    ours = {k: v for k, v in results.items() if not k.endswith(BASELINES)}
    baselines = {name: {k: v for k, v in results.items() if k.endswith(name)} for name in BASELINES}
    baselines["copy"] = {"gb_s": copy_gb_s}
    if sweeps:
        baselines["sweep_top5"] = sweeps
    path = write_result("W5-quant-gemv", gpu, config, ours, baselines, args.out)
    print(f"{gpu}: copy {copy_gb_s:.0f} GB/s; wrote {path}")
    print(f"{'case':<34} {'us':>8} {'GB/s':>7} {'% copy':>6} {'SQNR':>6}")
    for key, r in results.items():
        print(f"{key:<34} {r['ms'] * 1e3:>8.1f} {r['gb_s']:>7.0f} {100 * r['gb_s'] / copy_gb_s:>5.0f}% "
              f"{r['sqnr_db']:>6.1f}")
    for key, top in sweeps.items():
        best = top[0]
        print(f"sweep {key}: best USE_DOT={best['USE_DOT']} packed={best.get('INT4_PACKED_BF16', '-')} "
              f"BLOCK_N={best['BLOCK_N']} BLOCK_K={best.get('BLOCK_K', '-')} "
              f"warps={best['num_warps']} stages={best['NUM_STAGES']} split={best['split_k']}: {best['gb_s']:.0f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
