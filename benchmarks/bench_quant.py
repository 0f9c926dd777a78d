"""W1 with quantization: batch-1 decode and TTFT of fastllm per scheme, beside fastllm bf16 in the same run.

    PYTHONPATH=. python benchmarks/bench_quant.py [--model llama31_8b] [--schemes fp8 int8 int4] [--pdl-variants on off]
                                                  [--kernel-settings int4_reduce_kernel ...]
                                                  [--pass-variants fp8_input_quant int4_act_fusion] [--out DIR]

Each scheme runs as `fastllm.optimize(model, quantization=scheme)` on a fresh random-weight model (seed 0), measured
as bench_decode.py measures W1 (128-token prompt, greedy, 256 new tokens). Roofline: bytes a decode step must read
(every weight the step multiplies by, in its stored format, scales included; the LM head stays bf16) over the
device-to-device copy bandwidth measured in the same run. Writes DIR/W1-quant-<gpu>-<yyyymmdd>.json (W1-fp8-... when
one scheme is asked for) with fastllm bf16 under baselines.fastllm_bf16.<model>; exits 2 without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import sys
import unittest.mock

import torch
from _common import copy_bandwidth_gb_s, forget_launch_settings, missing_gpu, write_result
from bench_decode import MODELS, _build, measure, pdl, step_bytes

# --pdl-variants: PDL forced on for every launch (FASTLLM_PDL=1), or off (FASTLLM_PDL=0), and each one's key suffix
PDL_VARIANTS = {"on": ("1", "_pdl"), "off": ("0", "_no_pdl")}
# --kernel-settings: kernel paths other than the default (module, flag, value), each run (bf16 and every scheme) with
# the flag set so, keys suffixed _<name>. int4_reduce_kernel: the int4 decode kernel's K splits summed by the separate
# reduce kernel (the default before 2026-11-30's measurement). int4_fp32_loop: the int4 decode kernel's one- and
# two-row loop in fp32, not packed bf16x2 (the default before 2026-11-30's measurement). int4_chunk<G>: the packed
# loop's chunks of G groups of each row (quant_linear.INT4_CHUNK_GROUPS; 1: the kernel before 2026-12-01's).
# int4_programs<P>: the one-row loop's K splits aiming at P programs an SM (quant_linear.INT4_ONE_ROW_PROGRAMS_PER_SM;
# 2 the default before 2026-12-02's measurement). skinny_programs<P>: the skinny GEMM's (bf16, FP8, int8 decode GEMVs)
# K splits aiming at P programs an SM, not skinny_gemm._PROGRAMS_PER_SM's 2 (bf16 rerun under it).
# Settings named int4_* change int4 layers only: bf16 is not rerun for them (the default bf16 run is their baseline).
KERNEL_SETTINGS = {
    "int4_reduce_kernel": ("fastllm.kernels.quant_linear", "REDUCE_SPLITS_IN_KERNEL", False),
    "fused_decode_rotary": ("fastllm.kernels.paged_attention", "FUSE_ROTARY_INTO_DECODE", True),
    "int4_fp32_loop": ("fastllm.kernels.quant_linear", "INT4_PACKED_BF16", False),
    **{f"int4_chunk{g}": ("fastllm.kernels.quant_linear", "INT4_CHUNK_GROUPS", g) for g in (1, 2, 8)},
    **{f"int4_programs{p}": ("fastllm.kernels.quant_linear", "INT4_ONE_ROW_PROGRAMS_PER_SM", p)
       for p in (1, 2, 8)},
    **{f"skinny_programs{p}": ("fastllm.kernels.skinny_gemm", "_PROGRAMS_PER_SM", p) for p in (4, 8)},
}


@contextlib.contextmanager
def kernel_setting(name: str | None):
    """KERNEL_SETTINGS[name]'s flag set for what runs inside (None: nothing changes); as it was afterwards."""
    if name is None:
        yield
        return
    module_name, flag, value = KERNEL_SETTINGS[name]
    module = importlib.import_module(module_name)  # the module (fastllm.kernels exports functions by these names)
    forget_launch_settings()  # launch settings cached under the other setting (their keys do not hold every flag)
    try:
        with unittest.mock.patch.object(module, flag, value):
            yield
    finally:
        forget_launch_settings()


