"""W5-deferred-norm: a Llama layer's batch-1 decode GEMMs with the RMSNorms deferred into the GEMMs that read them
(`fused_linear(..., prologue="rms_norm_deferred")`, the residual adds in the producing GEMMs' epilogues) against what
the default passes run now (a norm kernel with the residual add before the QKV and gate-up GEMMs, SiLU * up read by
the down projection), on one CUDA GPU, inside CUDA graphs.

Per layer, default: fused_add_rms_norm, skinny_linear(qkv), skinny_linear(o), fused_add_rms_norm,
skinny_linear(gate_up), fused_linear(down, SiLU prologue). Deferred: fused_linear(qkv, deferred norm),
fused_linear(o, residual), fused_linear(gate_up, deferred norm), fused_linear(down, SiLU prologue, residual): two
kernels a layer fewer. The deferred chain runs with PDL on its norm GEMMs and without (skinny_gemm.
PDL_WITH_DEFERRED_NORM), and with 8 and 16 rows of W a program (fused_linear.DEFERRED_NORM_BLOCK_N). Both chains run
over two layers' distinct weights (far past the L2) and are timed with `triton.testing.do_bench_cudagraph` (the kernel
boundaries a decode step pays are in the time); the chains' outputs are compared first (bf16 roundings apart, not more).
Then each of the norm's consumers (QKV, gate-up) alone beside the norm kernel + GEMV it replaces, at 4 / 8 / 16 rows
of W a program, and o_proj with and without the residual add, each over both layers' weights in turn. And the same
with each norm's weight folded into its consumer's W ("rms_scale_deferred": the product reads x itself, no weight
loads a chunk): the folded chain and its consumers alone.

    PYTHONPATH=. python benchmarks/bench_deferred_norm.py [--models llama31_8b llama2_7b] [--out DIR]

Writes DIR/W5-deferred-norm-<gpu>-<yyyymmdd>.json; exits 2 without a GPU.
"""

import argparse
import importlib
import sys

import torch
from _common import missing_gpu, write_result
from bench_fused_linear import EPS, LAYERS, _layers, _ms

from fastllm.kernels import fused_add_rms_norm, fused_linear, skinny_gemm, skinny_linear

SHAPES = {"llama31_8b": (4096, 14336, 6144), "llama2_7b": (4096, 11008, 12288)}  # hidden, intermediate, QKV rows
SWEEP_BLOCK_N = (8, 16)
fused_linear_module = importlib.import_module("fastllm.kernels.fused_linear")  # the package exports the function


def default_chain(h, residual, attn, layers):
    """What the default passes run: h is the previous layer's MLP output, residual its residual stream."""
    for p in layers:
        n, residual = fused_add_rms_norm(h, residual, p["norm1"], EPS)
        qkv = skinny_linear(n, p["qkv"])
        o = skinny_linear(attn, p["o"])
        n, residual = fused_add_rms_norm(o, residual, p["norm2"], EPS)
        h = fused_linear(skinny_linear(n, p["gate_up"]), p["down"], prologue="silu")
    return h + residual, qkv


def deferred_chain(s, attn, layers):
    """The norms deferred into their consumers, the residual adds into the producers: s is h + residual."""
    for p in layers:
        qkv = fused_linear(s, p["qkv"], prologue="rms_norm_deferred", norm_weight=p["norm1"], norm_eps=EPS)
        s = fused_linear(attn, p["o"], residual=s)
        gate_up = fused_linear(s, p["gate_up"], prologue="rms_norm_deferred", norm_weight=p["norm2"], norm_eps=EPS)
        s = fused_linear(gate_up, p["down"], prologue="silu", residual=s)
    return s, qkv


def folded_chain(s, attn, layers):
    """The deferred chain with each norm's weight folded into its consumer's W ("rms_scale_deferred")."""
    for p in layers:
        qkv = fused_linear(s, p["qkv_folded"], prologue="rms_scale_deferred", norm_eps=EPS)
        s = fused_linear(attn, p["o"], residual=s)
        gate_up = fused_linear(s, p["gate_up_folded"], prologue="rms_scale_deferred", norm_eps=EPS)
        s = fused_linear(gate_up, p["down"], prologue="silu", residual=s)
    return s, qkv


