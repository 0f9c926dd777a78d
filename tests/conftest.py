"""Test configuration shared by every test module.

On a machine without a GPU, TRITON_INTERPRET=1 lets the kernel tests run the Triton kernels on the CPU
(inside `fastllm.kernels.triton_on_cpu()`; the library itself runs the `_ref` ops on CPU tensors). It must
be set before any `@triton.jit` decorator runs, i.e. before fastllm.kernels is imported: here, at the top
of conftest.py, is early enough. With a GPU it must stay unset, or the GPU tests would exercise the
interpreter instead of the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Captured graphs go to a directory of this test session, not the user's cache: a graph saved by another
# checkout's code must not serve these tests, and the tests must not leave files behind.
if "FASTLLM_GRAPH_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["FASTLLM_GRAPH_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastllm-graphs-")
    atexit.register(shutil.rmtree, os.environ["FASTLLM_GRAPH_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