def run(name: str, scheme: str | None, new_tokens: int, copy_gb_s: float, pdl_setting: str | None = None,
        setting: str | None = None, extra_pass: str | None = None) -> dict:
    """pdl_setting: FASTLLM_PDL's value for this run ("1", "0"), None: as configured; setting: a KERNEL_SETTINGS
    name, or None; extra_pass: an opt-in pass run besides the default passes, or None."""
    import fastllm

    model = _build(name)
    nbytes = step_bytes(model, scheme)  # before optimize(): it lets go of the float weights it quantized
    passes = {"passes": (*fastllm.DEFAULT_PASSES, extra_pass)} if extra_pass else {}
    with pdl(pdl_setting), kernel_setting(setting):
        fastllm.optimize(model, max_num_seqs=8, quantization=scheme, **passes)
        result = measure(model, new_tokens, model.config.vocab_size)
    roofline = copy_gb_s * 1e9 / nbytes
    result.update(step_gb=nbytes / 1e9, roofline_tok_s=roofline, fraction_of_roofline=result["decode_tok_s"]
                  / roofline, quantized_layers=len(fastllm.explain(model).graph.quantized_layers))
    del model
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama31_8b", choices=list(MODELS))
    parser.add_argument("--schemes", nargs="+", default=["fp8", "int8", "int4"], choices=["fp8", "int8", "int4"])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--pdl-variants", nargs="*", default=[], choices=list(PDL_VARIANTS),
                        help="also run bf16 and every scheme with programmatic dependent launch on for every launch "
                             "(on: <model>_<scheme>_pdl beside baselines.fastllm_bf16_pdl) or off (off: _no_pdl)")
    parser.add_argument("--kernel-settings", nargs="*", default=[], choices=list(KERNEL_SETTINGS),
                        help="also run bf16 and every scheme with each opt-in kernel path on (keys _<name>)")
    parser.add_argument("--pass-variants", nargs="*", default=[], choices=["fp8_input_quant", "int4_act_fusion"],
                        help="also run every scheme with this opt-in pass besides the defaults (keys _<pass>; bf16 "
                             "is not rerun: these passes change quantized layers only)")
    args = parser.parse_args(argv)
    if missing_gpu(__file__):
        return 2
    from triton.testing import do_bench

    copy_gb_s = copy_bandwidth_gb_s(do_bench)
    bf16 = run(args.model, None, args.new_tokens, copy_gb_s)
    baselines = {"fastllm_bf16": {args.model: bf16}}
    ours = {}
    config = {"model": args.model, "prompt": 128, "new_tokens": args.new_tokens, "weights": "random, seed 0",
              "copy_gb_s": copy_gb_s, "max_num_seqs": 8}
    print(f"bf16: {bf16['decode_tok_s']:.1f} tok/s ({bf16['fraction_of_roofline']:.2f} of roofline)", flush=True)
    workload = f"W1-{args.schemes[0]}" if len(args.schemes) == 1 else "W1-quant"  # the W1-fp8 file
    variants = [(None, "", None, None), *((*PDL_VARIANTS[v], None, None) for v in args.pdl_variants),
                *((None, f"_{name}", name, None) for name in args.kernel_settings),
                *((None, f"_{name}", None, name) for name in args.pass_variants)]
    default_bf16 = bf16
    for pdl_setting, suffix, setting, extra_pass in variants:
        bf16 = default_bf16  # a pass variant compares with the default bf16 run
        if suffix and not extra_pass and not (setting or "").startswith("int4_"):
            bf16 = run(args.model, None, args.new_tokens, copy_gb_s, pdl_setting, setting)
            baselines[f"fastllm_bf16{suffix}"] = {args.model: bf16}
            print(f"bf16{suffix}: {bf16['decode_tok_s']:.1f} tok/s", flush=True)
        for scheme in args.schemes:
            r = run(args.model, scheme, args.new_tokens, copy_gb_s, pdl_setting, setting, extra_pass)
            r["vs_bf16"] = r["decode_tok_s"] / bf16["decode_tok_s"]
            ours[f"{args.model}_{scheme}{suffix}"] = r
            print(f"{scheme}{suffix}: {r['decode_tok_s']:.1f} tok/s = {r['vs_bf16']:.2f}x bf16, "
                  f"{r['fraction_of_roofline']:.2f} of its roofline; TTFT {r['ttft_ms_128']:.1f} / "
                  f"{r['ttft_ms_2048']:.1f} ms", flush=True)
            path = write_result(workload, torch.cuda.get_device_name(), config, ours, baselines, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
