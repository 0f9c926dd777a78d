"""What every benchmark script shares: the copy-bandwidth ceiling and the result file (BENCHMARKS.md)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import re


def missing_gpu(script: str) -> bool:
    """True, after saying so on stderr, when there is no CUDA GPU to measure on (the script then exits 2)."""
    import sys

    import torch

    if torch.cuda.is_available():
        return False
    print(f"{pathlib.Path(script).name} measures on a CUDA GPU and none is available", file=sys.stderr)
    return True


def forget_launch_settings() -> None:
    """Clear the kernels' cached launch settings (the skinny GEMM's heuristic and tuned ones, the int4 decode
    kernel's): a benchmark variant that sets a module attribute they are worked out from (skinny_gemm._PROGRAMS_PER_SM,
    quant_linear.INT4_CHUNK_GROUPS, ...) would otherwise get the settings cached under the default, silently. Tuned
    settings come back from the on-disk tuning cache when next asked for."""
    from fastllm.kernels import quant_linear, skinny_gemm

    skinny_gemm._HEURISTIC.clear()
    skinny_gemm._TUNED.clear()
    quant_linear._INT4_CONFIGS.clear()


def copy_bandwidth_gb_s(do_bench) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written, timed with `do_bench` (ms, median)."""
    import torch

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (do_bench(lambda: dst.copy_(src)) * 1e-3) / 1e9


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_result(workload: str, gpu: str, config: dict, fastllm: dict, baselines: dict, out_dir) -> pathlib.Path:
    """Write `<out_dir>/<workload>-<gpu slug>-<yyyymmdd>.json` (or its next free -n: two runs in one call or day keep
    both) with the versions and date; returns its path."""
    import torch

    now = datetime.datetime.now()
    result = {"workload": workload, "gpu": gpu, "torch": torch.__version__, "triton": _version("triton"),
              "transformers": _version("transformers"), "date": now.isoformat(timespec="seconds"),
              "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FASTLLM_")},
              "config": config, "fastllm": fastllm, "baselines": baselines}
    path = result_path(workload, gpu, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path = unused_path(path)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def unused_path(path: pathlib.Path) -> pathlib.Path:
    """`path`, or `<stem>-2<suffix>`, `-3`, ... if it exists: a second run on the same day never overwrites the
    first one's recorded results."""
    candidate, n = pathlib.Path(path), 2
    while candidate.exists():
        candidate, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return candidate


def result_path(workload: str, gpu: str, out_dir) -> pathlib.Path:
    """`<out_dir>/<workload>-<gpu slug>-<yyyymmdd>.json` for today."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    return pathlib.Path(out_dir) / f"{workload}-{slug}-{datetime.datetime.now():%Y%m%d}.json"


def latest_result_path(workload: str, gpu: str, out_dir) -> pathlib.Path:
    """The last file write_result wrote today for this workload (result_path, or its highest -n)."""
    path = latest = result_path(workload, gpu, out_dir)
    n = 2
    while (candidate := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        latest, n = candidate, n + 1
    return latest
