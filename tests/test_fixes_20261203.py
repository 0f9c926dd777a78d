"""Fixes of 2026-12-03, one test per defect (found by a bug hunt over the engine API and the server):

- `LLM` matched stop strings against the text with special tokens spelled out, but returns (and streams) the text
  decoded with skip_special_tokens: a stop string whose pieces a special token separated was never caught, and the
  returned text held it (finish_reason "length"). `generate()` keeps matching the spelled-out text, as Hugging Face's
  StopStringCriteria does.
- Triton `generate` / `generate_stream`: a lone surrogate in `text_input` (or in a word list) was a 500 (the
  tokenizer's TypeError); now a 400 naming the input, as the OpenAI routes answer.
- OpenAI routes refused an explicit null for `n`, `stream` and chat `logprobs`, which OpenAI types "... or null"
  (null: the default).
- Chat `max_completion_tokens: 0` was refused with a message naming `max_tokens`.

Text tests run a tiny Llama over the demo tokenizer whose weights are rigged into a "chain" (its greedy next token is
a fixed function of the last one); server tests call the app in process through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

import fastllm
from fastllm import LLM, SamplingParams
from fastllm.serve.engine import ServingEngine
from tests._models import build, build_over_demo_tokenizer, chain_model

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from fastllm.serve.app import build_app  # noqa: E402
from tests._server import tiny_model_dir  # noqa: E402

# --------------------------------------------------------------------------------- stop strings and special tokens


@pytest.fixture(scope="module")
def saved_over_demo_tokenizer(tmp_path_factory):
    return build_over_demo_tokenizer(tmp_path_factory.mktemp("special_chain"))


@pytest.fixture
def special_chain(saved_over_demo_tokenizer):
    """(model, tokenizer, a), a fresh model each test: greedy decoding from [a] gives <|im_start|> b a <|im_start|>
    b a ... (in text, with special tokens skipped: "baba...": the stop string "ab" is there, split by a special
    token)."""
    tokenizer, path = saved_over_demo_tokenizer
    a, b = (tokenizer(t, add_special_tokens=False).input_ids[0] for t in ("a", "b"))
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert special in tokenizer.all_special_ids
    return chain_model(path, {a: special, special: b, b: a}), tokenizer, a


def test_llm_stops_at_a_stop_string_that_a_special_token_splits(special_chain):
    model, tokenizer, a = special_chain
    llm = LLM(model, tokenizer=tokenizer, max_model_len=64)
    try:
        out = llm.generate([[a]], SamplingParams(max_tokens=8, temperature=0, stop=["ab"]), use_tqdm=False)[0]
    finally:
        llm.close()
    completion = out.outputs[0]
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    b = completion.token_ids[1]
    # Before the fix: 8 tokens, text "babab", finish_reason "length" (the raw text "<|im_start|>ba<|im_start|>b"
    # never holds "ab").
    assert completion.token_ids == [special, b, a, special, b]  # stopped at the token that completes "ab"
    assert completion.finish_reason == "stop"
    assert completion.text == "b"  # cut before the stop string, in the text returned
    assert tokenizer.decode(completion.token_ids, skip_special_tokens=True) == "bab"


def test_a_special_token_alone_completes_no_stop_string(special_chain):
    # The stop string is the special token's own spelling: with skip_special_tokens it is never in the text (as in
    # vLLM; stop_token_ids is how to stop at it), so the completion runs to its length.
    model, tokenizer, a = special_chain
    llm = LLM(model, tokenizer=tokenizer, max_model_len=64)
    try:
        out = llm.generate([[a]], SamplingParams(max_tokens=6, temperature=0, stop=["<|im_start|>"]),
                           use_tqdm=False)[0]
    finally:
        llm.close()
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 6
    assert out.outputs[0].text == "baba"


def test_generate_matches_stop_strings_as_hugging_face_does(special_chain, tmp_path):
    # Hugging Face's StopStringCriteria reads the vocabulary's token strings, special ones included: "ab" split by
    # <|im_start|> does not stop it, and "<|im_start|>b" does. generate() on the runtime stops where it stops.
    model, tokenizer, a = special_chain
    ids = torch.tensor([[a]])
    kwargs = dict(max_new_tokens=7, do_sample=False, pad_token_id=0, eos_token_id=None, tokenizer=tokenizer)
    expected = {stop: model.generate(ids, stop_strings=[stop], **kwargs)[0].tolist()
                for stop in ("ab", "<|im_start|>b")}
    assert len(expected["ab"]) == 8 and len(expected["<|im_start|>b"]) == 3
    fastllm.optimize(model, cpu_runtime=True)
    try:
        for stop, tokens in expected.items():
            assert model.generate(ids, stop_strings=[stop], **kwargs)[0].tolist() == tokens, stop
    finally:
        fastllm.release(model)


# ----------------------------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    serving = ServingEngine(LLM(str(tiny_model_dir(tmp_path_factory.mktemp("server"))), dtype=torch.float32,
                                max_model_len=64), 8)
    yield build_app(serving, "tiny")
    serving.shutdown()


def _post(app, path: str, body: dict) -> httpx.Response:
    """POST `body` as JSON; json.dumps escapes a lone surrogate as JSON allows ("\\ud800"), where httpx's json=
    cannot encode it."""
    async def call():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"},
                                     timeout=60)

    return asyncio.run(call())


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
@pytest.mark.parametrize("field, value", [("text_input", "Hi \ud800"), ("bad_words", ["\udfff"]),
                                          ("stop_words", "x\ud800")])
def test_triton_generate_answers_400_for_a_lone_surrogate(app, route, field, value):
    body = {"text_input": "Hi", "max_tokens": 3, field: value}
    response = _post(app, f"/v2/models/tiny/{route}", body)
    assert response.status_code == 400, response.text  # was a 500 (the tokenizer's TypeError) for text_input
    assert field in response.json()["error"] and "lone surrogate" in response.json()["error"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
])
def test_openai_null_n_stream_and_logprobs_are_their_defaults(app, path, body):
    nulls = {"n": None, "stream": None, "logprobs": None}
    response = _post(app, path, {"model": "tiny", "max_tokens": 2, **body, **nulls})
    assert response.status_code == 200, response.text  # was 400 "n: Input should be a valid integer"
    answer = response.json()
    assert len(answer["choices"]) == 1 and answer["choices"][0]["logprobs"] is None
    assert answer["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_chat_max_tokens_error_names_the_field_given(app, field):
    response = _post(app, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                                   field: 0})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == f"{field} must be an integer >= 1, got 0"
    too_many = _post(app, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                                   field: 10_000})
    assert too_many.status_code == 400 and too_many.json()["error"]["message"].endswith(f"the prompt or {field}.")


# ------------------------------------------------------------------------- Hugging Face's surface (a second hunt)
# The optimized model against Hugging Face eager on the same weights, both loaded from one saved tiny Llama; calls run
# fastllm's runtime on the CPU (cpu_runtime=True), where the CPU's default would hand them to HF's own path.


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_surface")
    build("llama", path)
    return path


def _pair(path):
    """(optimized, reference): the saved model loaded twice, the first optimized on fastllm's CPU runtime."""
    from transformers import AutoModelForCausalLM

    optimized, reference = (AutoModelForCausalLM.from_pretrained(path).eval() for _ in range(2))
    fastllm.optimize(optimized, cpu_runtime=True)
    return optimized, reference


