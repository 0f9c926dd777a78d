"""Triton / KServe v2 routes with the TensorRT-LLM backend's tensor names: what a client of Triton's `ensemble`
model sends works unchanged against `fastllm serve`.

    POST /v2/models/{model}/generate          {"text_input": ..., "max_tokens": ...}  ->  {"text_output": ...}
    POST /v2/models/{model}/generate_stream   the same, answered as server-sent events, one per piece of text
    POST /v2/models/{model}/infer             KServe v2 tensors, JSON or binary (serve/triton_tensors.py)
    GET  /v2, /v2/health/{live,ready}, /v2/models/{model}[/ready|/config]

`model` is the served name or an alias (Triton's "ensemble"); `/v2/models/{model}/versions/1/...` works too. Inputs
are TensorRT-LLM's: text_input, max_tokens (both required), bad_words, stop_words, temperature, top_k, top_p,
repetition_penalty, presence_penalty, frequency_penalty, min_length, random_seed, stream, exclude_input_in_output;
any other input is refused with a 400 naming it, never ignored. The output is text_output, shape [batch, 1]; each
row of an infer batch runs as its own engine request, all at once.

Where fastllm and TensorRT-LLM differ, deliberately:
- text_output is the completion alone unless the request sends `exclude_input_in_output: false`. TensorRT-LLM's
  default is to include the prompt, but its deployment guides fill `exclude_input_in_output:True` into the model
  config, so that is what clients of most deployments see; it is also what fastllm's OpenAI routes and `LLM` return.
  With the prompt included, it is the prompt's text followed by the completion's (streams send it first).
- A stop word ends the text before it (vLLM's and `LLM`'s rule); TensorRT-LLM keeps the stop word's tokens in its
  output.
- Sampling follows TensorRT-LLM's rule: greedy unless the request sets temperature, top_k or top_p; greedy too when
  temperature is 0, top_p is 0 or top_k is 1; otherwise what is unset is temperature 1, top_k 0 (off), top_p 1.

Errors have the v2 shape, `{"error": message}` (tritonclient raises it as InferenceServerException): 400 for what the
client sent, 404 for an unknown model, 503 with Retry-After when the server is full, 500 if a model step failed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastllm._log import logger
from fastllm._version import __version__
from fastllm.runtime.sampling_params import SamplingParams
from fastllm.serve.engine import EngineFault, Overloaded, ServingEngine
from fastllm.serve.protocol import unicode_text
from fastllm.serve.server_state import (
    ClientGone,
    ClosingStreamingResponse,
    MergedStreams,
    ServerState,
    check_model,
    max_tokens_for,
    prompt_token_ids,
    released_after,
    run_to_end,
    sse,
    started_streams,
    until_disconnected,
)
from fastllm.serve.triton_tensors import (
    FLOAT_DATATYPES,
    HEADER_LENGTH,
    INTEGER_DATATYPES,
    Tensor,
    encode_infer_response,
    parse_infer_request,
)

# fastllm serves one version of its one model.
VERSION = "1"


@dataclass(frozen=True)
class _Input:
    """One input the model takes: its declared datatype (TensorRT-LLM's current ensemble), what kind of value a row
    holds, and the SamplingParams field it sets (None: handled by the route)."""

    datatype: str
    kind: str  # "text" (one string), "words" (strings), "int", "float" or "bool" (one value)
    field: str | None = None


INPUTS = {
    "text_input": _Input("BYTES", "text"),
    "max_tokens": _Input("INT32", "int", "max_tokens"),
    "bad_words": _Input("BYTES", "words", "bad_words"),
    "stop_words": _Input("BYTES", "words", "stop"),
    "temperature": _Input("FP32", "float", "temperature"),
    "top_k": _Input("INT32", "int", "top_k"),
    "top_p": _Input("FP32", "float", "top_p"),
    "repetition_penalty": _Input("FP32", "float", "repetition_penalty"),
    "presence_penalty": _Input("FP32", "float", "presence_penalty"),
    "frequency_penalty": _Input("FP32", "float", "frequency_penalty"),
    "min_length": _Input("INT32", "int", "min_tokens"),
    "random_seed": _Input("UINT64", "int", "seed"),
    "stream": _Input("BOOL", "bool"),
    "exclude_input_in_output": _Input("BOOL", "bool"),
}
REQUIRED = ("text_input", "max_tokens")
# The datatypes a tensor of each kind may have. Integers take any width because TensorRT-LLM's own configs changed
# theirs (max_tokens was UINT32, is INT32; random_seed is UINT64): a client written for either version works.
_ACCEPTED = {"text": {"BYTES"}, "words": {"BYTES"}, "bool": {"BOOL"}, "int": INTEGER_DATATYPES,
             "float": FLOAT_DATATYPES}
# SamplingParams' messages begin with its field name; a client knows the input's.
_INPUT_OF_FIELD = {spec.field: name for name, spec in INPUTS.items() if spec.field and spec.field != name}


class _V2Route(APIRoute):
    """A route whose errors have the v2 protocol's shape, `{"error": message}`, as Triton answers them (the app's
    handlers answer OpenAI's shape for every other route)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except StarletteHTTPException as error:  # fastapi's HTTPException included
                return _error(error.status_code, str(error.detail))
            except ValueError as error:
                return _error(400, str(error))
            except Overloaded as error:
                return _error(503, str(error), {"Retry-After": "1"})
            except EngineFault as error:
                logger.error("fastllm serve: %s %s: %s", request.method, request.url.path, error)
                return _error(500, error.client_message())
            except ClientGone as error:
                return _error(499, str(error))

        return handle


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


router = APIRouter(route_class=_V2Route)


def _serving(request: Request, model: str, version: str | None = None) -> tuple[ServerState, ServingEngine]:
    state: ServerState = request.app.state.fastllm
    check_model(state, model)
    if version is not None and version != VERSION:
        raise HTTPException(404, f"the model `{model}` has no version {version!r}; it has version {VERSION}")
    return state, state.serving





# ------------------------------------------------------------------------------------------------ health, metadata


@router.get("/v2/health/live")
async def live():
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request):
    running = request.app.state.fastllm.serving.ready
    return JSONResponse({"ready": running}, status_code=200 if running else 503)


