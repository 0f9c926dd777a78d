"""The Triton / KServe v2 routes against a real `fastllm serve` process: tritonclient's own calls (binary and JSON
tensors, both ways), generate and generate_stream, every text checked against `LLM.generate` on the same model; the
errors a client can cause, each a 4xx in the v2 shape with the server healthy after it."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

# The serve extra's client libraries: a machine without them (a GPU box running `pytest -m gpu`) skips this file, as
# test_serve_openai does, instead of failing the whole run's collection.
httpclient = pytest.importorskip("tritonclient.http")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from tritonclient.utils import InferenceServerException, serialize_byte_tensor  # noqa: E402

import fastllm  # noqa: E402
from fastllm.serve.triton_tensors import encode_infer_response, parse_infer_request  # noqa: E402
from tests._server import running_server, tiny_model_dir  # noqa: E402

PROMPTS = ["Hello there", "The capital of France is"]
MAX_TOKENS = 8
# Two running, none queued: a batch of two fills the server, so the 503 test can fill it on purpose.
SERVER_ARGS = ("--max-num-seqs", "2", "--max-queue", "0")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir, *SERVER_ARGS) as server:
        yield server


@pytest.fixture(scope="module")
def reference(model_dir):
    """`LLM.generate` on the model, built as `fastllm serve` builds it (fp32 on the CPU, same scheduling): greedy text
    of one prompt with extra SamplingParams fields."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    llm = fastllm.LLM(model, tokenizer=tokenizer, max_num_seqs=2)

    def generate(prompt: str, max_tokens: int = MAX_TOKENS, **fields) -> str:
        params = fastllm.SamplingParams(**{"temperature": 0, "max_tokens": max_tokens, **fields})
        return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text

    yield generate
    llm.close()


@pytest.fixture(scope="module")
def client(server):
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")


def _seed_inputs(prompt: str, max_tokens: int, *, binary_data: bool, bad_words: str = "", stop_words: str = ""):
    """The seed's client example's inputs, with chosen values and `binary_data`."""
    inputs = [httpclient.InferInput("text_input", [1, 1], "BYTES"),
              httpclient.InferInput("max_tokens", [1, 1], "INT32"),
              httpclient.InferInput("bad_words", [1, 1], "BYTES"),
              httpclient.InferInput("stop_words", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[prompt]], dtype=object), binary_data=binary_data)
    inputs[1].set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32), binary_data=binary_data)
    inputs[2].set_data_from_numpy(np.array([[bad_words]], dtype=object), binary_data=binary_data)
    inputs[3].set_data_from_numpy(np.array([[stop_words]], dtype=object), binary_data=binary_data)
    return inputs


def _generate(server, body: dict, route: str = "generate") -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/ensemble/{route}", json=body, timeout=60)


def _stream(server, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}/v2/models/ensemble/generate_stream", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]


# ------------------------------------------------------------------------------------- tensor codec, no server

CODEC_TENSORS = [  # (datatype, numpy array): every element format the binary extension can carry here
    ("BOOL", np.array([[True], [False]])), ("INT8", np.array([[-3]], dtype=np.int8)),
    ("UINT16", np.array([[65535]], dtype=np.uint16)), ("INT32", np.array([[-7, 9]], dtype=np.int32)),
    ("UINT64", np.array([[2**64 - 1]], dtype=np.uint64)), ("INT64", np.array([[-(2**63)]], dtype=np.int64)),
    ("FP16", np.array([[0.5]], dtype=np.float16)), ("FP32", np.array([[0.1, -2.5]], dtype=np.float32)),
    ("FP64", np.array([[1e-300]], dtype=np.float64)),
    ("BYTES", np.array([["héllo".encode()], [b""]], dtype=object)),
]