IDS = torch.tensor([[5, 17, 99, 3, 42, 7]])


@pytest.mark.parametrize("replace", ["new parameter", "load_state_dict(assign=True)", "half and back"])
def test_a_weight_replaced_after_optimize_is_refused_not_ignored(saved_llama, replace):
    # Symptom: the compiled step kept reading the tensors it was compiled with: after `o_proj.weight =
    # nn.Parameter(...)` or load_state_dict(assign=True) the logits were up to 4.4 away from HF's on the same weights,
    # with no error; `model.half().float()` passed the device/dtype check and ran the pre-cast weights.
    optimized, reference = _pair(saved_llama)
    with torch.no_grad():
        assert torch.allclose(optimized(IDS).logits, reference(IDS).logits, atol=1e-5)
        if replace == "new parameter":
            layer = optimized.model.layers[0].self_attn
            layer.o_proj.weight = torch.nn.Parameter(layer.o_proj.weight * 2)
        elif replace == "load_state_dict(assign=True)":
            optimized.load_state_dict({k: v.clone() for k, v in reference.state_dict().items()}, assign=True)
        else:
            optimized.half().float()
        with pytest.raises(RuntimeError, match="replaced by another tensor after fastllm.optimize"):
            optimized(IDS)
        with pytest.raises(RuntimeError, match=r"fastllm.release\(model\) and optimize it again"):
            optimized.generate(IDS, max_new_tokens=2, do_sample=False)
    fastllm.release(optimized)  # what the message says: then it runs, and equals HF on the weights it now has
    fastllm.optimize(optimized, cpu_runtime=True)
    if replace == "new parameter":
        reference.model.layers[0].self_attn.o_proj.weight.data.mul_(2)
    elif replace == "half and back":
        reference.half().float()  # (the weights were rounded to fp16 on the way)
    with torch.no_grad():
        assert torch.allclose(optimized(IDS).logits, reference(IDS).logits, atol=1e-5)