@router.get("/v2")
async def server_metadata():
    return {"name": "fastllm", "version": __version__,
            "extensions": ["binary_tensor_data", "generate", "model_configuration"]}


@router.get("/v2/models/{model}")
@router.get("/v2/models/{model}/versions/{version}")
async def model_metadata(request: Request, model: str, version: str | None = None):
    _serving(request, model, version)
    inputs = [{"name": name, "datatype": spec.datatype, "shape": [-1, -1 if spec.kind == "words" else 1]}
              for name, spec in INPUTS.items()]
    return {"name": model, "versions": [VERSION], "platform": "fastllm", "inputs": inputs,
            "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1, 1]}]}


@router.get("/v2/models/{model}/ready")
@router.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready(request: Request, model: str, version: str | None = None):
    _, serving = _serving(request, model, version)
    running = serving.ready
    return JSONResponse({"ready": running}, status_code=200 if running else 503)


@router.get("/v2/models/{model}/config")
@router.get("/v2/models/{model}/versions/{version}/config")
async def model_config(request: Request, model: str, version: str | None = None):
    """Triton's model configuration (its JSON form): inputs as TensorRT-LLM's ensemble declares them."""
    _, serving = _serving(request, model, version)
    kinds = {"BYTES": "TYPE_STRING"}
    inputs = [{"name": name, "data_type": kinds.get(spec.datatype, f"TYPE_{spec.datatype}"),
               "dims": [-1 if spec.kind == "words" else 1], "optional": name not in REQUIRED}
              for name, spec in INPUTS.items()]
    return {"name": model, "platform": "fastllm", "max_batch_size": serving.max_running, "input": inputs,
            "output": [{"name": "text_output", "data_type": "TYPE_STRING", "dims": [1]}],
            "model_transaction_policy": {"decoupled": False}}


# ------------------------------------------------------------------------------------------- one row, one request


@dataclass
class _Request:
    """One engine request built from one row of inputs."""

    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    echo: bool  # text_output starts with the prompt (exclude_input_in_output false)
    stream: bool


def _row_value(name: str, values: list):
    """A row's value of input `name` from its elements (bytes for BYTES): one value, or the words of a words input."""
    kind = INPUTS[name].kind
    if kind == "words":  # empty words are skipped, as TensorRT-LLM does: "" is how its clients send "no words"
        return [w for w in (_text(name, v) for v in values) if w]
    if len(values) != 1:
        raise ValueError(f"input {name!r} takes one value per request, got {len(values)}")
    return _text(name, values[0]) if kind == "text" else values[0]


def _text(name: str, value) -> str:
    if isinstance(value, str):
        return _unicode(name, value)
    try:
        return bytes(value).decode()
    except UnicodeDecodeError:
        raise ValueError(f"input {name!r} must be UTF-8 text") from None


def _unicode(name: str, text: str) -> str:
    """`text` if it is valid Unicode; ValueError naming the input otherwise (JSON can carry a lone surrogate, which
    the tokenizer raised a TypeError on: a 500)."""
    try:
        return unicode_text(text)
    except ValueError as error:
        raise ValueError(f"input {name!r}: {error}") from None


async def _build_request(serving: ServingEngine, row: dict) -> _Request:
    """The engine request of one row ({input name: value}); ValueError naming the input for a value out of range."""
    for name in REQUIRED:
        if name not in row:
            raise ValueError(f"input {name!r} is required")
    prompt = row["text_input"]
    prompt_ids = await prompt_token_ids(serving, prompt)
    if not prompt_ids:
        raise ValueError("input 'text_input' must not be empty")
    kwargs = {"max_tokens": max_tokens_for(serving, row["max_tokens"], len(prompt_ids))}
    for name, value in row.items():
        field = INPUTS[name].field
        if field is not None and field != "max_tokens" and not (INPUTS[name].kind == "words" and not value):
            kwargs[field] = value
    sampled = {"temperature", "top_k", "top_p"} & set(row)
    if not sampled or row.get("temperature") == 0 or row.get("top_p") == 0 or row.get("top_k") == 1:
        kwargs["temperature"] = 0  # TensorRT-LLM's rule (module docstring)
        if kwargs.get("top_p") == 0:
            del kwargs["top_p"]  # TensorRT-LLM's "greedy"; fastllm's top_p must be in (0, 1]
    try:
        params = SamplingParams(**kwargs)
    except ValueError as error:
        message = str(error)
        field = message.split(" ", 1)[0]
        raise ValueError(f"input {_INPUT_OF_FIELD[field]!r}: {message}" if field in _INPUT_OF_FIELD
                         else message) from None
    return _Request(prompt, prompt_ids, params, echo=not row.get("exclude_input_in_output", True),
                    stream=bool(row.get("stream", False)))


def _check_inputs(names) -> None:
    unknown = [n for n in names if n not in INPUTS]
    if unknown:
        raise ValueError(f"unknown input(s) {', '.join(map(repr, unknown))}; this model's inputs are "
                         f"{', '.join(INPUTS)}")


# -------------------------------------------------------------------------------------------------------- infer


@router.post("/v2/models/{model}/infer")
@router.post("/v2/models/{model}/versions/{version}/infer")
async def infer(request: Request, model: str, version: str | None = None):
    """The KServe v2 inference protocol, JSON or binary tensors; every row of the batch is one request, run at once."""
    _, serving = _serving(request, model, version)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise ValueError(f"Content-Encoding {encoding!r} is not supported: send the body uncompressed")
    parsed = parse_infer_request(await request.body(), request.headers.get(HEADER_LENGTH))
    if parsed.parameters:
        raise ValueError(f"request parameter(s) {', '.join(map(repr, sorted(parsed.parameters)))} are not "
                         f"supported (fastllm takes binary_data_output)")
    rows = _rows(parsed.inputs, serving.max_running)
    requests = []
    for i, row in enumerate(rows):
        try:
            requests.append(await _build_request(serving, row))
        except ValueError as error:
            raise ValueError(f"batch row {i}: {error}" if len(rows) > 1 else str(error)) from None
    if any(r.stream for r in requests):
        raise ValueError(f"input 'stream' is true: stream with POST /v2/models/{model}/generate_stream")
    wanted = _wanted_outputs(parsed)
    request_id = serving.new_id("triton")
    with serving.admit(len(requests)):
        outputs = await until_disconnected(request, run_to_end(serving, [r.prompt_ids for r in requests],
                                                             [r.params for r in requests], request_id))
    texts = [(r.prompt if r.echo else "") + o.outputs[0].text for r, o in zip(requests, outputs)]
    tensor = Tensor("text_output", "BYTES", [len(texts), 1], [t.encode() for t in texts])
    body, header_length = encode_infer_response(model, VERSION, parsed.id,
                                                [(tensor, binary) for binary in wanted])
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


def _rows(tensors: list[Tensor], max_batch: int) -> list[dict]:
    """One {input name: value} per row of the batch: every tensor's shape is [batch, ...], the same batch."""
    _check_inputs(t.name for t in tensors)
    batch = None
    for t in tensors:
        declared, accepted = INPUTS[t.name].datatype, _ACCEPTED[INPUTS[t.name].kind]
        if t.datatype not in accepted:
            also = f" (or {', '.join(sorted(accepted - {declared}))})" if len(accepted) > 1 else ""
            raise ValueError(f"input {t.name!r} has datatype {t.datatype}; the model takes {declared}{also}")
        if not t.shape:
            raise ValueError(f"input {t.name!r}: shape must be [batch, ...], got []")
        if batch is None:
            batch, first = t.shape[0], t.name
        elif t.shape[0] != batch:
            raise ValueError(f"input {t.name!r} has batch size {t.shape[0]} but {first!r} has {batch}; every input's "
                             f"first dimension is the batch")
    if not 1 <= batch <= max_batch:
        raise ValueError(f"the batch size must be between 1 and the model's max_batch_size {max_batch}, got {batch}")
    rows = [{} for _ in range(batch)]
    for t in tensors:
        per_row = len(t.values) // batch
        for i, row in enumerate(rows):
            row[t.name] = _row_value(t.name, t.values[i * per_row:(i + 1) * per_row])
    return rows


def _wanted_outputs(parsed) -> list[bool]:
    """For each output to send (text_output, or none when `outputs` is an empty list), whether it goes as binary."""
    if parsed.outputs is None:
        return [parsed.binary_output]
    names = [o.name for o in parsed.outputs]
    if any(name != "text_output" for name in names) or len(names) > 1:
        raise ValueError(f"unknown or repeated output(s) {names}; this model's one output is text_output")
    return [parsed.binary_output if o.binary is None else o.binary for o in parsed.outputs]


# ---------------------------------------------------------------------------------------------------- generate


async def _generate_request(request: Request, serving: ServingEngine, stream: bool) -> tuple[dict, _Request]:
    """(the body, its engine request) of a generate call: a JSON object of input values, plus an optional `id` and
    `parameters` (the vLLM backend's clients send sampling values there; they count as inputs). `stream` is the
    default of the stream input."""
    try:
        body = json.loads(await request.body())
    except ValueError as error:
        raise ValueError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object of input values")
    values = {k: v for k, v in body.items() if k not in ("id", "parameters")}
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ValueError(f"`parameters` must be a JSON object, got {parameters!r}")
    for name in parameters:
        if name in values:
            raise ValueError(f"{name!r} is given both as an input and in `parameters`")
    values.update(parameters)
    _check_inputs(values)
    if "id" in body and not isinstance(body["id"], str):
        raise ValueError(f"`id` must be a string, got {body['id']!r}")
    row = {"stream": stream} | {name: _json_value(name, value) for name, value in values.items()}
    return body, await _build_request(serving, row)


def _json_value(name: str, value):
    """A generate body's value for input `name`: a scalar, or a list (a one-element list for one value)."""
    kind = INPUTS[name].kind
    if kind == "words":
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
            raise ValueError(f"input {name!r} must be a string or a list of strings, got {value!r}")
        return [_unicode(name, w) for w in value if w]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    ok = {"text": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}[kind]
    if not ok(value):
        expected = {"text": "a string", "bool": "true or false", "int": "an integer", "float": "a number"}[kind]
        raise ValueError(f"input {name!r} must be {expected}, got {value!r}")
    return _unicode(name, value) if kind == "text" else value


@router.post("/v2/models/{model}/generate")
@router.post("/v2/models/{model}/versions/{version}/generate")
async def generate(request: Request, model: str, version: str | None = None):
    _, serving = _serving(request, model, version)
    body, one = await _generate_request(request, serving, stream=False)
    if one.stream:
        raise ValueError(f"input 'stream' is true: stream with POST /v2/models/{model}/generate_stream")
    with serving.admit(1):
        (output,) = await until_disconnected(request, run_to_end(serving, [one.prompt_ids], [one.params],
                                                               serving.new_id("triton")))
    answer = {"model_name": model, "model_version": VERSION,
              "text_output": (one.prompt if one.echo else "") + output.outputs[0].text}
    return {"id": body["id"], **answer} if "id" in body else answer


@router.post("/v2/models/{model}/generate_stream")
@router.post("/v2/models/{model}/versions/{version}/generate_stream")
async def generate_stream(request: Request, model: str, version: str | None = None):
    """Server-sent events, `data: {..., "text_output": piece}` per piece of text, the last one when the request ends;
    a failure after the stream began is one `data: {"error": ...}` event, as Triton sends it. `stream` defaults to
    true here (TensorRT-LLM's clients send it); `stream: false` sends the whole text as one event, as Triton does."""
    state, serving = _serving(request, model, version)
    body, one = await _generate_request(request, serving, stream=True)
    head = {"id": body["id"]} if "id" in body else {}
    head.update(model_name=model, model_version=VERSION)
    admission = serving.admit(1)
    # Started before the 200: a request the engine refuses is a 400, a step failing before the first token a 500.
    streams = await started_streams(request, admission, serving, [one.prompt_ids], [one.params],
                                    serving.new_id("triton"))
    return ClosingStreamingResponse(released_after(admission, _events(streams, one, head)),
                                    media_type="text/event-stream")


async def _events(streams: MergedStreams, one: _Request, head: dict) -> AsyncIterator[str]:
    pending = one.prompt if one.echo else ""
    try:
        async with contextlib.aclosing(streams):
            async for _, deltas, _ in streams:
                for delta in deltas:
                    pending += delta.text
                    if (one.stream and pending) or delta.finish_reason is not None:
                        yield sse({**head, "text_output": pending})
                        pending = ""
    except EngineFault as error:
        logger.error("fastllm serve: a stream ended: %s", error)
        yield sse({"error": error.client_message()})
    except ValueError as error:
        yield sse({"error": str(error)})
    except Exception as error:  # anything else under way (its 200 sent): an error event, not a cut connection
        logger.error("fastllm serve: a stream failed", exc_info=error)
        yield sse({"error": f"internal server error ({type(error).__name__}); the server goes on"})
