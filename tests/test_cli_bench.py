"""`fastllm bench` (fastllm/bench.py) on a tiny random-weight Llama without a tokenizer: both providers timed on the
same random-token prompts, the work checked, the table and JSON written, bad flags refused in one line."""

import json

import pytest
import torch

from fastllm.bench import BenchResult, random_prompts
from fastllm.cli import main
from tests._models import build


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bench")
    build("qwen3", path)
    return str(path)


def test_one_prompt_reports_ttft_and_decode_rate_for_both_providers(tiny, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert main(["bench", tiny, "--input-len", "8", "--output-len", "5", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("provider"))
    assert "TTFT ms" in header and "decode tok/s" in header
    assert "fastllm / hf_eager:" in out
    results = json.loads(out_json.read_text())
    assert results["config"] | {"model": None} == {"model": None, "device": "cpu", "dtype": "float32", "input_len": 8,
                                                   "output_len": 5, "num_prompts": 1, "hf_batch_size": 32,
                                                   "quantization": None, "seed": 0}
    assert [r["provider"] for r in results["results"]] == ["hf_eager", "fastllm"]
    for r in results["results"]:
        # Two timings of a few ms each: on a busy machine t1 can exceed tN, and then no decode rate is given (no
        # timing is asserted here; test_decode_rate_only_where_the_whole_run_outlasts_the_first_token checks that)
        assert r["first_token_s"] > 0 and r["seconds"] > 0
        assert r["output_tok_s"] == pytest.approx(5 / r["seconds"])
        if r["seconds"] > r["first_token_s"]:
            assert r["decode_tok_s"] == pytest.approx(4 / (r["seconds"] - r["first_token_s"]))
        else:
            assert r["decode_tok_s"] is None
        assert r["ttft_ms"] == pytest.approx(r["first_token_s"] * 1e3)


def test_decode_rate_only_where_the_whole_run_outlasts_the_first_token():
    """decode tok/s = (new - 1) / (tN - t1) for one prompt; none where tN <= t1 (timing noise), for one new token,
    or for several prompts."""
    assert BenchResult("p", 1, 5, 0.01, 0.05).decode_tok_s == pytest.approx(4 / 0.04)
    assert BenchResult("p", 1, 5, 0.06, 0.05).decode_tok_s is None
    assert BenchResult("p", 1, 1, 0.01, 0.05).decode_tok_s is None
    assert BenchResult("p", 3, 5, 0.01, 0.05).decode_tok_s is None


def test_one_prompts_first_token_is_the_median_of_three_runs(monkeypatch):
    """A single prompt's t1 is the median of FIRST_TOKEN_RUNS one-token runs (one slow run does not make TTFT); several
    prompts', which is not reported, is timed once."""
    from fastllm import bench

    durations = iter([0.5, 9.0, 0.7, 4.0])
    calls = []

    def timed(fn, device):  # the seconds each run took, in turn
        return fn(), next(durations)

    monkeypatch.setattr(bench, "timed", timed)
    assert bench.first_token_seconds(lambda: calls.append(1), torch.device("cpu"), 1) == 0.7
    assert len(calls) == bench.FIRST_TOKEN_RUNS == 3
    assert bench.first_token_seconds(lambda: calls.append(1), torch.device("cpu"), 4) == 4.0
    assert len(calls) == 4


def test_several_prompts_in_hf_batches_and_quantized(tiny, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    argv = ["bench", tiny, "--input-len", "6", "--output-len", "3", "--num-prompts", "5", "--hf-batch-size", "2",
            "--quantization", "int8", "--json", str(out_json)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("provider"))
    assert "requests/s" in header and "TTFT" not in header
    results = json.loads(out_json.read_text())["results"]
    assert [r["provider"] for r in results] == ["hf_eager", "fastllm (int8)"]
    for r in results:
        assert r["num_prompts"] == 5 and r["decode_tok_s"] is None and r["ttft_ms"] is None
        assert r["output_tok_s"] == pytest.approx(15 / r["seconds"])


def test_no_baseline_times_fastllm_alone(tiny, capsys):
    assert main(["bench", tiny, "--input-len", "4", "--output-len", "2", "--no-baseline"]) == 0
    out = capsys.readouterr().out
    assert "hf_eager" not in out and any(line.startswith("fastllm ") for line in out.splitlines())


@pytest.mark.parametrize("flags,message", [
    (["--input-len", "0"], "--input-len must be at least 1, got 0"),
    (["--output-len", "-3"], "--output-len must be at least 1, got -3"),
    (["--num-prompts", "0"], "--num-prompts must be at least 1"),
    (["--hf-batch-size", "0"], "--hf-batch-size must be at least 1"),
    (["--input-len", "32760", "--output-len", "10"],
     "--input-len 32760 + --output-len 10 exceeds the model's context of 32768"),
    (["--json", "."], "--json must name a file, not a folder"),
    (["--seed", str(2**70)], "--seed must be in [0, 2**63)"),
    (["--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
])
def test_bad_flags_are_refused_in_one_line(tiny, capsys, flags, message):
    assert main(["bench", tiny, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_result_rates_and_random_prompts():
    r = BenchResult("x", num_prompts=1, output_len=11, first_token_s=0.5, seconds=2.5)
    assert (r.output_tok_s, r.requests_s, r.decode_tok_s) == (4.4, 0.4, 5.0)
    assert BenchResult("x", 2, 11, 0.5, 2.5).decode_tok_s is None  # several prompts: no per-stream decode rate
    assert BenchResult("x", 1, 1, 0.5, 2.5).decode_tok_s is None  # one new token: nothing decoded after it
    prompts = random_prompts(50, 3, 7, seed=4)
    assert prompts == random_prompts(50, 3, 7, seed=4) != random_prompts(50, 3, 7, seed=5)
    assert len(prompts) == 3 and all(len(p) == 7 and all(0 <= t < 50 for t in p) for p in prompts)


@pytest.mark.gpu
@pytest.mark.parametrize("num_prompts", [1, 3])
def test_bench_on_cuda_times_both_providers_in_bf16(tiny, tmp_path, capsys, num_prompts):
    """On a GPU: bf16 by default, CUDA graphs recorded when the LLM is built, the work checked on both sides (the
    numbers themselves are not asserted: a tiny model's speed says nothing)."""
    out_json = tmp_path / "bench.json"
    argv = ["bench", tiny, "--device", "cuda", "--input-len", "16", "--output-len", "8", "--num-prompts",
            str(num_prompts), "--json", str(out_json)]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads(out_json.read_text())
    assert results["config"]["device"] == "cuda" and results["config"]["dtype"] == "bfloat16"
    assert [r["provider"] for r in results["results"]] == ["hf_eager", "fastllm"]
    assert all(0 < r["first_token_s"] < r["seconds"] for r in results["results"])
