"""W5: memory bandwidth of the fastllm kernels against their eager PyTorch references, on one CUDA GPU.

For each op at decode (1, 16 rows) and prefill (4096, 16384 rows) shapes, hidden 4096 (gated activations:
intermediate 14336; rotary: x [1, 32, S, 128], a transposed view as attention makes it), the script checks the
op against its reference, then times both with `triton.testing.do_bench` (median, L2 flushed between calls) and
reports GB/s = the bytes each must move (every input read once, every output written once) / time. It measures
the device-to-device copy bandwidth (1 GiB `dst.copy_(src)`, bytes read + written) in the same run as the
ceiling, and also times the fastllm op inside a CUDA graph (`do_bench_cudagraph`), which removes the Python and
launch overhead that dominates eager calls at decode shapes (decode-sized data then stays in L2).

    PYTHONPATH=. python benchmarks/bench_kernels.py [--dtype bf16] [--quick] [--out DIR]

Writes DIR/W5-<gpu>-<yyyymmdd>.json (BENCHMARKS.md, "Result files"); exits 2 without a GPU.
"""

import argparse
import functools
import sys

import torch
from _common import copy_bandwidth_gb_s, missing_gpu, write_result

from fastllm import kernels

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Correctness gate before timing: one to two roundings of the output dtype (tests/_kernel_tolerances.py says why).
TOLERANCES = {torch.bfloat16: 1.6e-2, torch.float16: 1e-3, torch.float32: 1e-5}
HIDDEN, INTERMEDIATE, HEADS, HEAD_DIM = 4096, 14336, 32, 128  # Llama-3.1-8B
EPS = 1e-5


def _norm_case(rows, dtype, *, fused, layer):
    """Inputs, launcher, reference and byte count of one norm at [rows, HIDDEN]."""
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.randn(HIDDEN, device="cuda", dtype=dtype)
    params = (weight, torch.randn_like(weight)) if layer else (weight,)
    inputs = (x, residual) if fused else (x,)
    args = (*inputs, *params, EPS)
    n_io = 4 if fused else 2  # x (+ residual) read, out (+ residual_out) written
    nbytes = n_io * x.numel() * x.element_size() + sum(p.numel() * p.element_size() for p in params)
    return args, nbytes


def _cases(rows_list, dtype):
    """Yield (op name, shape key, fastllm fn, torch ref fn, expected-output fn, bytes moved)."""
    norms = [
        ("rms_norm", kernels.rms_norm, kernels.rms_norm_ref, False, False),
        ("fused_add_rms_norm", kernels.fused_add_rms_norm, kernels.fused_add_rms_norm_ref, True, False),
        ("layer_norm", kernels.layer_norm, kernels.layer_norm_ref, False, True),
        ("fused_add_layer_norm", kernels.fused_add_layer_norm, kernels.fused_add_layer_norm_ref, True, True),
    ]
    for rows in rows_list:
        for name, op, ref, fused, layer in norms:
            args, nbytes = _norm_case(rows, dtype, fused=fused, layer=layer)
            # The norms' eager references compute in fp32 and round where Hugging Face does: compare as they are.
            yield name, f"{rows}x{HIDDEN}", functools.partial(op, *args), functools.partial(ref, *args), None, nbytes

        seq = rows
        x = torch.randn(1, seq, HEADS, HEAD_DIM, device="cuda", dtype=dtype).transpose(1, 2)
        angles = torch.rand(1, 1, seq, HEAD_DIM, device="cuda") * 6.3
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        nbytes = 2 * x.numel() * x.element_size() + 2 * cos.numel() * cos.element_size()
        rope = (x, cos, sin)
        yield (
            "rotary_embedding", f"1x{HEADS}x{seq}x{HEAD_DIM}",
            functools.partial(kernels.rotary_embedding, *rope), functools.partial(kernels.rotary_embedding_ref, *rope),
            lambda rope=rope: kernels.rotary_embedding_ref(*(t.float() for t in rope)), nbytes,
        )  # fmt: skip

        x = torch.randn(rows, 2 * INTERMEDIATE, device="cuda", dtype=dtype)
        nbytes = 3 * rows * INTERMEDIATE * x.element_size()
        acts = [
            ("silu_and_mul", kernels.silu_and_mul, kernels.silu_and_mul_ref),
            ("gelu_tanh_and_mul", functools.partial(kernels.gelu_and_mul, approximate="tanh"),
             functools.partial(kernels.gelu_and_mul_ref, approximate="tanh")),
        ]  # fmt: skip
        for name, op, ref in acts:
            # Eager references round after each step in half precision; the kernels round once (fp32 inside).
            exact = functools.partial(ref, x.float())
            yield name, f"{rows}x{2 * INTERMEDIATE}", functools.partial(op, x), functools.partial(ref, x), exact, nbytes


