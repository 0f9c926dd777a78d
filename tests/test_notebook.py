"""Runs notebooks/quickstart.ipynb top to bottom in a real Jupyter kernel of the running interpreter."""

import os
import sys
import time
from pathlib import Path

import pytest

from tests._demo import skip_without_demo

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"
KERNEL_NAME = "python3"


def _spec_runs_this_interpreter(spec) -> bool:
    # jupyter_client starts a spec whose argv[0] is a bare "python"/"python3" with sys.executable, so such
    # a spec (the one ipykernel installs) runs this interpreter too.
    exe = spec.argv[0]
    bare = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    return exe in bare or os.path.realpath(exe) == os.path.realpath(sys.executable)


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernel name whose spec runs this interpreter (so the kernel imports the fastllm under test)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
        if _spec_runs_this_interpreter(spec):
            return KERNEL_NAME
    except NoSuchKernel:
        pass
    # Another interpreter's python3 spec (e.g. a user-level one) would shadow ours: install a spec for this
    # interpreter in a private prefix and put it first on the Jupyter path, leaving the user's own untouched.
    from ipykernel.kernelspec import install

    install(kernel_name=KERNEL_NAME, prefix=str(tmp_path))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    return KERNEL_NAME


def test_quickstart_notebook_runs(kernel_name, monkeypatch):
    import nbclient
    import nbformat

    try:
        from fastllm.models.demo import demo_gguf_path

        demo_gguf_path()
    except FileNotFoundError as e:
        skip_without_demo(e)
    # The kernel is a child process: let it import this checkout's fastllm even when it is not installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in [str(REPO_ROOT), os.environ.get("PYTHONPATH")] if p))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit it without outputs"
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name=kernel_name, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails
    print(f"\nnotebook ran in {time.perf_counter() - start:.1f} s")

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    text += "".join(str(out.get("data", {}).get("text/plain", "")) for out in outputs)
    assert "Paris" in text
    assert "fastllm" in text and "identical tokens" in text
    assert "batched LLM outputs: 2" in text and text.count("Paris") >= 2  # the LLM section answers too
    assert "rms_norm" in text and "attention" in text  # the runtime's fusions, once the engine captured the model
