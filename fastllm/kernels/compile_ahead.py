"""Compile a forward's new Triton kernels side by side, not one at a time as the forward reaches them.

    logits = run_compiling_ahead(forward, *inputs)   # start-up forwards: the profiling step, a graph's warm-up

A cold start (Triton's cache empty) compiled each kernel specialization the moment the forward first launched it:
~0.1-1.2 s each, and a C launcher built with gcc for each, one after another on the host
(profile-compiles-llama31_8b-20261202.json). Triton compiles on threads (ptxas and gcc are subprocesses; 8 threads
compiled the same eleven kernels in 1.14 s against 2.45 s serially), but a forward can only ask for the next kernel
after the last one ran. Measured with this module against without, each start a new process with empty caches (W3,
H200, Llama-3.1-8B shape, 2026-12-02, W3-nvidia-h200-20261202-compile-ahead-ab.json, alternating): 10.3, 10.1 and
9.9 s against 12.5, 12.3 and 11.1 s.

So `run_compiling_ahead` runs the forward twice where it must. First a dry run: each launch of a kernel that is
not compiled yet is skipped, and its compile (and its launcher's build) goes to a thread pool; kernels already
compiled launch as usual. The dry run's outputs are wrong (skipped kernels wrote nothing), so they are dropped and,
once every compile is done, the forward runs again for real. Where the dry run skipped nothing it was the real run,
and its result is returned as it is: a forward with nothing to compile costs one run, not two.

Why a skipped kernel cannot leave anything wrong behind: the dry run only reads the forward's inputs and writes
its own new tensors, and the places a step writes that outlive it (KV cache slots) are written again by the real
run with the same inputs. The kernels that count arrivals in a buffer (split merges) reset it in the same launch.
Work done on a model outside its forward (the passes quantizing weights) must not run dry: `launches_for_real()`.

Triton's hook for this (`knobs.runtime.jit_cache_hook`, called before a compile; returning True skips the compile
and the launch) is process-wide, so it is set once and does nothing outside a dry run of this thread. Where another
library holds that hook, or Triton lacks it, or FASTLLM_COMPILE_AHEAD=0, forwards simply run once (as before).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from fastllm.kernels._registry import HAS_TRITON

__all__ = ["COMPILE_AHEAD", "launches_for_real", "prepare_triton", "run_compiling_ahead", "stats"]

_log = logging.getLogger(__name__)

COMPILE_AHEAD = os.environ.get("FASTLLM_COMPILE_AHEAD", "1") != "0"
# Threads compiling at once: each compile is mostly subprocesses (ptxas, gcc) and MLIR passes; more threads than
# start-up forwards have new kernels (about a dozen) buy nothing.
_MAX_THREADS = 8

# The dry run of this thread, if one is under way (a contextvar: other threads' launches pass through the hook).
_dry_run: contextvars.ContextVar[_DryRun | None] = contextvars.ContextVar("fastllm_dry_run", default=None)
_hook_lock = threading.Lock()
_support_thread: threading.Thread | None = None
# What this process did (for start-up profiles and tests): dry runs made, kernel compiles sent to the pool.
stats = {"dry_runs": 0, "compiles": 0}
# A compile that Triton's disk cache answers takes milliseconds; one that runs the compiler, a tenth of a second or
# more. Where the last dry run's compiles took so little (the median: a process's first compile also sets Triton up),
# the kernels are on disk: a dry run would save nothing and cost a forward (in a warm start, the activation
# measurement's 16k-token step: its phase took 0.99-1.00 s with its dry run against 0.53 s before, W3 on an H200,
# 2026-12-02), so later forwards of the process run once, compiling in place.
QUICK_COMPILE_S = 0.05
_last_dry_run = {"on_disk": False}


class _DryRun:
    """The compiles one dry run started: (kernel, cache key) -> future."""

    def __init__(self, executor: ThreadPoolExecutor):
        self.executor = executor
        self.futures: dict[tuple[int, str], Future] = {}
        self.seconds: list[float] = []  # each finished compile's (list.append: safe from the pool's threads)

    def submit(self, jit_function, key: str, specialization: str, constants: dict, device: int) -> None:
        slot = (id(jit_function), key)
        if slot not in self.futures:  # the same kernel met again (the next layer) while it compiles
            self.futures[slot] = self.executor.submit(self._timed, jit_function, specialization, constants, device)
            stats["compiles"] += 1

    def _timed(self, *args) -> None:
        start = time.perf_counter()
        _compile(*args)
        self.seconds.append(time.perf_counter() - start)


def _compile(jit_function, specialization: str, constants: dict, device: int | None) -> None:
    """On a pool thread: compile one specialization into the kernel's own cache (Triton's `preload`, which takes the
    hook's serialized specialization), then build its C launcher into Triton's disk cache. `device`: the CUDA device
    the launch was for (a pool thread's current device is 0); None only in tests."""
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        kernel = jit_function.preload(specialization)
    if kernel is None:
        return
    compiled_with = getattr(getattr(kernel, "src", None), "constants", None)
    if compiled_with is not None and _plain(compiled_with) != _plain(constants):
        # The JSON round trip changed a constexpr (a string that reads as a dtype name, say): that kernel must not
        # serve this key. The real run compiles it again, as Triton would have.
        _forget(jit_function, kernel)
        _log.debug("compile ahead: %s's constants changed in preload; compiled again in place", kernel.name)
        return
    try:
        from triton.runtime.driver import driver

        driver.active.launcher_cls(kernel.src, kernel.metadata)  # gcc; the real launch finds it on disk
    except Exception as error:  # noqa: BLE001 - the real launch builds it, as without this module
        _log.debug("compile ahead: launcher of %s not prebuilt (%s)", kernel.name, error)


def _plain(constants: dict) -> dict:
    return {tuple(k) if isinstance(k, list) else k: getattr(v, "value", v) for k, v in constants.items()}


def _forget(jit_function, kernel) -> None:
    """Take `kernel` out of its JIT function's in-memory caches (one per device; the tuple's first entry)."""
    for caches in list(jit_function.device_caches.values()):
        cache = caches[0]
        for key in [key for key, value in cache.items() if value is kernel]:
            del cache[key]


def _hook(*, key, fn, compile, is_manual_warmup, **_ignored) -> bool | None:
    """Triton's jit_cache_hook: inside a dry run, send the compile to the pool and skip the launch (True)."""
    dry = _dry_run.get()
    if dry is None or is_manual_warmup:
        return None
    dry.submit(fn.jit_function, key, compile["specialization_data"], compile["constants"], compile["device"])
    return True


def _install_hook() -> bool:
    """Set the hook once; False where it cannot be ours (no Triton knobs, or another library's hook is set)."""
    try:
        from triton import knobs
    except ImportError:
        return False
    with _hook_lock:
        current = knobs.runtime.jit_cache_hook
        if current is None:
            knobs.runtime.jit_cache_hook = _hook
            return True
        return current is _hook


def _usable(device: torch.device | None) -> bool:
    return (COMPILE_AHEAD and HAS_TRITON and device is not None and device.type == "cuda"
            and _dry_run.get() is None and not torch.cuda.is_current_stream_capturing()
            and not torch.compiler.is_compiling())


def run_compiling_ahead(fn: Callable, *args, device: torch.device | None = None, **kwargs):
    """`fn(*args, **kwargs)`, its new Triton kernels compiled side by side first (a dry run, see the module's
    docstring). `device`: where the forward runs; anything but a CUDA device runs `fn` once, as it is."""
    if not _usable(device) or _last_dry_run["on_disk"] or not _install_hook():
        return fn(*args, **kwargs)
    _join_support_thread()
    dry = _DryRun(ThreadPoolExecutor(max_workers=min(_MAX_THREADS, os.cpu_count() or 1),
                                     thread_name_prefix="fastllm-compile"))
    token = _dry_run.set(dry)
    result, failed = None, False
    try:
        result = fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the real run below meets (and raises) any real error
        _log.debug("compile ahead: the dry run failed (%s); running for real", error)
        failed = True
    finally:
        _dry_run.reset(token)
        wait(list(dry.futures.values()))
        dry.executor.shutdown()
    if not dry.futures and not failed:
        return result  # nothing was skipped: that was the real run
    stats["dry_runs"] += 1
    _last_dry_run["on_disk"] = bool(dry.seconds) and statistics.median(dry.seconds) < QUICK_COMPILE_S
    del result
    for future in dry.futures.values():
        if future.exception() is not None:  # the real run compiles that kernel in place and raises its real error
            _log.debug("compile ahead: a compile failed on the pool (%s)", future.exception())
    return fn(*args, **kwargs)


@contextlib.contextmanager
def launches_for_real() -> Iterator[None]:
    """Launch every kernel in this block, even inside a dry run: for work whose results outlive the forward (weights
    the passes quantize, an autotuner's timings)."""
    token = _dry_run.set(None)
    try:
        yield
    finally:
        _dry_run.reset(token)


def prepare_triton(device: torch.device) -> None:
    """Do Triton's once-a-process set-up on a background thread now, while the caller's tracing keeps this one busy,
    instead of in the first compile or launch: its cache key's hash of the Triton installation (`triton_key`: a
    SHA-256 of the 0.4-0.5 GB libtriton.so: 0.3-0.75 s alone on this project's CPU machine, 1.4 s when 8 threads
    raced to it there, as a dry run's pool threads did), the backend's (ptxas --version, libdevice's hash) and the
    gcc-built driver module (on a fresh cache). Each step is a cache Triton itself fills on first use: one that fails
    here is done there, as without this. Measured on an H200 (2026-12-02, W3-nvidia-h200-20261202-prepare-triton.json):
    warm starts of the Llama-3.1-8B shape took 2.83 / 2.78 s with one dry run and a 0.52 s KV-cache phase (0.99 s and a
    second dry run before, when the pool threads hashed the library themselves); the cold start 10.20 s."""
    global _support_thread
    if not (COMPILE_AHEAD and HAS_TRITON and device.type == "cuda") or _support_thread is not None:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()

    def prepare() -> None:
        steps = (("the installation's hash", _triton_key), ("the driver module", _driver_module),
                 ("the backend's hash", _backend_hash))
        for name, step in steps:
            try:
                with torch.cuda.device(index):
                    step()
            except Exception as error:  # noqa: BLE001 - Triton does it in the first compile, as without this
                _log.debug("compile ahead: %s not prepared (%s)", name, error)

    _support_thread = threading.Thread(target=prepare, name="fastllm-triton-setup", daemon=True)
    _support_thread.start()


def _triton_key() -> None:
    from triton.runtime.cache import triton_key

    triton_key()


def _driver_module() -> None:
    from triton.runtime.driver import driver

    driver.active.utils  # noqa: B018 - the attribute access builds (or loads) the module


def _backend_hash() -> None:
    from triton.compiler.compiler import make_backend
    from triton.runtime.driver import driver

    backend = make_backend(driver.active.get_current_target())
    backend.hash()
    backend.parse_options({}).hash()


def _join_support_thread() -> None:
    # Before the first compile: threads racing to Triton's set-up would each do it (its caches take no lock).
    if _support_thread is not None:
        _support_thread.join()
