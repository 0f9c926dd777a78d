"""Defects found by a bug hunt over what a user passes (2026-12-02), each as a test: generate() takes the lengths and
streamers Hugging Face takes and names what it refuses as the caller wrote it; `LLM` names prompts, token ids, dtypes
and tokenizers it cannot use and checks an optimized model's scheduling options as optimize() does; SamplingParams and
OptimizeConfig take numpy's numbers; a penalty that overflows the scores still samples a seen token; counts past the
step's int32 buffers are refused by name, by optimize() and by `fastllm serve`; max_num_seqs and
max_num_batched_tokens are capped at what the KV cache holds, and a start-up step too large for the GPU names the
option; generate() takes HF's top_p=0 and, as HF, asks for the tokenizer whenever stop_strings is given."""

import numpy as np
import pytest
import torch
import transformers as T

import fastllm
from fastllm import LLM, SamplingParams
from fastllm.cli import main
from tests._models import optimize


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    T.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _load(path):
    return T.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def models(path):
    """(optimized model, HF reference)."""
    return optimize(_load(path)), _load(path)


@pytest.mark.parametrize("lengths", [dict(min_new_tokens=5), dict(min_length=1000)])
def test_a_minimum_past_max_new_tokens_masks_eos_to_the_end_as_hf_does(models, lengths):
    # HF accepts min_new_tokens (or a min_length, e.g. from a model's generation_config) beyond max_new_tokens: EOS
    # stays masked for every new token. fastllm refused the call ("min_tokens must be <= max_tokens").
    fast, hf = models
    ids = torch.tensor([[1, 2, 3, 4]])
    eos = hf.generate(ids, max_new_tokens=1, do_sample=False)[0, -1].item()  # the token greedy picks first
    kwargs = dict(max_new_tokens=3, do_sample=False, eos_token_id=eos, pad_token_id=0, **lengths)
    expected = hf.generate(ids, **kwargs)
    assert expected.shape[1] == 7 and eos not in expected[0, 4:].tolist()
    torch.testing.assert_close(fast.generate(ids, **kwargs), expected, rtol=0, atol=0)


def test_an_empty_batch_is_refused_by_name(models):
    fast, _ = models
    with pytest.raises(ValueError, match="no rows"):  # was a ZeroDivisionError from the output's assembly
        fast.generate(torch.empty(0, 4, dtype=torch.long), max_new_tokens=3)


@pytest.fixture(scope="module")
def llm(path):
    return LLM(_load(path))


@pytest.mark.parametrize("prompts", [None, 5])
def test_prompts_that_are_no_sequence_are_named(llm, prompts):
    with pytest.raises(ValueError, match="prompts must be"):  # was "TypeError: 'int' object is not iterable"
        llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.has_work()


@pytest.mark.parametrize("dtype, expected", [("float16", torch.float16), ("auto", torch.float32),
                                             (torch.bfloat16, torch.bfloat16)])
def test_llm_takes_a_dtype_name_for_a_model_object(path, dtype, expected):
    # The docstring promises a torch.dtype or "auto"; a string reached nn.Module.to(dtype=...) and raised its TypeError.
    with LLM(_load(path), dtype=dtype) as llm:
        assert llm.model.dtype == expected
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)[0]
        assert out.error is None and len(out.outputs[0].token_ids) == 2


@pytest.mark.parametrize("source", ["model", "path"])
def test_an_unknown_dtype_name_is_refused_by_name(path, source):
    model = _load(path) if source == "model" else str(path)
    with pytest.raises(ValueError, match="dtype must be"):  # a model: nn.Module.to's TypeError; a path: AttributeError
        LLM(model, dtype="float17")


@pytest.mark.parametrize("penalty", [1e-300, 1e-45])
def test_a_penalty_that_overflows_the_scores_samples_a_seen_token(llm, penalty):
    # In fp32 these penalties are 0 and 1.4e-45: a positive score of a seen token divided by them is +inf, and the
    # softmax of a row with +inf is NaN; the draw then took token 0 (not in the prompt) on every step. The limit of
    # such a penalty is a draw among the seen tokens with positive scores, which is what greedy rows already take.
    prompt = list(range(10, 30))
    params = SamplingParams(max_tokens=4, temperature=1.0, repetition_penalty=penalty, seed=0)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.error is None
    assert set(out.outputs[0].token_ids) <= set(prompt), out.outputs[0].token_ids


@pytest.mark.parametrize("kwargs, name", [(dict(num_return_sequences=200, do_sample=True), "num_return_sequences"),
                                          (dict(eos_token_id=-1), "eos_token_id"),
                                          (dict(min_new_tokens=-1), "min_new_tokens")])
