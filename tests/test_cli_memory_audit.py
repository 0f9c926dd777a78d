"""Audit of the CLI, optimize()'s options and what an optimized model holds: each test pins one bug found and fixed.

CPU, tiny random-weight models (tests/_models.py); the CLI tests that need text use the demo model's tokenizer.
"""

import gc

import pytest
import torch
import transformers as T

import fastllm
from fastllm.cli import main
from fastllm.entrypoints.model_state import ModelState
from tests._demo import skip_without_demo
from tests._models import break_capture, build, optimize

IDS = torch.tensor([[3, 4, 5, 6]])
GREEDY = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build("llama", path)
    return path


def _load(path, dtype=torch.float32):
    return T.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _is_plain_hf(model) -> bool:
    return not hasattr(model, "_fastllm_state") and "forward" not in vars(model) and "generate" not in vars(model)


# ---- optimize(): a failure leaves the model as it was ---------------------------------------------------------------


def test_a_failed_optimize_leaves_the_model_untouched_and_optimizable_again(llama_path):
    """A KV cache too big to allocate used to leave the model half-optimized: its `_fastllm_state` attached, so that
    optimize() with a smaller cache refused it as "already optimized"."""
    model, reference = _load(llama_path), _load(llama_path)
    with pytest.raises(RuntimeError, match="allocate"):
        optimize(model, num_kv_tokens=10**13)  # petabytes: the allocator refuses at once
    assert _is_plain_hf(model)
    gc.collect()  # nothing of the failed attempt is kept for it
    assert not [o for o in gc.get_objects() if type(o) is ModelState and o.model is model]
    optimize(model, num_kv_tokens=1024)
    assert torch.equal(model.generate(IDS, **GREEDY), reference.generate(IDS, **GREEDY))


def test_an_llm_that_fails_to_start_leaves_the_model_it_optimized_untouched(llama_path):
    """LLM(model) optimizes a plain model itself; a start-up that fails (here its KV cache cannot be allocated) must
    not leave the model half-optimized, as a failed optimize() does not."""
    model, reference = _load(llama_path), _load(llama_path)
    with pytest.raises(RuntimeError, match="allocate"):
        fastllm.LLM(model, num_kv_tokens=10**13)
    assert _is_plain_hf(model)
    optimize(model, num_kv_tokens=1024)
    assert torch.equal(model.generate(IDS, **GREEDY), reference.generate(IDS, **GREEDY))


def test_a_capture_error_raised_leaves_the_model_untouched(llama_path):
    model = _load(llama_path)
    break_capture(model)
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        optimize(model, on_capture_failure="raise")
    assert _is_plain_hf(model)


def test_a_model_in_an_unsupported_dtype_is_refused_naming_it(llama_path):
    """A float64 model failed deep inside a kernel ("x must be float32, float16 or bfloat16") and stayed attached."""
    model = _load(llama_path, torch.float64)
    with pytest.raises(ValueError, match="float64.*model.to"):
        optimize(model)
    assert _is_plain_hf(model)


def test_a_max_model_len_past_the_models_positions_is_refused(tmp_path):
    """GPT-2 has 1,024 learned positions: max_model_len=2048 used to be taken, and a longer request then failed inside
    the step ("IndexError: index out of range in self"; on CUDA, a device-side assert)."""
    model = build("gpt2", tmp_path)
    with pytest.raises(ValueError, match=r"max_model_len=2048 exceeds .* 1024 positions.*allowed: 1\.\.1024"):
        optimize(model, max_model_len=2048)
    assert _is_plain_hf(model)
    optimize(model, max_model_len=1024)  # the whole context is allowed


def test_a_scaled_rotary_embedding_may_reach_past_max_position_embeddings(tmp_path):
    config = T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                           rope_scaling={"rope_type": "linear", "factor": 2.0})
    model = T.LlamaForCausalLM(config).eval()
    optimize(model, max_model_len=128, warmup=False)
    assert model._fastllm_state.config.max_model_len == 128


# ---- an optimized model moved or cast -------------------------------------------------------------------------------


def test_casting_an_optimized_model_is_refused_clearly_and_release_lets_it_be_optimized_again(llama_path):
    """model.to(torch.bfloat16) after optimize() used to fail in the step: "the engine step failed: RuntimeError:
    expected m1 and m2 to have the same dtype" (the compiled step holds merged fp32 weights, the cache is fp32)."""
    model, reference = optimize(_load(llama_path)), _load(llama_path, torch.bfloat16)
    model.to(torch.bfloat16)
    for call in (lambda: model.generate(IDS, **GREEDY), lambda: model(IDS)):
        with pytest.raises(RuntimeError, match=r"moved to cpu / torch.bfloat16 .* fastllm.release\(model\)"):
            call()
    fastllm.release(model)
    optimize(model)
    assert torch.equal(model.generate(IDS, **GREEDY), reference.generate(IDS, **GREEDY))