@pytest.mark.parametrize("datatype, array", CODEC_TENSORS, ids=[c[0] for c in CODEC_TENSORS])
def test_codec_reads_and_writes_what_tritonclient_does(datatype, array):
    """Raw bytes as tritonclient lays them out (serialize_byte_tensor, numpy's little-endian bytes) parse to the same
    values, and a binary response parses back in tritonclient's InferResult to the same array."""
    raw = serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()  # as set_data_from_numpy
    head = json.dumps({"inputs": [{"name": "x", "shape": list(array.shape), "datatype": datatype,
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    (tensor,) = parse_infer_request(head + raw, str(len(head))).inputs
    assert tensor.shape == list(array.shape) and tensor.values == array.flatten().tolist()
    for binary in (True, False):
        if datatype == "BYTES" and not binary:
            continue  # JSON carries BYTES as UTF-8 text; b"" and "héllo" would come back as str
        body, header_length = encode_infer_response("m", "1", None, [(tensor, binary)])
        result = httpclient.InferResult.from_response_body(body, header_length=header_length)
        np.testing.assert_array_equal(result.as_numpy("x"), array)


# ------------------------------------------------------------------------------------------------ tritonclient


def test_seed_example_as_given(server, reference):
    """The seed's example exactly: set_data_from_numpy's defaults, no outputs named, output read with as_numpy."""
    # The seed's lines verbatim (the URL aside), long line included.
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    inputs = [httpclient.InferInput("text_input", [1, 1], "BYTES"), httpclient.InferInput("max_tokens", [1, 1], "INT32"),  # noqa: E501
              httpclient.InferInput("bad_words", [1, 1], "BYTES"), httpclient.InferInput("stop_words", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[PROMPTS[0].encode()]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[MAX_TOKENS]], dtype=np.int32))
    inputs[2].set_data_from_numpy(np.array([[b""]], dtype=object))
    inputs[3].set_data_from_numpy(np.array([[b""]], dtype=object))
    result = client.infer("ensemble", inputs)
    text = result.as_numpy("text_output")
    assert text.shape == (1, 1)
    assert text[0, 0].decode() == reference(PROMPTS[0])


@pytest.mark.parametrize("binary_inputs", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_output", [None, True, False], ids=["default-out", "binary-out", "json-out"])
def test_infer_tensor_encodings(client, reference, binary_inputs, binary_output):
    """Every pairing of input and output encoding gives the same text; tritonclient's default (no outputs named) asks
    for binary outputs, and the reply honours what was asked."""
    outputs = None if binary_output is None else [httpclient.InferRequestedOutput("text_output", binary_output)]
    result = client.infer("ensemble", _seed_inputs(PROMPTS[1], MAX_TOKENS, binary_data=binary_inputs),
                          outputs=outputs)
    (output,) = result.get_response()["outputs"]
    assert ("parameters" in output) == (binary_output is not False)
    text = result.as_numpy("text_output")[0, 0]
    assert (text.decode() if isinstance(text, bytes) else text) == reference(PROMPTS[1])


def test_infer_batch_rows_are_requests(client, reference):
    """A batch of two: each row its own request (its own prompt and max_tokens), answered in row order."""
    text = httpclient.InferInput("text_input", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[p] for p in PROMPTS], dtype=object))
    max_tokens = httpclient.InferInput("max_tokens", [2, 1], "INT32")
    max_tokens.set_data_from_numpy(np.array([[5], [MAX_TOKENS]], dtype=np.int32))
    result = client.infer("tiny", [text, max_tokens], model_version="1")
    assert [t.decode() for t in result.as_numpy("text_output")[:, 0]] == [reference(PROMPTS[0], 5),
                                                                         reference(PROMPTS[1])]


def test_infer_stop_and_bad_words(client, reference):
    full = reference(PROMPTS[0])
    words = full.split()
    stopped = client.infer("ensemble", _seed_inputs(PROMPTS[0], MAX_TOKENS, binary_data=True, stop_words=words[2]))
    text = stopped.as_numpy("text_output")[0, 0].decode()
    assert text == reference(PROMPTS[0], stop=[words[2]])
    assert full.startswith(text) and words[2] not in text and len(text) < len(full)
    banned = client.infer("ensemble", _seed_inputs(PROMPTS[0], MAX_TOKENS, binary_data=False, bad_words=words[0]))
    text = banned.as_numpy("text_output")[0, 0].decode()
    assert text == reference(PROMPTS[0], bad_words=[words[0]]) and words[0] not in text


def test_exclude_input_in_output_false_echoes_the_prompt(client, server, reference):
    inputs = _seed_inputs(PROMPTS[0], MAX_TOKENS, binary_data=True)
    echo = httpclient.InferInput("exclude_input_in_output", [1, 1], "BOOL")
    echo.set_data_from_numpy(np.array([[False]]))
    result = client.infer("ensemble", [*inputs, echo])
    assert result.as_numpy("text_output")[0, 0].decode() == PROMPTS[0] + reference(PROMPTS[0])
    body = {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS, "exclude_input_in_output": False}
    assert "".join(e["text_output"] for e in _stream(server, body)) == PROMPTS[0] + reference(PROMPTS[0])


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("ensemble") and client.is_model_ready("tiny", model_version="1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("tiny", model_version="2")
    server = client.get_server_metadata()
    assert server["name"] == "fastllm" and "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata("ensemble")
    inputs = {i["name"]: i for i in model["inputs"]}
    assert model["versions"] == ["1"]
    assert inputs["text_input"]["datatype"] == "BYTES" and inputs["max_tokens"]["datatype"] == "INT32"
    assert {"bad_words", "stop_words", "temperature", "random_seed"} <= set(inputs)
    assert model["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1, 1]}]
    assert client.get_model_config("ensemble")["max_batch_size"] == 2
    with pytest.raises(InferenceServerException, match="nope"):
        client.get_model_metadata("nope")


# ---------------------------------------------------------------------------------------------------- generate


def test_generate_and_stream_match_llm(server, reference):
    body = {"text_input": PROMPTS[1], "max_tokens": MAX_TOKENS, "bad_words": "", "stop_words": ""}
    answer = _generate(server, body).json()
    assert answer == {"model_name": "ensemble", "model_version": "1", "text_output": reference(PROMPTS[1])}
    events = _stream(server, {**body, "stream": True})
    assert len(events) > 1 and all(e["model_name"] == "ensemble" for e in events)
    assert "".join(e["text_output"] for e in events) == answer["text_output"]
    (whole,) = _stream(server, {**body, "stream": False})  # Triton's rule: not streaming, one response
    assert whole["text_output"] == answer["text_output"]


def test_generate_stop_words_and_sampling_fields(server, reference):
    words = reference(PROMPTS[0]).split()
    body = {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS, "stop_words": [words[1]], "bad_words": [words[0]]}
    expected = reference(PROMPTS[0], stop=[words[1]], bad_words=[words[0]])
    assert _generate(server, body).json()["text_output"] == expected
    assert "".join(e["text_output"] for e in _stream(server, body)) == expected
    # Seeded sampling is reproducible, and vLLM-backend clients' `parameters` count as inputs.
    sampled = {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS,
               "parameters": {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "random_seed": 7}}
    first, second = (_generate(server, sampled).json()["text_output"] for _ in range(2))
    assert first == second == reference(PROMPTS[0], temperature=0.9, top_k=20, top_p=0.9, seed=7)
    # top_k 1 is greedy whatever the temperature (TensorRT-LLM's rule).
    greedy = {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 5.0, "top_k": 1}
    assert _generate(server, greedy).json()["text_output"] == reference(PROMPTS[0])


# ------------------------------------------------------------------------------------------------------ errors


def _post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=60, **kwargs)


GOOD = {"text_input": "Hi", "max_tokens": 4}
GENERATE_ERRORS = [
    ("/v2/models/nope/generate", {"json": GOOD}, 404, "nope"),
    ("/v2/models/tiny/versions/2/generate", {"json": GOOD}, 404, "version"),
    ("/v2/models/tiny/generate", {"json": {**GOOD, "beam_width": 2}}, 400, "'beam_width'"),
    ("/v2/models/tiny/generate", {"json": {**GOOD, "parameters": {"foo": 1}}}, 400, "'foo'"),
    ("/v2/models/tiny/generate", {"json": {**GOOD, "max_tokens": 0}}, 400, "max_tokens"),
    ("/v2/models/tiny/generate", {"json": {**GOOD, "max_tokens": 10**6}}, 400, "maximum context length"),
    ("/v2/models/tiny/generate", {"json": {"text_input": "Hi"}}, 400, "'max_tokens' is required"),
    ("/v2/models/tiny/generate", {"json": {**GOOD, "max_tokens": "4"}}, 400, "'max_tokens' must be an integer"),
    ("/v2/models/tiny/generate", {"content": b'{"text_input": "Hi", "max_tokens": 4, "temperature": NaN}'},
     400, "temperature"),
    ("/v2/models/tiny/generate", {"json": {**GOOD, "top_p": 1.5}}, 400, "top_p"),
    ("/v2/models/tiny/generate", {"json": {**GOOD, "random_seed": -1}}, 400, "'random_seed'"),
    ("/v2/models/tiny/generate", {"json": {**GOOD, "text_input": 3}}, 400, "'text_input' must be a string"),
    ("/v2/models/tiny/generate", {"json": {**GOOD, "text_input": ""}}, 400, "text_input"),
    ("/v2/models/tiny/generate", {"json": {**GOOD, "stream": True}}, 400, "generate_stream"),
    ("/v2/models/tiny/generate", {"content": b"{not json"}, 400, "JSON"),
    ("/v2/models/tiny/generate_stream", {"json": {**GOOD, "min_length": -1}}, 400, "'min_length'"),
]


@pytest.mark.parametrize("path, request_kwargs, status, message", GENERATE_ERRORS,
                         ids=[f"{e[2]}-{e[3]}" for e in GENERATE_ERRORS])
def test_generate_errors(server, path, request_kwargs, status, message):
    response = _post(server, path, **request_kwargs)
    assert response.status_code == status
    assert set(response.json()) == {"error"} and message in response.json()["error"]
    assert server.healthy()


def _infer_body(inputs: list[dict], binary: bytes = b"", **head) -> dict:
    """httpx arguments of an infer call: JSON inputs, or JSON then `binary` with the binary header."""
    header = json.dumps({"inputs": inputs, **head}).encode()
    if not binary:
        return {"content": header}
    return {"content": header + binary, "headers": {"Inference-Header-Content-Length": str(len(header))}}


TEXT = {"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["Hi"]}
MAX = {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [4]}


def _raw_text(size: int) -> dict:
    """text_input [1, 1] whose data is `size` bytes after the JSON."""
    return {"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": size}}


INFER_ERRORS = [
    ("nope", _infer_body([TEXT, MAX]), 404, "nope"),
    ("unknown-input", _infer_body([TEXT, MAX, {**MAX, "name": "end_id"}]), 400, "'end_id'"),
    ("unknown-field", _infer_body([TEXT, MAX], priority=1), 400, "'priority'"),
    ("wrong-datatype", _infer_body([TEXT, {**MAX, "datatype": "FP32", "data": [4.0]}]), 400,
     "'max_tokens' has datatype FP32"),
    ("bytes-as-number", _infer_body([{**TEXT, "datatype": "INT32", "data": [1]}, MAX]), 400, "'text_input'"),
    ("value-not-datatype", _infer_body([TEXT, {**MAX, "data": ["4"]}]), 400, "'max_tokens'"),
    ("shape-vs-data", _infer_body([TEXT, {**MAX, "shape": [1, 2]}]), 400, "holds 2 elements"),
    ("batch-mismatch", _infer_body([{**TEXT, "shape": [2, 1], "data": ["a", "b"]}, MAX]), 400, "batch"),
    ("batch-over-max", _infer_body([{**TEXT, "shape": [3, 1], "data": ["a", "b", "c"]},
                                    {**MAX, "shape": [3, 1], "data": [4, 4, 4]}]), 400, "max_batch_size"),
    ("max-tokens-0", _infer_body([TEXT, {**MAX, "data": [0]}]), 400, "max_tokens"),
    ("unknown-output", _infer_body([TEXT, MAX], outputs=[{"name": "cum_log_probs"}]), 400, "cum_log_probs"),
    ("stream-true", _infer_body([TEXT, MAX, {"name": "stream", "shape": [1, 1], "datatype": "BOOL", "data": [True]}]),
     400, "generate_stream"),
    ("header-not-a-number", {"content": b'{"inputs": []}', "headers": {"Inference-Header-Content-Length": "abc"}},
     400, "Inference-Header-Content-Length"),
    ("header-past-body", {"content": b'{"inputs": []}', "headers": {"Inference-Header-Content-Length": "99"}},
     400, "Inference-Header-Content-Length"),
    ("header-cuts-json", {"content": b'{"inputs": []}', "headers": {"Inference-Header-Content-Length": "5"}},
     400, "JSON"),
    ("binary-size-past-body", _infer_body([_raw_text(40), MAX], b"\x02\x00\x00\x00Hi"), 400, "binary_data_size"),
    ("bytes-element-truncated", _infer_body([_raw_text(6), MAX], b"\x09\x00\x00\x00Hi"), 400, "BYTES element"),
    ("bytes-after-inputs", _infer_body([_raw_text(6), MAX], b"\x02\x00\x00\x00Hi!!"), 400, "after the inputs"),
    ("not-utf8", _infer_body([_raw_text(6), MAX], b"\x02\x00\x00\x00\xff\xfe"), 400, "UTF-8"),
]


@pytest.mark.parametrize("case, request_kwargs, status, message", INFER_ERRORS, ids=[e[0] for e in INFER_ERRORS])
def test_infer_errors(server, case, request_kwargs, status, message):
    model = "nope" if case == "nope" else "ensemble"
    response = _post(server, f"/v2/models/{model}/infer", **request_kwargs)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and message in response.json()["error"]
    assert server.healthy()


def test_tritonclient_sees_errors(client):
    """tritonclient raises the server's message: a FP32 max_tokens, a NaN temperature sent as raw FP32 bytes."""
    inputs = _seed_inputs("Hi", 4, binary_data=True)
    wrong = httpclient.InferInput("max_tokens", [1, 1], "FP32")
    wrong.set_data_from_numpy(np.array([[4.0]], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="'max_tokens' has datatype FP32") as error:
        client.infer("ensemble", [inputs[0], wrong])
    assert error.value.status() == "400"
    nan = httpclient.InferInput("temperature", [1, 1], "FP32")
    nan.set_data_from_numpy(np.array([[np.nan]], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="temperature must be"):
        client.infer("ensemble", [*inputs, nan])
    assert client.is_server_ready()


def test_full_server_answers_503_with_retry_after(server):
    """With every admission slot taken (one long stream, then a batch of two on a server of two), the batch gets 503
    and Retry-After; once the stream is closed, the same batch runs."""
    long = {"text_input": "Hi", "max_tokens": 1000, "min_length": 1000, "stream": True}  # ~3 s of steps
    batch = _infer_body([{**TEXT, "shape": [2, 1], "data": ["a", "b"]}, {**MAX, "shape": [2, 1], "data": [2, 2]}])
    with httpx.stream("POST", f"{server.url}/v2/models/tiny/generate_stream", json=long, timeout=60) as stream:
        events = stream.iter_lines()  # kept: a dropped iterator closes the response, and the server frees the slot
        assert next(events).startswith("data: ")  # admitted and running
        full = _post(server, "/v2/models/tiny/infer", **batch)
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert "retry later" in full.json()["error"]
    for _ in range(100):  # the server notices the closed stream at its next send
        response = _post(server, "/v2/models/tiny/infer", **batch)
        if response.status_code != 503:
            break
        time.sleep(0.05)
    assert response.status_code == 200, response.text
    assert server.healthy()