def test_a_refused_generate_argument_is_named_as_the_caller_passed_it(models, kwargs, name):
    # The message named SamplingParams' fields (n, stop_token_ids, min_tokens), which a generate() caller never wrote
    fast, _ = models
    with pytest.raises(ValueError, match=f"invalid generation argument: {name} "):
        fast.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, **kwargs)


@pytest.mark.parametrize("bad", [2.0, True, "2", None])
def test_a_token_id_that_is_no_int_is_named_in_its_prompt(llm, bad):
    # The message was "a prompt must be a string or a list of token ids, got list" for a list of token ids
    outs = llm.generate([[1, 2, 3], [1, bad, 3]], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    assert outs[0].error is None
    assert "prompt 1" in outs[1].error and f"position 1: {bad!r}" in outs[1].error, outs[1].error


@pytest.mark.parametrize("name", ["max_num_seqs", "max_num_batched_tokens", "max_model_len"])
def test_a_count_past_the_int32_step_buffers_is_refused_by_name(path, name):
    # The step's buffers hold these counts as int32; 10**20 sequences ended in torch.zeros' "Overflow when unpacking
    # long long" TypeError with C++ frames, after the model was captured
    model = _load(path)
    with pytest.raises(ValueError, match=f"{name} must be a positive integer.*2\\*\\*31 - 1"):
        optimize(model, **{name: 10**20})
    assert not hasattr(model, "_fastllm_state")
    fastllm.OptimizeConfig(**{name: 2**31 - 1})  # the largest accepted


@pytest.mark.parametrize("flag", ["--max-num-seqs", "--max-num-batched-tokens", "--max-model-len"])
def test_serve_refuses_a_count_past_int32_before_loading(tmp_path, capsys, flag):
    # The model path does not exist: the flag must be refused before anything looks at it (it was a traceback)
    code = main(["serve", str(tmp_path / "no-model"), flag, str(10**20)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{flag} must be at most {2**31 - 1}" in err, err


class _Recorder(T.generation.streamers.BaseStreamer):
    """What a streamer is given: each put's values, then "end"."""

    def __init__(self):
        self.got = []

    def put(self, value):
        self.got.append(value.tolist())

    def end(self):
        self.got.append("end")


@pytest.mark.parametrize("ids, kwargs", [(torch.tensor([[1, 2, 3]]), dict(num_return_sequences=2, do_sample=True)),
                                         (torch.tensor([[1, 2, 3], [4, 5, 6]]), dict(do_sample=False))])
def test_a_streamer_of_several_sequences_is_given_what_hf_gives_it(models, ids, kwargs):
    # Two completions streamed their tokens into one flat sequence ([a1], [b1], [a2], ...), and a batch of two streamed
    # nothing but the prompt; HF puts one row per sequence each step (and its TextStreamer refuses more than one)
    fast, hf = models
    streamers = _Recorder(), _Recorder()
    outputs = []
    for model, streamer in zip((fast, hf), streamers):
        torch.manual_seed(0)
        outputs.append(model.generate(ids, max_new_tokens=3, pad_token_id=0, streamer=streamer, **kwargs))
    assert streamers[0].got == streamers[1].got
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("max_length", [3, 4])
def test_a_max_length_the_prompt_fills_is_refused_naming_max_length(models, max_length):
    # The message was HF's "`max_new_tokens` must be greater than 0, but is -1", for a call that gave max_length
    fast, _ = models
    with pytest.raises(ValueError, match=f"max_length={max_length}.*4 tokens"):
        fast.generate(torch.tensor([[1, 2, 3, 4]]), max_length=max_length)


@pytest.mark.parametrize("lengths", [dict(max_new_tokens=np.int64(3)), dict(max_length=np.int32(6))])
def test_numpy_lengths_are_taken_as_hf_takes_them(models, lengths):
    # Refused with "max_new_tokens must be an integer, got np.int64(3)"; HF's generate takes numpy's ints
    fast, hf = models
    ids = torch.tensor([[1, 2, 3]])
    expected = hf.generate(ids, do_sample=False, pad_token_id=0, **lengths)
    assert expected.shape == (1, 6)
    torch.testing.assert_close(fast.generate(ids, do_sample=False, pad_token_id=0, **lengths), expected, rtol=0, atol=0)


@pytest.mark.parametrize("tokenizer", [5, True, object()])
def test_something_that_is_no_tokenizer_is_refused_by_name(path, tokenizer):
    # It was taken, and the first generate() failed every request of the call with "'int' object has no attribute
    # 'decode'" from inside the step
    model = _load(path)
    with pytest.raises(ValueError, match="tokenizer must be"):
        LLM(model, tokenizer=tokenizer)
    assert not hasattr(model, "_fastllm_state")  # refused before the model was optimized


def test_numpy_numbers_are_taken_as_python_numbers():
    # temperature=np.float32(0.7) was refused as "temperature must be >= 0 (0 = greedy) and finite, got
    # np.float32(0.7)", and max_tokens=np.int64(8) likewise; numpy's bool and NaN stay refused
    params = SamplingParams(temperature=np.float32(0.5), top_p=np.float32(0.9), max_tokens=np.int64(8), n=np.int32(2),
                            top_k=np.int64(5), seed=np.uint64(2**64 - 1), stop_token_ids=np.array([3]))
    assert (params.temperature, params.top_p, params.max_tokens, params.n, params.top_k, params.seed) == \
        (0.5, pytest.approx(0.9), 8, 2, 5, 2**64 - 1)
    assert type(params.max_tokens) is int and type(params.temperature) is float and params.stop_token_ids == [3]
    assert type(params.stop_token_ids[0]) is int
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=np.bool_(True))
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=np.bool_(True))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=np.float32("nan"))


