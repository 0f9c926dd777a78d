"""Test configuration shared by every test module.

TRITON_INTERPRET must be set before any `@triton.jit` decorator runs (i.e. before fastllm.kernels is
imported), otherwise launching a kernel on the CPU fails with "0 active drivers". Setting it here, at the
top of conftest.py, is early enough. It only matters where the kernel tests ask for Triton on the CPU
(`fastllm.kernels.triton_on_cpu()`); the library itself runs the `_ref` path on CPU tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
