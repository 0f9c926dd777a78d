"""W5-fused-linear: a Llama-3.1-8B layer's decode GEMMs with their neighbours fused in (`fused_linear`) against the
same work as separate kernels (the graph without the decode_fusion pass), on one CUDA GPU, inside CUDA graphs.

Per layer, unfused: fused_add_rms_norm, skinny_linear(qkv), skinny_linear(o_proj), fused_add_rms_norm,
skinny_linear(gate_up), silu_and_mul, skinny_linear(down); fused: fused_linear(qkv, norm prologue),
fused_linear(o_proj, residual), fused_linear(gate_up, norm prologue), fused_linear(down, SiLU prologue, residual).
Both chains run over two layers' distinct weights (872 MB, far past the L2) and are timed with
`triton.testing.do_bench_cudagraph` (each replay holds the whole chain: the kernel boundaries a decode step pays are
in the time). Each fused op alone beside its unfused pair is timed too, and the prologue's rows of W a program
(`skinny_gemm.PROLOGUE_BLOCK_N`) is swept. Outputs of the fused chain are checked against the unfused chain first.

    PYTHONPATH=. python benchmarks/bench_fused_linear.py [--rows 1 8] [--out DIR]

Writes DIR/W5-fused-linear-<gpu>-<yyyymmdd>.json (BENCHMARKS.md, "Result files"); exits 2 without a GPU.
"""

import argparse
import sys

import torch
from _common import missing_gpu, write_result

from fastllm.kernels import fused_add_rms_norm, fused_linear, silu_and_mul, skinny_gemm, skinny_linear

HIDDEN, INTER, QKV = 4096, 14336, 6144  # Llama-3.1-8B
EPS = 1e-5
LAYERS = 2
BLOCK_NS = (4, 8, 16, 32)


def _layers(dtype, shape=(HIDDEN, INTER, QKV)):
    """LAYERS layers' decode weights of a Llama shape (hidden, intermediate, QKV rows), random, on CUDA."""
    hidden, inter, qkv = shape
    g = torch.Generator("cuda").manual_seed(0)

    def w(n, k):
        return (torch.randn(n, k, generator=g, device="cuda") * k**-0.5).to(dtype)

    def norm():
        return (1 + 0.1 * torch.randn(hidden, generator=g, device="cuda")).to(dtype)

    return [dict(qkv=w(qkv, hidden), o=w(hidden, hidden), gate_up=w(2 * inter, hidden), down=w(hidden, inter),
                 norm1=norm(), norm2=norm()) for _ in range(LAYERS)]


def unfused_chain(h, residual, attn, layers):
    """The graph without decode_fusion: h is the previous layer's MLP output, residual its residual stream."""
    for p in layers:
        n, residual = fused_add_rms_norm(h, residual, p["norm1"], EPS)
        qkv = skinny_linear(n, p["qkv"])
        o = skinny_linear(attn, p["o"])
        n, residual = fused_add_rms_norm(o, residual, p["norm2"], EPS)
        h = skinny_linear(silu_and_mul(skinny_linear(n, p["gate_up"])), p["down"])
    return h + residual, qkv


def fused_chain(s, attn, layers):
    """The same with decode_fusion: the residual adds in the producing GEMMs, norms and SiLU in the consumers; s is
    h + residual, what the previous layer's fused down projection writes."""
    for p in layers:
        qkv = fused_linear(s, p["qkv"], prologue="rms_norm", norm_weight=p["norm1"], norm_eps=EPS)
        s = fused_linear(attn, p["o"], residual=s)
        gate_up = fused_linear(s, p["gate_up"], prologue="rms_norm", norm_weight=p["norm2"], norm_eps=EPS)
        s = fused_linear(gate_up, p["down"], prologue="silu", residual=s)
    return s, qkv


def _ms(fn):
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def _set_block_n(block_n: int) -> None:
    skinny_gemm.PROLOGUE_BLOCK_N = block_n
    skinny_gemm._HEURISTIC.clear()