def test_weights_updated_in_place_still_reach_the_step(saved_llama):
    optimized, reference = _pair(saved_llama)
    with torch.no_grad():
        for model in (optimized, reference):
            model.model.layers[1].mlp.down_proj.weight.mul_(3)
        optimized.load_state_dict(reference.state_dict())  # (copies into the tensors the step reads)
        assert torch.allclose(optimized(IDS).logits, reference(IDS).logits, atol=1e-5)
    assert optimized._fastllm_state.forward_routes["compiled"] == 1


def test_packed_sequences_in_one_row_score_as_hugging_face_does(saved_llama):
    # Symptom: model(ids, position_ids=[[0, 1, 2, 3, 0, 1, 2, 3]], use_cache=False) let the second sequence attend to
    # the first (1.38 from HF's logits), where transformers 5 keeps each run of positions to itself.
    optimized, reference = _pair(saved_llama)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 9]])
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with torch.no_grad():
        ours = optimized(ids, position_ids=packed, use_cache=False).logits
        theirs = reference(ids, position_ids=packed, use_cache=False).logits
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert torch.allclose(theirs[0, 4:], reference(ids[:, 4:], use_cache=False).logits[0], atol=1e-5)
        # one sequence's positions (no restart) stay on the compiled step
        assert torch.allclose(optimized(ids, position_ids=torch.arange(3, 11)[None], use_cache=False).logits,
                              reference(ids, position_ids=torch.arange(3, 11)[None], use_cache=False).logits,
                              atol=1e-5)
    assert dict(optimized._fastllm_state.forward_routes) == {"eager": 1, "compiled": 1}


@pytest.mark.parametrize("keep", [-2, 3])
def test_logits_to_keep_follows_hugging_face(saved_llama, keep):
    optimized, reference = _pair(saved_llama)
    with torch.no_grad():
        ours, theirs = optimized(IDS, logits_to_keep=keep).logits, reference(IDS, logits_to_keep=keep).logits
    assert ours.shape == theirs.shape and theirs.shape[1] == (4 if keep == -2 else 3)  # -2: slice(2, None)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_sampling_from_nan_scores_fails_that_request_alone(saved_llama):
    # Symptom: generate(do_sample=True) with a NaN logit returned token 0 every step (argmax ranks NaN first); HF
    # raises. In one LLM batch the greedy request (HF's argmax takes the NaN's index too) completes.
    optimized, reference = _pair(saved_llama)
    with torch.no_grad():
        for model in (optimized, reference):
            model.lm_head.weight[7] = float("nan")
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        reference.generate(IDS, max_new_tokens=3, do_sample=True)
    with pytest.raises(RuntimeError, match="sampling failed: the next-token distribution is not a number"):
        optimized.generate(IDS, max_new_tokens=3, do_sample=True)
    greedy = optimized.generate(IDS, max_new_tokens=3, do_sample=False)
    assert greedy.tolist() == reference.generate(IDS, max_new_tokens=3, do_sample=False).tolist()
    for async_scheduling in (True, False):  # (the sampled token reaches the host a step late, or at once)
        llm = LLM(optimized, async_scheduling=async_scheduling)
        try:
            outs = llm.generate([IDS[0].tolist()] * 2, [SamplingParams(max_tokens=3, temperature=0),
                                                        SamplingParams(max_tokens=3, temperature=1.0, seed=1)],
                                use_tqdm=False)
        finally:
            llm.close()
        assert outs[0].outputs[0].token_ids == greedy[0, IDS.shape[1]:].tolist() and outs[0].error is None
        assert outs[1].finished and outs[1].outputs[0].finish_reason == "abort"
        assert outs[1].error.startswith("sampling failed") and -1 not in outs[1].outputs[0].token_ids