def test_an_optimized_model_cast_back_is_refused_until_optimized_again(llama_path):
    # Cast back, its weights are new tensors (rounded to bf16 on the way) that the compiled step never reads: it ran
    # the old fp32 ones and matched the unrounded reference, a silent wrong answer (2026-12-03)
    model, reference = optimize(_load(llama_path)), _load(llama_path)
    model.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="moved"):
        model.generate(IDS, **GREEDY)
    model.to(torch.float32)
    with pytest.raises(RuntimeError, match="replaced by another tensor"):
        model.generate(IDS, **GREEDY)
    fastllm.release(model)
    optimize(model)
    reference.to(torch.bfloat16).to(torch.float32)
    assert torch.equal(model.generate(IDS, **GREEDY), reference.generate(IDS, **GREEDY))


# ---- release() ------------------------------------------------------------------------------------------------------


def test_release_puts_back_the_models_own_forward(llama_path):
    """A forward set on the instance (accelerate's hooks on a device_map model do this) was dropped by release():
    the model came back with its class's forward, the wrapper gone."""
    model = _load(llama_path)
    calls = []
    inner = model.forward

    def hooked(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    model.forward = hooked
    optimize(model)
    fastllm.release(model)
    calls.clear()
    model(IDS)
    assert model.forward is hooked and calls == [1]


# ---- OptimizeConfig -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("passes", [None, 3])
def test_passes_that_are_no_sequence_are_refused_naming_the_argument(passes):
    """passes=None used to raise "TypeError: 'NoneType' object is not iterable", naming neither passes nor the
    allowed names."""
    with pytest.raises(ValueError, match=r"passes must be a sequence of pass names.*allowed names: .*rms_norm"):
        fastllm.OptimizeConfig(passes=passes)


# ---- explain() ------------------------------------------------------------------------------------------------------


def test_explain_does_not_say_a_fixed_cache_grows(llama_path):
    model = optimize(_load(llama_path), num_kv_tokens=256)
    text = str(fastllm.explain(model))
    assert "KV cache (float32): 256 tokens" in text
    assert "grows on demand" not in text and "its largest size" in text
    grown = optimize(_load(llama_path))  # a cache that may grow still says so
    assert "grows on demand to 16,384 tokens" in str(fastllm.explain(grown))


def test_explain_of_a_fallback_does_not_offer_cpu_runtime_as_the_reason(llama_path):
    """A model that fell back (here when an LLM needed the runtime) runs HF's path because it cannot be captured; the
    report used to add that on the CPU HF's path is faster and cpu_runtime=True would run the runtime."""
    model = fastllm.optimize(_load(llama_path))  # the CPU default: HF's path, nothing captured yet
    break_capture(model)
    with pytest.warns(RuntimeWarning, match="runs unoptimized"), pytest.raises(RuntimeError, match="cannot run"):
        fastllm.LLM(model)
    report = fastllm.explain(model)
    assert report.status == "fallback" and report.hf_path_reason is None
    assert "cpu_runtime" not in str(report)


# ---- the CLI --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_context_dir(tmp_path_factory):
    """A tiny random Llama of 64 positions beside the demo model's tokenizer."""
    from fastllm.models.demo import load_demo_tokenizer

    try:
        tokenizer = load_demo_tokenizer()
    except FileNotFoundError as e:
        skip_without_demo(e)
    folder = tmp_path_factory.mktemp("short-context")
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    T.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == "" and "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("fastllm")]  # not transformers' progress
    assert len(errors) == 1, captured.err
    return errors[0]


@pytest.mark.parametrize("runtime", [[], ["--cpu-runtime"]], ids=["hf_path", "cpu_runtime"])
def test_run_refuses_a_length_past_the_context_before_generating(short_context_dir, capsys, monkeypatch, runtime):
    """`fastllm run` used to time HF eager past the model's 64 positions (100 new tokens, garbage, a transformers
    warning), then either print it (HF's path) or fail only after it (--cpu-runtime)."""
    import fastllm.cli as cli

    def never(*args, **kwargs):
        raise AssertionError("generated before checking the length")

    monkeypatch.setattr(cli, "_generate", never)
    err = _one_line_error(capsys, ["run", str(short_context_dir), "--prompt", "hello there", "--max-new-tokens",
                                   "100", *runtime])
    assert "--max-new-tokens 100 exceeds the model's context of 64 tokens" in err and "at most 62" in err
    err = _one_line_error(capsys, ["run", str(short_context_dir), "--prompt", "hello " * 80])
    assert "fills the model's context of 64 tokens" in err


@pytest.mark.parametrize("flag, value", [("--port", "70000"), ("--kv-cache-memory-fraction", "nan"),
                                         ("--kv-cache-memory-fraction", "1.5"), ("--kv-cache-memory-fraction", "0")])
def test_serve_refuses_bad_numbers_by_flag_before_loading(tmp_path, capsys, flag, value):
    """--port 70000 used to end in uvicorn's OverflowError traceback, and a bad --kv-cache-memory-fraction in
    "kv_cache_memory_fraction must be in (0, 1]", both after the model loaded. The model path here does not exist:
    the flag must be refused before anything looks at it."""
    err = _one_line_error(capsys, ["serve", str(tmp_path / "no-model"), flag, value])
    assert f"{flag} must be" in err and value in err
