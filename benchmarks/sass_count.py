"""Registers, shared memory and SASS instructions of one fastllm Triton kernel compiled for a GPU it does not need.

Triton compiles for any NVIDIA target on a CPU-only machine (its wheel bundles ptxas, cuobjdump and nvdisasm), so the
cost of a loop (instructions per weight byte, registers that limit programs per SM) can be counted before a device
call measures it. Kernel arguments: pointers are those named in capitals (X, W, ... : this package's convention),
bf16 unless `--ptr NAME=*i32` says otherwise, and 16-byte aligned; `stride*` and `K` arguments are taken as
multiples of 16 (as the launchers' tensors are); other arguments are i32. Every constexpr must be given (one left
out would be compiled as an i32 argument).

    PYTHONPATH=. python benchmarks/sass_count.py fastllm.kernels.quant_linear:_int4_gemv_kernel \\
        GROUP=128 HAS_BIAS=False ... --ptr W=*i32 --ptr S=*fp32 --num-warps 4 [--pdl] [--dump FILE]

Prints REG / SHARED per thread and block, the instruction count and the most frequent opcodes.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile

# Compiled kernels, not the interpreter (the CPU test suite sets TRITON_INTERPRET=1); fp fusion on, as the GPU's
# Triton compiles by default (this one warns until told).
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _value(text: str):
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text, 0)
    except ValueError:
        return text


SIZES = {"M", "N", "K", "V", "T"}  # capitals that are sizes, not pointers


def compile_sass(fn, constexprs: dict, pointers: dict[str, str], num_warps: int, arch: int = 90,
                 pdl: bool = False, ints: frozenset[str] = frozenset(),
                 div16: frozenset[str] = frozenset()) -> tuple[str, str]:
    """(cuobjdump -res-usage output, nvdisasm SASS) of `fn` compiled for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers or (name.isupper() and name not in SIZES | ints):
            signature[name] = pointers.get(name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name.startswith("stride") or name == "K" or name in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                       attrs=attrs)
    options = {"num_warps": num_warps, **({"launch_pdl": True} if pdl else {})}
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    return usage, sass


_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def opcode_counts(sass: str) -> collections.Counter:
    """Instructions by opcode (modifiers dropped: FFMA.FTZ counts as FFMA)."""
    return collections.Counter(m.group(1) for m in map(_INSTRUCTION.search, sass.splitlines()) if m)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", help="module:function, e.g. fastllm.kernels.argmax:_rows_kernel")
    parser.add_argument("constexprs", nargs="*", help="NAME=value for every constexpr argument")
    parser.add_argument("--ptr", action="append", default=[], help="NAME=*type of a pointer argument (default *bf16)")
    parser.add_argument("--int", action="append", default=[], help="NAME: an integer argument named in capitals")
    parser.add_argument("--div16", action="append", default=[],
                        help="NAME: another integer argument the launcher passes as a multiple of 16 (Triton "
                             "specializes those: a K split's length, say), which decides vector widths")
    parser.add_argument("--num-warps", type=int, default=4)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--pdl", action="store_true", help="compile with launch_pdl (kernels taking USE_PDL)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--dump", help="write the whole SASS here")
    args = parser.parse_args(argv)
    module, _, name = args.kernel.partition(":")
    fn = getattr(importlib.import_module(module), name)
    constexprs = dict(kv.split("=", 1) for kv in args.constexprs)
    constexprs = {k: _value(v) for k, v in constexprs.items()}
    pointers = dict(kv.split("=", 1) for kv in args.ptr)
    usage, sass = compile_sass(fn, constexprs, pointers, args.num_warps, args.arch, args.pdl, frozenset(args.int),
                               frozenset(args.div16))
    counts = opcode_counts(sass)
    print("REG", re.findall(r"REG:(\d+)", usage), "SHARED", re.findall(r"SHARED:(\d+)", usage))
    print("instructions", sum(counts.values()))
    print(", ".join(f"{op} {n}" for op, n in counts.most_common(args.top)))
    if args.dump:
        with open(args.dump, "w") as out:
            out.write(sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())