def run(model: str, dtype) -> dict:
    layers = _layers(dtype, SHAPES[model])
    for p in layers:  # the norm weights folded into their consumers' columns, as a folding pass would store them
        p["qkv_folded"] = (p["qkv"].float() * p["norm1"].float()).to(dtype)
        p["gate_up_folded"] = (p["gate_up"].float() * p["norm2"].float()).to(dtype)
    hidden = SHAPES[model][0]
    g = torch.Generator("cuda").manual_seed(1)
    h, residual, attn = (torch.randn(1, hidden, generator=g, device="cuda").to(dtype) for _ in range(3))
    expected, expected_qkv = default_chain(h, residual, attn, layers)
    s = h + residual
    got, got_qkv = deferred_chain(s, attn, layers)
    folded, folded_qkv = folded_chain(s, attn, layers)
    for name, a, b in (("residual stream", got, expected), ("qkv", got_qkv, expected_qkv),
                       ("folded residual stream", folded, expected), ("folded qkv", folded_qkv, expected_qkv)):
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        if not rel < 2e-2:  # bf16 roundings of two layers' chains; a wrong kernel is O(1) off
            sys.exit(f"{model}: the deferred chain's {name} is off from the default one (relative {rel:.2e})")
    result = {}
    for round_ in range(3):  # alternating, so drift between the measurements shows
        result.setdefault("default_chain_us", []).append(_ms(lambda: default_chain(h, residual, attn, layers))
                                                          / LAYERS * 1e3)
        for pdl in (True, False):
            skinny_gemm.PDL_WITH_DEFERRED_NORM = pdl
            key = "deferred_chain_us" if pdl else "deferred_chain_no_pdl_us"
            result.setdefault(key, []).append(_ms(lambda: deferred_chain(s, attn, layers)) / LAYERS * 1e3)
        skinny_gemm.PDL_WITH_DEFERRED_NORM = True
        for block_n in SWEEP_BLOCK_N:  # more rows of W a program: the norm's work a chunk shared by more rows
            fused_linear_module.DEFERRED_NORM_BLOCK_N = block_n
            result.setdefault(f"deferred_chain_block_n{block_n}_us", []).append(
                _ms(lambda: deferred_chain(s, attn, layers)) / LAYERS * 1e3)
            result.setdefault(f"folded_chain_block_n{block_n}_us", []).append(
                _ms(lambda: folded_chain(s, attn, layers)) / LAYERS * 1e3)
        fused_linear_module.DEFERRED_NORM_BLOCK_N = None
        result.setdefault("folded_chain_us", []).append(_ms(lambda: folded_chain(s, attn, layers)) / LAYERS * 1e3)
    # Each op over both layers' weights in turn (past the L2, as in a step), per launch
    def each_layer(op):
        return lambda: [op(p) for p in layers]

    ops = {
        "qkv_plain": each_layer(lambda p: skinny_linear(s, p["qkv"])),
        "o_plain": each_layer(lambda p: skinny_linear(attn, p["o"])),
        "o_residual": each_layer(lambda p: fused_linear(attn, p["o"], residual=s)),
    }
    # The norm's two consumers, each beside the norm kernel + GEMV it replaces, at every rows-a-program setting
    for weight, norm in (("qkv", "norm1"), ("gate_up", "norm2")):
        ops[f"{weight}_default"] = each_layer(
            lambda p, weight=weight, norm=norm: skinny_linear(fused_add_rms_norm(h, residual, p[norm], EPS)[0],
                                                              p[weight]))
        ops[f"{weight}_deferred"] = each_layer(
            lambda p, weight=weight, norm=norm: fused_linear(s, p[weight], prologue="rms_norm_deferred",
                                                             norm_weight=p[norm], norm_eps=EPS))
        ops[f"{weight}_folded"] = each_layer(
            lambda p, weight=weight: fused_linear(s, p[f"{weight}_folded"], prologue="rms_scale_deferred",
                                                  norm_eps=EPS))
    for name, fn in ops.items():
        result[f"{name}_us"] = _ms(fn) * 1e3 / LAYERS
    for block_n in SWEEP_BLOCK_N:
        fused_linear_module.DEFERRED_NORM_BLOCK_N = block_n
        for weight in ("qkv", "gate_up"):
            result[f"{weight}_deferred_block_n{block_n}_us"] = _ms(ops[f"{weight}_deferred"]) * 1e3 / LAYERS
            result[f"{weight}_folded_block_n{block_n}_us"] = _ms(ops[f"{weight}_folded"]) * 1e3 / LAYERS
    fused_linear_module.DEFERRED_NORM_BLOCK_N = None
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if missing_gpu(__file__):
        return 2
    results = {model: run(model, torch.bfloat16) for model in args.models}
    config = {"rows": 1, "dtype": "bfloat16", "layers_a_chain": LAYERS, "shapes": {m: SHAPES[m] for m in args.models},
              "timing": "triton.testing.do_bench_cudagraph median, us a layer; chains in 3 alternating rounds"}
    path = write_result("W5-deferred-norm", torch.cuda.get_device_name(), config, results, {}, args.out)
    print(f"wrote {path}")
    print("| model | default chain us | deferred | deferred, no PDL | qkv default / deferred / plain | o / +res |")
    print("|---|---|---|---|---|---|")
    for model, r in results.items():
        chains = [min(r[k]) for k in ("default_chain_us", "deferred_chain_us", "deferred_chain_no_pdl_us")]
        sweep = ", ".join(f"{n} rows {min(r[f'deferred_chain_block_n{n}_us']):.1f}" for n in SWEEP_BLOCK_N)
        print(f"{model}: deferred chain with {sweep} us")
        folded = ", ".join(f"{n} rows {min(r[f'folded_chain_block_n{n}_us']):.1f}" for n in SWEEP_BLOCK_N)
        print(f"{model}: folded chain {min(r['folded_chain_us']):.1f} us (4 rows), {folded}")
        for weight in ("qkv", "gate_up"):
            rows = ", ".join(f"{n} rows {r[f'{weight}_folded_block_n{n}_us']:.1f}" for n in SWEEP_BLOCK_N)
            print(f"{model}: {weight} folded {r[f'{weight}_folded_us']:.1f} (4 rows), {rows}")
        for weight in ("qkv", "gate_up"):
            rows = ", ".join(f"{n} rows {r[f'{weight}_deferred_block_n{n}_us']:.1f}" for n in SWEEP_BLOCK_N)
            print(f"{model}: {weight} norm kernel + GEMV {r[f'{weight}_default_us']:.1f} us, deferred "
                  f"{r[f'{weight}_deferred_us']:.1f} (4 rows), {rows}")
        print(f"| {model} | {chains[0]:.1f} | {chains[1]:.1f} | {chains[2]:.1f} | {r['qkv_default_us']:.1f} / "
              f"{r['qkv_deferred_us']:.1f} / {r['qkv_plain_us']:.1f} | {r['o_plain_us']:.1f} / "
              f"{r['o_residual_us']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
