"""Shared plumbing for the kernel layer: dispatch, custom-op registration, launch settings, input checks.

Dispatch rule: CUDA tensors run the Triton kernels; CPU tensors run the pure-PyTorch `<op>_ref`, except inside
`triton_on_cpu()`, where they run the Triton kernels under the interpreter (how the kernels are tested without a
GPU). Importing this module never initialises CUDA and works without triton installed.
"""

import contextlib
import contextvars
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: every op still works through its `_ref`.
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for `triton` and `triton.language` so the kernel modules still import.

        `@triton.jit` leaves the function undecorated and `tl.constexpr` only has to exist as an annotation;
        the kernels are never launched because `use_triton` is False for every CPU tensor and raises for CUDA.
        """

        constexpr = object

        @staticmethod
        def jit(fn: Callable | None = None, **options) -> Callable:  # also as @triton.jit(do_not_specialize=...)
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()

# Read once: `@triton.jit` looks at TRITON_INTERPRET when the kernel modules are imported, not at launch.
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"
_triton_on_cpu = contextvars.ContextVar("fastllm_triton_on_cpu", default=False)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# An FP8 KV cache (`quantization="fp8_kv"`) stores K and V as float8 e4m3; the attention kernels widen them on reads.
FP8_KV_DTYPE = torch.float8_e4m3fn
# A norm keeps its whole row in registers; past 64K elements (256 KB of fp32) the kernel would spill.
MAX_ROW_SIZE = 65536

__all__ = [
    "DEFAULT_SM_COUNT",
    "FLOAT_DTYPES",
    "FP8_KV_DTYPE",
    "HAS_TRITON",
    "LIBRARY",
    "MAX_ROW_SIZE",
    "check_float",
    "check_kv_scale",
    "check_out",
    "check_row_param",
    "check_same_device",
    "device_guard",
    "load_row_plus_residual",
    "next_power_of_2",
    "norm_outputs",
    "out_or_new",
    "pdl_options",
    "pdl_wait",
    "ref_output",
    "register_out_op",
    "row_launch_settings",
    "rows_view",
    "sm_count",
    "tl",
    "triton",
    "triton_on_cpu",
    "use_triton",
]


def use_triton(t: torch.Tensor) -> bool:
    """True when `t` should go through a Triton kernel: always on CUDA, on the CPU only inside `triton_on_cpu()`."""
    if t.is_cuda:
        if not HAS_TRITON:
            raise RuntimeError("fastllm kernels on CUDA tensors need triton; install it with `pip install triton`")
        return True
    return HAS_TRITON and _triton_on_cpu.get()


@contextlib.contextmanager
def triton_on_cpu() -> Iterator[None]:
    """Run the Triton kernels on CPU tensors (Triton interpreter) inside this block; used by the kernel tests."""
    if not HAS_TRITON:
        raise RuntimeError("triton_on_cpu() needs triton installed")
    if os.environ.get("TRITON_INTERPRET") != "1" or not _INTERPRET_AT_IMPORT:
        raise RuntimeError(
            "triton_on_cpu() needs TRITON_INTERPRET=1 in the environment before fastllm.kernels is imported "
            "(the kernels are compiled for the interpreter when they are decorated); set it at the top of "
            "conftest.py or in the shell"
        )
    token = _triton_on_cpu.set(True)
    try:
        yield
    finally:
        _triton_on_cpu.reset(token)


def _returns_nothing(*args, **kwargs) -> None:
    # The registered ops write into their `out` arguments, so the fake (meta) kernel has nothing to compute.
    return None


# One fragment for every op of the namespace (FRAGMENT: other modules may define fastllm:: ops too).
LIBRARY = torch.library.Library("fastllm", "FRAGMENT")


def register_out_op(name: str, mutates_args: Sequence[str]) -> Callable:
    """Decorator: register `fn` as the op `fastllm::<name>` that writes into `mutates_args` and returns None.

    Custom ops may not return aliases of their inputs, so every op is registered in destination-passing form;
    the public launcher allocates the outputs. Returns the op (`torch.ops.fastllm.<name>.default`).

    Mechanism: `Library.define` + a CPU and a CUDA kernel + `register_fake`, with the schema inferred from
    `fn`'s annotations as `torch.library.custom_op` does. Host time per call on an H100 host (torch 2.11,
    triton 3.6, rms_norm at 1 x 4096, two runs): `custom_op` 66-77 us, this 39-44 us, the bare launch it wraps
    21-35 us. `custom_op` adds Python autograd and version-counter kernels that inference does not use.
    """

    def decorator(fn: Callable) -> Callable:
        LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=tuple(mutates_args)))
        for dispatch_key in ("CPU", "CUDA"):
            LIBRARY.impl(name, fn, dispatch_key)
        torch.library.register_fake(f"fastllm::{name}", _returns_nothing, lib=LIBRARY)
        return getattr(torch.ops.fastllm, name).default

    return decorator


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make `t`'s GPU the current device for a launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# SMs of the card a launch heuristic sizes its grid for. A CPU tensor (the interpreter) gets an H100 SXM's count,
# so the heuristics, and the tests that pin their choices, are deterministic off the GPU.
DEFAULT_SM_COUNT = 132
_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of `device` (cached; a plain dict, not functools.cache: dynamo traces through it without a
    warning when it traces a launcher)."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


# Programmatic dependent launch (PDL; compute capability 9.0+): a kernel launched with it may start while the kernel
# before it on the stream is still running, and waits (`griddepcontrol.wait`) for that kernel's completion only
# where it calls `pdl_wait`; the running kernel lets its successor be scheduled early with
# `griddepcontrol.launch_dependents`. Inside a CUDA graph a decode step is ~370 short kernels whose boundaries
# (drain, launch, fill: a few microseconds each) cost as much as some of the kernels: with PDL the next kernel's
# programs are resident and set up when the previous one ends. Every kernel that takes USE_PDL calls `pdl_wait` before
# it writes any tensor and before it reads anything the kernel right before it may write (so the chain of waits orders
# it after every earlier kernel, not just the last one; the decode attention reads older keys before its wait).
# Where: FASTLLM_PDL=1 every launch, FASTLLM_PDL=0 none; unset, launches of at most PDL_MAX_ROWS rows (tokens): the
# steps of batch-1 and small-batch decode, whose kernels last microseconds, so their boundaries are a real share of
# the step. The GEMM that reads SiLU(gate) * up inside its loads (decode_act_fusion, bf16's default) launches without
# it: with PDL there too the bf16 step fell to 222.7 tok/s from 236.3 (which kernel loses was not found); a kernel
# launched without PDL simply starts after the one before it ends, and the next one still waits for it. Measured so
# on an H200 (W1, batch 1, random weights, 2026-11-30, W1-quant-*-pdl-small-steps.json, W1-*-pdl-llama2.json), with
# against without in one call: Llama-3.1-8B FP8 weights 355.1 against 339.5 tok/s, int4 270.9 against 264.9, bf16
# 234.0 against 236.5; Llama-2-7B bf16 261.1 against 259.7. Not measured for larger steps (unset: off there).
# (Also tried: the GEMVs asking L2 for their first weight chunks before the wait: no gain for FP8, a loss for bf16.
# And the GEMVs loading each split's first chunk of weights into registers before the wait, summed after the loop so
# the loop's pipelined loads were not delayed (sm_90 SASS checked), 2026-12-01: 96 registers a thread against 72-80,
# fewer programs an SM; W1 in one call, on against off: bf16 237.3 against 238.0 tok/s, FP8 313.6 against 362.6, int4
# 377.7 against 386.9; the one-row FP8 GEMVs fell to 73-75% of copy bandwidth from 85-87%:
# W1-quant-nvidia-h200-20261201-weights-first.json, W5-quant-gemv-...-20261201-weights-first.json. Removed.
# And an L2 prefetch kernel after each decode GEMV (cp.async.bulk.prefetch.L2 of the next GEMV's first 24 MB, issued
# after a griddepcontrol.wait, the successor released first), meant to fill the bus while norms, rotary and attention
# run, 2026-12-01, W1 with against without in one call: bf16 Llama-3.1-8B 203.6 against 239.4 tok/s, Llama-2-7B 217.6
# against 258.8, FP8 284.4 against 361.8, int4 329.3 against 381.7: ~5.6 us lost a prefetch, as if each prefetch
# kernel lasted until its bytes arrived and the GEMV after gained nothing from them (W1-nvidia-h200-20261201-l2-
# prefetch.json, W1-quant-nvidia-h200-20261201-l2-prefetch.json). Removed.
# And the decode GEMVs letting the next kernel be scheduled only after their loop, not at their start (the next
# kernel's programs then wait through less of the GEMV), 2026-12-01, one call, after against at the start: bf16
# Llama-3.1-8B 239.0 / 239.1 against 236.1 / 235.9 tok/s (two runs, each variant run later in its process, where
# repeated runs of one setting have differed by 1-1.5%), Llama-2-7B 258.5 against 258.7, FP8 362.1 against 362.9, int4
# 380.9 against 381.4: W1-nvidia-h200-20261201-release-after-loop.json, W1-quant-...-20261201-release-after-loop.json.
# Within the noise: not kept.)
_PDL_SETTING = os.environ.get("FASTLLM_PDL", "")
if _PDL_SETTING not in ("", "0", "1"):
    warnings.warn(f"FASTLLM_PDL={_PDL_SETTING!r} is not one of '1' (every launch) or '0' (none); using the default "
                  f"(launches of at most 16 rows)", RuntimeWarning, stacklevel=2)
    _PDL_SETTING = ""
PDL_MAX_ROWS = 16
_PDL_DEVICES: dict[int, bool] = {}


try:  # the griddepcontrol instructions (Triton 3.4+); launching with PDL also needs the `launch_pdl` option
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _TRITON_HAS_PDL = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
except ImportError:
    _TRITON_HAS_PDL = False


def pdl_options(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel taking `USE_PDL` (see `pdl_wait`) whose rows (tokens) are t's first dimension:
    PDL where FASTLLM_PDL asks for it (unset: at most PDL_MAX_ROWS rows), on CUDA devices of compute capability 9.0+
    with a Triton that has it, else nothing (the kernel's USE_PDL defaults to False)."""
    if not t.is_cuda or _PDL_SETTING == "0" or (_PDL_SETTING != "1" and (t.dim() == 0 or t.shape[0] > PDL_MAX_ROWS)):
        return {}
    index = torch.cuda.current_device() if t.device.index is None else t.device.index
    if index not in _PDL_DEVICES:
        _PDL_DEVICES[index] = HAS_TRITON and _TRITON_HAS_PDL and torch.cuda.get_device_capability(index) >= (9, 0)
    return {"USE_PDL": True, "launch_pdl": True} if _PDL_DEVICES[index] else {}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """With USE_PDL: wait until the kernels before this one completed (their writes visible), then let the next
    kernel's programs be scheduled. Called first in a kernel, before any tensor is touched, by every program."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


def check_kv_scale(name: str, value: object, cache: torch.Tensor) -> None:
    """An FP8 KV cache's K or V multiplier (stored value x scale = the real one): a finite positive number; any other
    cache holds its values as they are (1.0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    if value != 1.0 and cache.dtype != FP8_KV_DTYPE:
        raise ValueError(f"{name} {value!r} scales an FP8 KV cache; a {cache.dtype} cache takes 1.0")


def check_number(name: str, value: object, *, positive: bool = False) -> None:
    """A launcher's scalar argument (a norm's eps, attention's scale): a finite real number, >= 0 (or > 0 with
    `positive`). NaN or Inf would reach the kernel and come back as NaN outputs, not as an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (positive and value == 0):
        raise ValueError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number, "
                         f"got {value!r}")


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def row_launch_settings(n: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for a kernel that holds one row of `n` elements in registers.

    Deterministic, after Liger's calculate_settings: enough warps that each thread holds 8-32 elements.
    """
    block = next_power_of_2(n)
    if block > MAX_ROW_SIZE:
        raise ValueError(f"rows of {n} elements are too long: at most {MAX_ROW_SIZE} are supported")
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def check_float(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tuple(t.stride())}")


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; both must be on one device")


def check_row_param(name: str, p: object, x: torch.Tensor) -> None:
    """A per-column parameter of a norm (weight, bias): [N] float on x's device, N = x.shape[-1]."""
    check_float(name, p)
    check_same_device(name, p, "x", x)
    if p.shape != x.shape[-1:]:
        raise ValueError(f"{name} must have shape ({x.shape[-1]},) to match x's last dim, got {tuple(p.shape)}")


def check_out(name: str, out: object, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
    """Validate a caller-provided output buffer against what the op would allocate."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} has dtype {out.dtype}, expected {dtype}")
    if out.device != device:
        raise ValueError(f"{name} is on {out.device}, expected {device}")
    if out.shape[-1] > 1 and out.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tuple(out.stride())}")


def out_or_new(
    name: str, out: torch.Tensor | None, shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A new contiguous output, or the caller's `out` once `check_out` has passed."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_out(name, out, shape, dtype, device)
    return out


def rows_view(name: str, t: torch.Tensor, *, writable: bool = False) -> torch.Tensor:
    """`t` as a [rows, n] matrix with unit column stride, for the row-wise kernels.

    Inputs whose leading dims cannot be merged into one row stride are copied (rare: a permuted batch);
    outputs must be viewable, since a copy would not write back to the caller's buffer.
    """
    if t.ndim == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        if writable:
            raise ValueError(
                f"{name} with shape {tuple(t.shape)} and strides {tuple(t.stride())} cannot be viewed as rows of "
                f"its last dimension; pass a tensor whose leading dimensions can be flattened"
            ) from None
        return t.reshape(-1, t.shape[-1])


def ref_output(result: torch.Tensor, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A reference op's result as its launcher returns it on the CPU path: the launcher's dtype, contiguous (what
    an `out` buffer would be). The CPU path returns the reference's own result instead of copying it into a new
    buffer through the registered op: on a 2-core CPU that saved ~25% of a SmolLM2 decode step."""
    return result.to(dtype).contiguous()


def norm_outputs(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
    residual_out: torch.Tensor | None,
    allocate: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Checks shared by the (fused-add) norms; returns (out, residual_out), allocated where not given (unless not
    `allocate`, for the CPU path that returns the reference's tensors).

    x: [..., N] (already checked by `check_float`); residual: None or like x; out: [..., N] of `out_dtype`;
    residual_out: [..., N] of x's dtype, only with a residual.
    """
    n = x.shape[-1]
    if not 0 < n <= MAX_ROW_SIZE:
        raise ValueError(f"x's last dim must be between 1 and {MAX_ROW_SIZE}, got {n}")
    if residual is not None:
        check_float("residual", residual)
        check_same_device("residual", residual, "x", x)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, expected x's shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual has dtype {residual.dtype}, expected x's dtype {x.dtype}")
        if not allocate:
            return None, None
        residual_out = out_or_new("residual_out", residual_out, x.shape, x.dtype, x.device)
    if not allocate:
        return None, None
    return out_or_new("out", out, x.shape, out_dtype, x.device), residual_out


@triton.jit
def load_row_plus_residual(X, R, S, row, stride_x, stride_r, stride_s, cols, mask, HAS_RESIDUAL: tl.constexpr,
                           CACHE_MODIFIER: tl.constexpr):
    """Row `row` of X, or with HAS_RESIDUAL of X + R, which is stored to S (the next residual) and returned.

    The sum is rounded to X's dtype before anything else reads it, as Hugging Face stores it before the norm
    (bf16/fp16 parity). Shared by the fused-add norms so the rule lives in one place. CACHE_MODIFIER "" or ".cg" (X
    and R written by other programs of the same kernel: read through L2, not this SM's L1); no default, which the
    compiler (Triton 3.6, not the interpreter) took for a str where a jit function called another.
    """
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0, cache_modifier=CACHE_MODIFIER)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0, cache_modifier=CACHE_MODIFIER)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + row * stride_s + cols, x, mask=mask)
    return x


@triton.jit
def fp8_row_codes(y, FP8_MAX: tl.constexpr = 448.0):
    """A row y (fp32, padding lanes 0) quantized to e4m3 per row: (codes in fp32, to be stored as float8, and the
    scale mapping its largest magnitude to FP8_MAX; 1 for an all-zero row), with IEEE divisions as `fp8.quantize_rows`
    divides. The one definition of the per-token activation quantization that `quantize_rows_fp8` and the kernels
    quantizing their own output for an FP8 GEMM (rms_norm_fp8_rows, act_and_mul_fp8_rows) share: the same codes."""
    amax = tl.max(tl.abs(y), axis=0)
    scale = tl.where(amax > 0, tl.fdiv(amax, FP8_MAX, ieee_rounding=True), 1.0)
    return tl.minimum(tl.maximum(tl.fdiv(y, scale, ieee_rounding=True), -FP8_MAX), FP8_MAX), scale