def test_optimize_config_takes_numpy_numbers():
    # max_num_seqs=np.int64(8) was refused as "max_num_seqs must be a positive integer, got np.int64(8)"
    config = fastllm.OptimizeConfig(max_num_seqs=np.int64(8), max_model_len=np.int32(64), block_size=np.int64(16),
                                    kv_cache_memory_fraction=np.float32(0.5))
    assert (config.max_num_seqs, config.max_model_len, config.block_size) == (8, 64, 16)
    assert type(config.max_num_seqs) is int and type(config.kv_cache_memory_fraction) is float
    with pytest.raises(ValueError, match="max_num_seqs"):
        fastllm.OptimizeConfig(max_num_seqs=np.bool_(True))
    with pytest.raises(ValueError, match="kv_cache_memory_fraction"):
        fastllm.OptimizeConfig(kv_cache_memory_fraction=np.float32("nan"))


def test_llm_over_an_optimized_model_checks_its_scheduling_options_as_optimize_does(path):
    # These went to the engine core unchecked by OptimizeConfig: np.int64(4) was refused ("must be an integer >= 1,
    # got np.int64(4)") and 10**20 taken
    model = optimize(_load(path))
    with LLM(model, max_num_seqs=np.int64(4)) as llm:
        assert llm.engine_options["max_num_seqs"] == 4 and type(llm.engine_options["max_num_seqs"]) is int
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)[0]
        assert out.error is None and len(out.outputs[0].token_ids) == 2
    with pytest.raises(ValueError, match=r"max_num_batched_tokens must be a positive integer.*2\*\*31 - 1"):
        LLM(model, max_num_batched_tokens=10**20)


def test_a_kv_cache_the_device_cannot_hold_is_refused_naming_num_kv_tokens(path, tmp_path, capsys):
    # num_kv_tokens=10**12 (~0.5 PB here) ended in the allocator's RuntimeError (and, through `fastllm serve`, in a
    # traceback); now a ValueError names the number, the cache's size and what to do, and serve prints one line
    # (before it listens: the port is never bound)
    with pytest.raises(ValueError, match=r"num_kv_tokens=1000000000000: its KV cache .* could not be allocated") as e:
        LLM(_load(path), num_kv_tokens=10**12, device="cpu")
    assert isinstance(e.value, RuntimeError)  # still what the allocator raised, for callers that catch that
    from tests._server import tiny_model_dir

    served = tiny_model_dir(tmp_path / "served")  # serve needs a tokenizer beside the weights
    code = main(["serve", str(served), "--num-kv-tokens", str(10**12), "--device", "cpu", "--port", "8765"])
    err = capsys.readouterr().err
    assert code == 2 and "num_kv_tokens=1000000000000" in err and "Traceback" not in err, err