def run(rows: int, dtype) -> dict:
    layers = _layers(dtype)
    g = torch.Generator("cuda").manual_seed(1)
    h, residual, attn = (torch.randn(rows, HIDDEN, generator=g, device="cuda").to(dtype) for _ in range(3))
    expected, expected_qkv = unfused_chain(h, residual, attn, layers)
    s = h + residual
    got, got_qkv = fused_chain(s, attn, layers)
    for name, a, b in (("residual stream", got, expected), ("qkv", got_qkv, expected_qkv)):
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        if not rel < 2e-2:  # bf16 roundings of two layers' chains; a wrong kernel is O(1) off
            sys.exit(f"M={rows}: the fused chain's {name} is off from the unfused one (relative {rel:.2e})")
    result = {"unfused_chain_ms": _ms(lambda: unfused_chain(h, residual, attn, layers)) / LAYERS}
    p = layers[0]
    n = fused_add_rms_norm(h, residual, p["norm1"], EPS)[0]
    gate_up = skinny_linear(n, p["gate_up"])
    ops = {
        "qkv_norm": (lambda: skinny_linear(fused_add_rms_norm(h, residual, p["norm1"], EPS)[0], p["qkv"]),
                     lambda: fused_linear(h, p["qkv"], prologue="rms_norm", norm_weight=p["norm1"], norm_eps=EPS)),
        "o_residual": (lambda: skinny_linear(attn, p["o"]), lambda: fused_linear(attn, p["o"], residual=residual)),
        "gate_up_norm": (lambda: skinny_linear(fused_add_rms_norm(h, residual, p["norm2"], EPS)[0], p["gate_up"]),
                         lambda: fused_linear(h, p["gate_up"], prologue="rms_norm", norm_weight=p["norm2"],
                                              norm_eps=EPS)),
        "down_silu_residual": (lambda: skinny_linear(silu_and_mul(gate_up), p["down"]),
                               lambda: fused_linear(gate_up, p["down"], prologue="silu", residual=residual)),
    }
    for name, (unfused, _) in ops.items():
        result[f"{name}_unfused_ms"] = _ms(unfused)
    default = skinny_gemm.PROLOGUE_BLOCK_N
    for block_n in BLOCK_NS:
        _set_block_n(block_n)
        result[f"fused_chain_ms_block_n{block_n}"] = _ms(lambda: fused_chain(s, attn, layers)) / LAYERS
        for name, (_, fused) in ops.items():
            result[f"{name}_fused_ms_block_n{block_n}"] = _ms(fused)
    _set_block_n(default)
    result["fused_chain_ms"] = result[f"fused_chain_ms_block_n{default}"]
    result["prologue_block_n"] = default
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if missing_gpu(__file__):
        return 2
    results = {f"llama31_8b_layer_m{m}": run(m, torch.bfloat16) for m in args.rows}
    config = {"dtype": "bf16", "layers_per_chain": LAYERS, "timing": "do_bench_cudagraph median, per layer"}
    path = write_result("W5-fused-linear", torch.cuda.get_device_name(), config, results, {}, args.out)
    print(f"{'case':<26} {'unfused us':>10} " + " ".join(f"{'bn' + str(b):>7}" for b in BLOCK_NS))
    for case, r in results.items():
        print(f"{case + ' chain':<26} {1e3 * r['unfused_chain_ms']:>10.1f} "
              + " ".join(f"{1e3 * r[f'fused_chain_ms_block_n{b}']:>7.1f}" for b in BLOCK_NS))
        for op in ("qkv_norm", "o_residual", "gate_up_norm", "down_silu_residual"):
            print(f"  {op:<24} {1e3 * r[f'{op}_unfused_ms']:>10.1f} "
                  + " ".join(f"{1e3 * r[f'{op}_fused_ms_block_n{b}']:>7.1f}" for b in BLOCK_NS))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
