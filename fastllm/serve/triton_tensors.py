"""The KServe v2 inference protocol's tensors, read and written the way Triton's HTTP endpoint and `tritonclient.http`
exchange them.

A request body is JSON, or (the binary tensor data extension) `Inference-Header-Content-Length` bytes of JSON followed
by the raw bytes of each input that declares `parameters.binary_data_size`, in input order. Raw tensors are row-major
and little-endian; a BYTES element is a 4-byte little-endian length and that many bytes. A response carries each output
the same two ways: in its JSON `data`, or as raw bytes after the JSON (the response then has the header too) when the
request asked for it: `parameters.binary_data` on the output, else `parameters.binary_data_output` on the request,
which is what tritonclient sends when it names no outputs.

Everything a client got wrong is a ValueError whose message names the tensor and the fault (the route answers 400).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

HEADER_LENGTH = "Inference-Header-Content-Length"

# Element format (struct, little-endian) of every datatype but BYTES; BF16 has no struct format and no use here.
_FORMATS = {"BOOL": "?", "INT8": "b", "UINT8": "B", "INT16": "h", "UINT16": "H", "INT32": "i", "UINT32": "I",
            "INT64": "q", "UINT64": "Q", "FP16": "e", "FP32": "f", "FP64": "d"}
DATATYPES = frozenset(_FORMATS) | {"BYTES"}
INTEGER_DATATYPES = frozenset(d for d in _FORMATS if "INT" in d)
FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})
# Most elements one tensor may declare: a shape is the client's claim, checked against the data before anything is
# allocated for it; this only keeps `math.prod` of a hostile shape from being a huge integer in messages.
MAX_ELEMENTS = 2**31


@dataclass
class Tensor:
    """One input tensor: `values` row-major (BYTES elements as bytes, BOOL as bool, numbers as int or float)."""

    name: str
    datatype: str
    shape: list[int]
    values: list


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None  # None: as the request's `binary_data_output` says


@dataclass
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool                    # the request's `binary_data_output`
    parameters: dict                       # the request's other parameters (the route decides what it takes)


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """The request of an infer call from its body and its `Inference-Header-Content-Length` header (None if absent)."""
    if header_length is None:
        split = len(body)
    else:
        header_length = header_length.strip()
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ValueError(f"the {HEADER_LENGTH} header must be a byte count between 0 and the body's {len(body)}, "
                             f"got {header_length!r}")
        split = int(header_length)
    try:
        head = json.loads(body[:split])
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError both
        raise ValueError(f"the inference request's JSON is malformed: {error}") from None
    if not isinstance(head, dict):
        raise ValueError("the inference request must be a JSON object")
    _only_keys("the inference request", head, {"id", "parameters", "inputs", "outputs"})
    request_id = head.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ValueError(f"the request's id must be a string, got {request_id!r}")
    parameters = dict(_object("the request's parameters", head.get("parameters", {})))
    binary_output = parameters.pop("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ValueError(f"parameter binary_data_output must be true or false, got {binary_output!r}")
    entries = head.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise ValueError("the inference request needs a non-empty `inputs` list")
    raw = memoryview(body)[split:]
    inputs, offset = [], 0
    for entry in entries:
        tensor, used = _read_input(entry, raw[offset:])
        if any(t.name == tensor.name for t in inputs):
            raise ValueError(f"input {tensor.name!r} is given twice")
        inputs.append(tensor)
        offset += used
    if offset != len(raw):
        raise ValueError(f"the body has {len(raw) - offset} bytes after the inputs' binary data "
                         f"(their binary_data_size values add up to {offset} of {len(raw)})")
    return InferRequest(request_id, inputs, _read_outputs(head.get("outputs")), binary_output, parameters)


def encode_infer_response(model_name: str, model_version: str, request_id: str | None,
                          outputs: list[tuple[Tensor, bool]]) -> tuple[bytes, int | None]:
    """(body, JSON header length or None) of an infer response with `outputs`, each (tensor, sent as binary)."""
    head: dict = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        head["id"] = request_id
    head["outputs"], blobs = [], []
    for tensor, binary in outputs:
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary:
            blobs.append(_encode_raw(tensor))
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = [v.decode() if isinstance(v, bytes) else v for v in tensor.values]
        head["outputs"].append(entry)
    header = json.dumps(head).encode()
    return (header + b"".join(blobs), len(header)) if blobs else (header, None)


def _only_keys(what: str, value: dict, allowed: set[str]) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"{what} has unknown field(s) {', '.join(map(repr, unknown))}; the v2 protocol's are "
                         f"{', '.join(sorted(allowed))}")


def _object(what: str, value) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {value!r}")
    return value


def _read_input(entry, raw: memoryview) -> tuple[Tensor, int]:
    """(the tensor, raw bytes it took) of one `inputs` entry; `raw` is the binary data not yet taken."""
    entry = _object("each input", entry)
    _only_keys("an input", entry, {"name", "shape", "datatype", "parameters", "data"})
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"each input needs a name (a string), got {name!r}")
    datatype = entry.get("datatype")
    if datatype not in DATATYPES:
        raise ValueError(f"input {name!r}: datatype must be one of {', '.join(sorted(DATATYPES))}, got {datatype!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ValueError(f"input {name!r}: shape must be a list of integers >= 0, got {shape!r}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise ValueError(f"input {name!r}: shape {shape} has more than {MAX_ELEMENTS} elements")
    parameters = _object(f"input {name!r}'s parameters", entry.get("parameters", {}))
    if any(key.startswith("shared_memory") for key in parameters):
        raise ValueError(f"input {name!r}: shared-memory tensors are not supported; send the data in the request")
    _only_keys(f"input {name!r}'s parameters", parameters, {"binary_data_size"})
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in entry:
            raise ValueError(f"input {name!r} has neither `data` nor parameters.binary_data_size")
        values = _json_values(name, datatype, entry["data"])
        used = 0
    else:
        if "data" in entry:
            raise ValueError(f"input {name!r} has both `data` and parameters.binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(raw):
            raise ValueError(f"input {name!r}: binary_data_size must be an integer between 0 and the {len(raw)} "
                             f"binary bytes left in the body, got {size!r}")
        values = _raw_values(name, datatype, raw[:size], count)
        used = size
    if len(values) != count:
        raise ValueError(f"input {name!r}: shape {shape} holds {count} elements but the data has {len(values)}")
    return Tensor(name, datatype, shape, values), used


def _json_values(name: str, datatype: str, data) -> list:
    """The elements of a JSON `data` (flat, or nested row-major as the protocol allows), type-checked."""
    flat: list = []

    def walk(item) -> None:
        if isinstance(item, list):
            for inner in item:
                walk(inner)
        else:
            flat.append(item)

    walk(data)
    for value in flat:
        if not _fits(datatype, value):
            raise ValueError(f"input {name!r}: {value!r} is not a valid {datatype} value")
    return [v.encode() if datatype == "BYTES" else v for v in flat]


def _fits(datatype: str, value) -> bool:
    if datatype == "BYTES":
        return isinstance(value, str)
    if datatype == "BOOL":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if datatype in FLOAT_DATATYPES:
        return isinstance(value, (int, float))
    if not isinstance(value, int):
        return False
    bits = struct.calcsize(_FORMATS[datatype]) * 8
    low, high = (0, 2**bits - 1) if datatype.startswith("U") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return low <= value <= high


def _raw_values(name: str, datatype: str, raw: memoryview, count: int) -> list:
    if datatype == "BYTES":
        return _split_bytes(name, bytes(raw))
    element = _FORMATS[datatype]
    width = struct.calcsize(element)
    if len(raw) != count * width:
        raise ValueError(f"input {name!r}: {count} {datatype} elements take {count * width} bytes, "
                         f"binary_data_size says {len(raw)}")
    return list(struct.unpack(f"<{count}{element}", raw))


def _split_bytes(name: str, raw: bytes) -> list[bytes]:
    """The elements of a raw BYTES tensor: each a 4-byte little-endian length, then that many bytes."""
    values, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ValueError(f"input {name!r}: its BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ValueError(f"input {name!r}: a BYTES element says {length} bytes, {len(raw) - offset} are left")
        values.append(raw[offset:offset + length])
        offset += length
    return values


def _encode_raw(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in tensor.values)
    return struct.pack(f"<{len(tensor.values)}{_FORMATS[tensor.datatype]}", *tensor.values)


def _read_outputs(entries) -> list[RequestedOutput] | None:
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise ValueError(f"`outputs` must be a list, got {entries!r}")
    outputs = []
    for entry in entries:
        entry = _object("each requested output", entry)
        _only_keys("a requested output", entry, {"name", "parameters"})
        name = entry.get("name")
        if not isinstance(name, str):
            raise ValueError(f"each requested output needs a name (a string), got {name!r}")
        parameters = _object(f"output {name!r}'s parameters", entry.get("parameters", {}))
        if "classification" in parameters:
            raise ValueError(f"output {name!r}: the classification extension is not supported")
        if any(key.startswith("shared_memory") for key in parameters):
            raise ValueError(f"output {name!r}: shared-memory outputs are not supported")
        _only_keys(f"output {name!r}'s parameters", parameters, {"binary_data"})
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise ValueError(f"output {name!r}: binary_data must be true or false, got {binary!r}")
        outputs.append(RequestedOutput(name, binary))
    return outputs
