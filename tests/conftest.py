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


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """On a machine without a GPU, with pytest-xdist installed (the `dev` extra), `python -m pytest` runs the suite
    in one worker process per core (`-n auto --dist loadfile`), as if those options were given: on CI's 2 cores the
    suite takes about half the time, most of it single-threaded Python (the Triton interpreter, dynamo's trace).
    `--dist loadfile` keeps each test file in one worker, so a module-scoped fixture (a saved model, an optimized
    one, a server) is built once, as without xdist; files are handed out in collection order, the slow ones first
    (pytest_collection_modifyitems). Torch keeps its threads in each worker: one thread a worker made the 8192-token
    test of test_quant_quality.py take many times longer. Not done where a GPU is (the GPU tests measure the device's
    memory and time, which other processes would share), nor when -n/--dist is given (`-n 0` runs in this process,
    as does `-p no:xdist`), nor in an xdist worker itself, nor for --collect-only or --pdb."""
    if (torch.cuda.is_available() or not config.pluginmanager.hasplugin("xdist")
            or os.environ.get("PYTEST_XDIST_WORKER") or config.getoption("numprocesses") is not None
            or config.getoption("dist") != "no" or config.getoption("collectonly") or config.getoption("usepdb")):
        return
    config.option.numprocesses = "auto"
    config.option.dist = "loadfile"
    config.option.loadscopereorder = False  # hand out files in collection order: slow ones first (below)


def pytest_collection_modifyitems(config, items):
    # The files of slow tests (the real demo model; one test runs it over 8192 tokens) first: under xdist they are
    # then the first handed out, and the other workers take the rest meanwhile, rather than one worker finishing
    # alone on them at the end. Whole files move, so a module-scoped fixture is still built once; every test keeps
    # its place among the others.
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)
    skip_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