def test_max_num_seqs_past_the_kv_cache_blocks_is_capped_there(path):
    # max_num_seqs=10**9 was taken as given: ~40 s and 8 GB of host buffers and decode buckets for sequences that can
    # never run at once (each running sequence holds a KV block at least; this cache has 8)
    with LLM(str(path), num_kv_tokens=128, block_size=16, max_num_seqs=10**6) as llm:
        assert llm.engine_options["max_num_seqs"] == llm.scheduler.max_num_seqs == 8
        assert llm.runner.max_num_seqs == 8 and llm.runner.feed.numel() < 10**5
        outs = llm.generate([[1, 2, 3]] * 12, SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
        assert all(o.error is None and len(o.outputs[0].token_ids) == 3 for o in outs)
        with LLM(llm.model, max_num_seqs=20) as other:  # a later LLM's option too
            assert other.engine_options["max_num_seqs"] == 8


def test_max_num_batched_tokens_past_the_kv_cache_slots_is_capped_there(path):
    # max_num_batched_tokens=10**9 allocated a feed buffer of 10**9 token ids (8 GB, 13 s) for a cache of 128 tokens:
    # a step's computed tokens each take a KV slot
    with LLM(str(path), num_kv_tokens=128, block_size=16, max_num_batched_tokens=10**9) as llm:
        assert llm.engine_options["max_num_batched_tokens"] == llm.runner.max_num_batched_tokens == 128
        assert llm.runner.feed.numel() < 10**5
        outs = llm.generate([[1, 2, 3]] * 3 + [list(range(1, 101))], SamplingParams(max_tokens=3, temperature=0),
                            use_tqdm=False)
        assert all(o.error is None and len(o.outputs[0].token_ids) == 3 for o in outs)


def test_generate_takes_top_p_zero_as_hf_does(models):
    # HF's top-p range is [0, 1] and at 0 it keeps the most likely token alone; generate() refused it as
    # "top_p must be in (0, 1]" (SamplingParams' range, vLLM's)
    model, reference = models
    ids = torch.tensor([[5, 9, 2, 7]])
    kwargs = dict(max_new_tokens=6, do_sample=True, top_p=0.0, pad_token_id=0)
    torch.manual_seed(1)
    expected = reference.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, **kwargs), expected)
    assert torch.equal(expected, reference.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, max_new_tokens=3, do_sample=True, top_p=-0.1, pad_token_id=0)


@pytest.mark.parametrize("stop_strings", ["", []])
def test_generate_asks_for_the_tokenizer_whenever_stop_strings_is_given(models, stop_strings):
    # HF raises for stop_strings without a tokenizer even when they are empty; generate() went ahead and ignored them
    model, reference = models
    ids = torch.tensor([[5, 9, 2, 7]])
    with pytest.raises(ValueError, match="could not locate a tokenizer"):
        reference.generate(ids, max_new_tokens=3, pad_token_id=0, stop_strings=stop_strings)
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        model.generate(ids, max_new_tokens=3, pad_token_id=0, stop_strings=stop_strings)


def test_a_start_up_step_too_large_for_the_device_names_max_num_batched_tokens(path, monkeypatch):
    # On a GPU the KV cache is sized after one eager step of max_num_batched_tokens tokens; max_num_batched_tokens=10**9
    # ended in the allocator's OutOfMemoryError (the measurement runs only on CUDA: simulated here)
    from fastllm.runtime import model_runner

    def out_of_memory(self, num_blocks, max_model_len):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.45 GiB")

    monkeypatch.setattr(model_runner.ModelRunner, "_measures_memory", property(lambda self: True))
    monkeypatch.setattr(model_runner.ModelRunner, "_measure_activations", out_of_memory)
    with pytest.raises(model_runner.StepTooLarge, match=r"max_num_batched_tokens=1000000000: a step of that many "
                                                        r"tokens does not fit .*Tried to allocate 7.45 GiB") as error:
        LLM(str(path), max_num_batched_tokens=10**9)
    assert isinstance(error.value, ValueError) and isinstance(error.value, torch.OutOfMemoryError)


def test_the_start_up_activation_measurement_runs_its_step(path, monkeypatch):
    # The measurement (CUDA only) ran its step before the runner had its token feed: every GPU start-up ended in
    # "'ModelRunner' object has no attribute 'feed'". Here the real step runs on the CPU, CUDA's counters stubbed.
    from fastllm.runtime import model_runner

    measured = []
    real_measure = model_runner.ModelRunner._measure_activations

    def measure(self, num_blocks, max_model_len):
        measured.append(real_measure(self, num_blocks, max_model_len))
        return measured[-1]

    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *args, **kwargs: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args, **kwargs: 0)
    monkeypatch.setattr(model_runner.ModelRunner, "_measures_memory", property(lambda self: True))
    monkeypatch.setattr(model_runner.ModelRunner, "_measure_activations", measure)
    llm = LLM(str(path), max_num_batched_tokens=64, num_kv_tokens=256)
    assert measured == [0]  # the step ran to its end (the stubbed counters read 0)
    out = llm.generate([[5, 9, 2, 7]], SamplingParams(max_tokens=3))
    assert len(out[0].outputs[0].token_ids) == 3
