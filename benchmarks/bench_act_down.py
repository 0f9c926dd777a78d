"""W5-act-down: the batch-1 decode down projection that reads SiLU(gate) * up inside its loads (`fused_linear(...,
prologue="silu")`, what decode_act_fusion runs by default) under launch settings other than the heuristic's, on one
CUDA GPU, inside CUDA graphs.

Why: in the bf16 decode step the down projection is the GEMV furthest from the copy bandwidth (Llama-2-7B, H200,
2026-12-03, bench_deferred_norm's default chain: ~25 us a layer against 21 for its bytes), it launches without PDL,
and its heuristic (8 rows of W a program, 512-column chunks, one K split) gives 512 programs, about half the
resident slots. Each variant is timed as the pair it runs in: the gate-up GEMV, then the down projection, over two
layers' distinct weights (far past the L2), with `triton.testing.do_bench_cudagraph` (the boundary between them is
in the time); rows of W a program, columns a chunk, chunks in flight + 1 and K splits
(fused_linear.ACT_PROLOGUE_*), each with and without PDL (skinny_gemm.PDL_WITH_GATED_PROLOGUE). Beside them: the
unfused pair (the activation kernel between). Every variant's output is compared with the default's first.

    PYTHONPATH=. python benchmarks/bench_act_down.py [--models llama2_7b llama31_8b] [--out DIR]

Writes DIR/W5-act-down-<gpu>-<yyyymmdd>.json and, per model, DIR/best-act-down-<model>.txt: the fastest variant as
replay_ab.py's --setting assignments (empty where the default is fastest). Exits 2 without a GPU.
"""

import argparse
import importlib
import sys
from pathlib import Path

import torch
from _common import missing_gpu, write_result
from bench_fused_linear import LAYERS, _layers, _ms

from fastllm.kernels import fused_linear, silu_and_mul, skinny_gemm, skinny_linear

SHAPES = {"llama31_8b": (4096, 14336, 6144), "llama2_7b": (4096, 11008, 12288)}  # hidden, intermediate, QKV rows
# (rows of W a program, columns a chunk, NUM_STAGES, K splits); the first is the heuristic's choice at one row
VARIANTS = [(8, 512, 3, 1), (4, 1024, 3, 1), (4, 512, 3, 1), (4, 512, 4, 1), (8, 512, 4, 1), (8, 256, 4, 1),
            (16, 256, 3, 1), (2, 1024, 3, 1), (8, 512, 3, 2), (4, 1024, 3, 2), (4, 512, 4, 2)]  # fmt: skip
KNOBS = ("ACT_PROLOGUE_BLOCK_N", "ACT_PROLOGUE_BLOCK_K", "ACT_PROLOGUE_STAGES", "ACT_PROLOGUE_SPLIT_K")
ROUNDS = 2
fused_linear_module = importlib.import_module("fastllm.kernels.fused_linear")  # the package exports the function


def fused_pair(x, layers):
    for p in layers:
        y = fused_linear(skinny_linear(x, p["gate_up"]), p["down"], prologue="silu")
    return y


def unfused_pair(x, layers):
    for p in layers:
        y = skinny_linear(silu_and_mul(skinny_linear(x, p["gate_up"])), p["down"])
    return y


def _set(variant, pdl: bool) -> None:
    for knob, value in zip(KNOBS, variant or (None,) * len(KNOBS)):
        setattr(fused_linear_module, knob, value)
    skinny_gemm.PDL_WITH_GATED_PROLOGUE = pdl


def _name(variant, pdl: bool) -> str:
    return "rows{}_cols{}_stages{}_splits{}".format(*variant) + ("_pdl" if pdl else "")


def _setting(variant, pdl: bool) -> str:
    items = [f"fastllm.kernels.fused_linear.{knob}={value}" for knob, value in zip(KNOBS, variant)]
    return ",".join([*items, f"fastllm.kernels.skinny_gemm.PDL_WITH_GATED_PROLOGUE={pdl}"])


def run(model: str, dtype) -> dict:
    hidden, inter, qkv = SHAPES[model]
    layers = _layers(dtype, (hidden, inter, qkv))
    x = torch.randn(1, hidden, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(dtype)
    _set(None, False)
    expected = fused_pair(x, layers).float()
    us: dict[str, list[float]] = {}
    for round_ in range(ROUNDS):  # alternating, so drift between the measurements shows
        _set(None, False)
        us.setdefault("unfused", []).append(_ms(lambda: unfused_pair(x, layers)) / LAYERS * 1e3)
        for variant in VARIANTS:
            for pdl in (False, True):
                _set(variant, pdl)
                if round_ == 0:
                    got = fused_pair(x, layers).float()
                    rel = ((got - expected).norm() / expected.norm()).item()
                    if not rel < 1e-2:  # other K splits round differently; a wrong launch is O(1) off
                        sys.exit(f"{model} {_name(variant, pdl)}: off from the default launch by {rel:.2e}")
                us.setdefault(_name(variant, pdl), []).append(_ms(lambda: fused_pair(x, layers)) / LAYERS * 1e3)
    _set(None, False)
    median = {name: sorted(times)[len(times) // 2] for name, times in us.items()}
    default = median[_name(VARIANTS[0], False)]
    best_variant, best_pdl = min(((v, p) for v in VARIANTS for p in (False, True)),
                                 key=lambda vp: median[_name(*vp)])  # fmt: skip
    weight_bytes = 3 * inter * hidden * torch.finfo(dtype).bits // 8  # gate-up [2I, H] and down [H, I]
    best_us = median[_name(best_variant, best_pdl)]
    return {"pair_us": median, "rounds_us": us, "default": _name(VARIANTS[0], False),
            "best": _name(best_variant, best_pdl), "best_us": best_us, "default_us": default,
            "weight_bytes_per_layer": weight_bytes,
            "best_setting": "" if best_us >= default else _setting(best_variant, best_pdl)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result file")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    if missing_gpu(__file__):
        return 2
    dtype = torch.bfloat16
    results = {model: run(model, dtype) for model in args.models}
    config = {"shapes": {m: SHAPES[m] for m in args.models}, "dtype": "bf16", "rows": 1, "layers": LAYERS,
              "variants": [list(v) for v in VARIANTS], "rounds": ROUNDS,
              "timing": "do_bench_cudagraph median of the gate-up GEMV + down projection pair, per layer"}
    path = write_result("W5-act-down", torch.cuda.get_device_name(), config, results, {}, args.out)
    for model, result in results.items():
        Path(args.out, f"best-act-down-{model}.txt").write_text(result["best_setting"])
        print(f"{model}: default {result['default_us']:.1f} us, unfused {result['pair_us']['unfused']:.1f}, "
              f"best {result['best']} {result['best_us']:.1f}")
        for name, value in sorted(result["pair_us"].items(), key=lambda item: item[1])[:6]:
            print(f"    {name:<40} {value:7.1f} us")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
