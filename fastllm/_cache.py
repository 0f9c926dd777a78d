"""Where fastllm keeps what it writes to disk (converted demo model, captured graphs, tuned kernel settings)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Root of fastllm's on-disk cache: `$FASTLLM_CACHE_DIR` if set, else `~/.cache/fastllm`."""
    root = os.environ.get("FASTLLM_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fastllm"


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename, so a concurrent reader (another process
    starting the same model) sees the old file or the whole new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