@pytest.mark.parametrize("eos", [np.int64(36), 36.0, torch.tensor([36])], ids=["numpy", "whole float", "tensor"])
def test_eos_token_id_as_numpy_or_whole_float_is_taken(saved_llama, eos):
    optimized, reference = _pair(saved_llama)  # (a numpy integer crashed: "'numpy.int64' object is not iterable")
    kwargs = dict(max_new_tokens=4, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert optimized.generate(IDS, **kwargs).tolist() == reference.generate(IDS, **kwargs).tolist()


@pytest.mark.parametrize("kwargs, message", [
    (dict(eos_token_id=[]), "eos_token_id is an empty list"),
    (dict(eos_token_id="2"), "eos_token_id must be a token id"),
    (dict(eos_token_id=[2.5]), "eos_token_id must be a token id"),
    (dict(do_sample=True, top_k=np.int64(-1)), "top_k must be a positive integer"),
])
def test_bad_token_ids_and_numpy_sampling_numbers_are_refused_clearly(saved_llama, kwargs, message):
    optimized, _ = _pair(saved_llama)
    with pytest.raises(ValueError, match=message):
        optimized.generate(IDS, max_new_tokens=2, **{"do_sample": False, "pad_token_id": 0, **kwargs})


def test_numpy_top_p_above_one_is_taken_as_hf_takes_it(saved_llama):
    optimized, _ = _pair(saved_llama)  # (np.float64(1.5) was refused where 1.5 is taken: HF filters nothing above 1)
    out = optimized.generate(IDS, max_new_tokens=2, do_sample=True, top_p=np.float64(1.5), pad_token_id=0)
    assert out.shape == (1, IDS.shape[1] + 2)


def test_a_negative_pad_token_id_is_refused_where_a_row_is_padded(saved_llama):
    # Symptom: the rows that stopped early came back padded with -5. Hugging Face fails there (the pad's embedding);
    # a negative pad that is never written (one row, LLaMA-1's configs' -1) runs as in HF.
    optimized, reference = _pair(saved_llama)
    first = reference.generate(IDS, max_new_tokens=1, do_sample=False)[0, -1].item()
    batch = torch.cat([IDS, torch.tensor([[9, 8, 7, 6, 5, 4]])])
    with pytest.raises(ValueError, match="pad_token_id=-5 is negative"):
        optimized.generate(batch, max_new_tokens=3, do_sample=False, eos_token_id=first, pad_token_id=-5,
                           attention_mask=torch.ones_like(batch))
    kwargs = dict(max_new_tokens=3, do_sample=False, eos_token_id=first, pad_token_id=-1)
    assert optimized.generate(IDS, **kwargs).tolist() == reference.generate(IDS, **kwargs).tolist()


def test_a_streamers_own_exception_comes_through_as_itself(saved_llama):
    class Stop(Exception):
        pass

    class StopAtFirstToken:
        def put(self, value):
            if value.dim() == 1:  # (the prompt comes first, as a [1, length] tensor)
                raise Stop("the user pressed stop")

        def end(self):
            pass

    optimized, reference = _pair(saved_llama)
    for model in (reference, optimized):  # was RuntimeError("Stop: the user pressed stop") from fastllm
        with pytest.raises(Stop, match="the user pressed stop"):
            model.generate(IDS, max_new_tokens=3, do_sample=False, streamer=StopAtFirstToken())
    assert optimized.generate(IDS, max_new_tokens=2, do_sample=False).shape == (1, IDS.shape[1] + 2)


def test_a_huge_block_size_is_refused_naming_it():
    # Symptom: accepted, then the allocator failed ("can't allocate memory: ... 512000000000 bytes"), naming nothing
    from fastllm.config import MAX_BLOCK_SIZE, OptimizeConfig

    with pytest.raises(ValueError, match=f"block_size must be a positive integer of at most {MAX_BLOCK_SIZE}"):
        OptimizeConfig(block_size=10**9)
    assert OptimizeConfig(block_size=MAX_BLOCK_SIZE).block_size == MAX_BLOCK_SIZE


def test_a_length_past_the_kv_cache_names_what_caps_it(saved_llama):
    # Symptom: "exceeds the model's context of 16384 tokens" where 16384 was the KV cache's cap, not the model's
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(saved_llama).eval()
    fastllm.optimize(model, cpu_runtime=True, num_kv_tokens=64)
    with pytest.raises(ValueError, match="exceeds the context of 64 tokens a sequence can have here .*num_kv_tokens"):
        model.generate(IDS, max_new_tokens=100, do_sample=False, pad_token_id=0)


def test_a_tensor_added_after_optimize_is_named_as_added(saved_llama):
    optimized, _ = _pair(saved_llama)
    optimized.model.layers[0].register_buffer("adapter_scale", torch.ones(1))  # (e.g. an adapter attached later)
    with pytest.raises(RuntimeError, match="its model.layers.0.adapter_scale was added after fastllm.optimize"):
        optimized(IDS)