def _check(name, key, actual, expected, dtype):
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    tol = TOLERANCES[dtype]
    for a, e in zip(actual, expected):
        try:
            torch.testing.assert_close(a, e.to(a.dtype), rtol=tol, atol=tol)
        except AssertionError as err:
            sys.exit(f"{name} {key}: fastllm output does not match the reference, not timing it:\n{err}")


def _gb_s(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result file")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help="one decode and one prefill shape, shorter timing")
    args = parser.parse_args()
    if missing_gpu(__file__):
        return 2

    import triton
    import triton.testing

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    rows_list = [1, 4096] if args.quick else [1, 16, 4096, 16384]
    bench = functools.partial(triton.testing.do_bench, return_mode="median", **({"rep": 30} if args.quick else {}))
    fastllm, torch_ref, rows_out = {}, {}, []
    for name, key, fn, ref, exact, nbytes in _cases(rows_list, dtype):
        _check(name, key, fn(), (exact or ref)(), dtype)
        ms, ref_ms = bench(fn), bench(ref)
        graph_ms = triton.testing.do_bench_cudagraph(fn, return_mode="median")
        fastllm[f"{name}_{key}"] = {
            "gb_s": _gb_s(nbytes, ms),
            "ms": ms,
            "gb_s_cudagraph": _gb_s(nbytes, graph_ms),
            "bytes": nbytes,
        }
        torch_ref[f"{name}_{key}"] = {"gb_s": _gb_s(nbytes, ref_ms), "ms": ref_ms}
        rows_out.append((name, key, _gb_s(nbytes, ms), _gb_s(nbytes, graph_ms), _gb_s(nbytes, ref_ms)))
        torch.cuda.empty_cache()
    copy_gb_s = copy_bandwidth_gb_s(functools.partial(triton.testing.do_bench, return_mode="median"))

    gpu = torch.cuda.get_device_name()
    workload = "W5" if args.dtype == "bf16" else f"W5-{args.dtype}"
    config = {
        "dtype": args.dtype,
        "quick": args.quick,
        "rows": rows_list,
        "hidden": HIDDEN,
        "intermediate": INTERMEDIATE,
        "rotary_x": f"[1, {HEADS}, rows, {HEAD_DIM}] (transposed view)",
        "timing": "triton.testing.do_bench median; gb_s_cudagraph: do_bench_cudagraph median",
    }
    path = write_result(workload, gpu, config, fastllm, {"torch_ref": torch_ref, "copy": {"gb_s": copy_gb_s}}, args.out)

    print(f"{gpu}, {args.dtype}; device-to-device copy {copy_gb_s:.0f} GB/s; wrote {path}")
    print(f"{'op':<22} {'shape':<16} {'fastllm GB/s':>12} {'(graph)':>9} {'torch GB/s':>11} {'% of copy':>9}")
    for name, key, gb_s, graph_gb_s, ref_gb_s in rows_out:
        share = 100 * gb_s / copy_gb_s
        print(f"{name:<22} {key:<16} {gb_s:>12.1f} {graph_gb_s:>9.1f} {ref_gb_s:>11.1f} {share:>8.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
