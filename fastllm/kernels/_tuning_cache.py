"""Autotuned launch settings kept on disk, per kernel, GPU model and Triton version.

Timing every candidate of a kernel shape costs a second or more; a second process on the same kind of GPU reads
the winner from `$FASTLLM_CACHE_DIR/autotune/<kernel>-<gpu>-triton-<version>.json` instead. (Triton keeps the
compiled kernels themselves in its own disk cache, `~/.triton/cache`.)
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from fastllm._cache import cache_dir, write_atomically


class TuningCache:
    """`get`/`put` of a JSON-able settings dict by (GPU name, shape key); reads each GPU's file once."""

    def __init__(self, kernel: str):
        self.kernel = kernel
        self._entries: dict[str, dict[str, dict]] = {}  # GPU name -> shape key -> settings

    def path(self, gpu: str) -> Path:
        slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
        return cache_dir() / "autotune" / f"{self.kernel}-{slug}-triton-{_triton_version()}.json"

    def get(self, gpu: str, key: str) -> dict | None:
        if gpu not in self._entries:
            self._entries[gpu] = self._read(gpu)
        return self._entries[gpu].get(key)

    def put(self, gpu: str, key: str, settings: dict) -> None:
        # Re-read before writing: another process may have tuned other shapes meanwhile.
        entries = {**self._read(gpu), **self._entries.get(gpu, {}), key: settings}
        self._entries[gpu] = entries
        try:
            write_atomically(self.path(gpu), json.dumps(entries, indent=1, sort_keys=True).encode())
        except OSError as error:
            warnings.warn(f"fastllm could not save tuned {self.kernel} settings ({error}); a later process will "
                          "tune again", RuntimeWarning, stacklevel=2)

    def _read(self, gpu: str) -> dict[str, dict]:
        path = self.path(gpu)
        if not path.exists():
            return {}
        try:
            entries = json.loads(path.read_text())
            if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
                raise ValueError("not an object of settings objects")
        except (OSError, ValueError) as error:
            warnings.warn(f"fastllm ignores the unreadable tuning file {path} ({error})", RuntimeWarning,
                          stacklevel=3)
            return {}
        return entries


def _triton_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return "none"
