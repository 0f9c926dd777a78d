"""Bugs found in `fastllm serve` / `fastllm bench` by the 2026-12-02 bug hunt, one test each (CPU, seconds)."""

from __future__ import annotations

import socket

import pytest

from fastllm.cli import main
from tests._models import build


class _NoEngine:
    """Stands in for EngineClient: these flags must be refused before the model is loaded at all."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("the model was loaded although the flags could never serve")


@pytest.fixture
def no_engine(monkeypatch):
    monkeypatch.setattr("fastllm.entrypoints.engine_process.EngineClient", _NoEngine)


def _one_line_error(capsys, *words: str) -> None:
    captured = capsys.readouterr()
    assert captured.out == "", captured.out
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def test_serve_refuses_a_port_in_use_before_loading_the_model(no_engine, capsys):
    # Symptom: with the port taken, `fastllm serve` loaded, optimized and warmed the model, printed "fastllm: serving
    # ... on http://127.0.0.1:PORT", and only then uvicorn failed to bind: exit code 3, after minutes for a real model.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    _one_line_error(capsys, "--port", str(port), "in use")


def test_serve_refuses_an_address_not_on_this_machine_before_loading(no_engine, capsys):
    # Symptom: as above for a --host this machine has no address for (TEST-NET-1): "[Errno 99] Cannot assign requested
    # address" from uvicorn after the model was loaded, exit code 3.
    assert main(["serve", "--host", "192.0.2.1", "--port", "8000"]) == 2
    _one_line_error(capsys, "--host 192.0.2.1")


def test_serve_refuses_a_context_longer_than_the_kv_cache(no_engine, capsys):
    # Symptom: `--num-kv-tokens 8 --max-model-len 64` was accepted and the server served a 16-token context (LLM caps
    # max_model_len at what the cache holds), refusing every prompt over 16 tokens as "longer than max_model_len=16".
    assert main(["serve", "--num-kv-tokens", "8", "--max-model-len", "64"]) == 2
    _one_line_error(capsys, "--max-model-len 64", "--num-kv-tokens 8")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bench-bughunt")
    build("qwen3", path)
    return str(path)


def test_bench_refuses_a_json_path_in_a_missing_folder_before_running(tiny, tmp_path, capsys):
    # Symptom: `--json missing/dir/out.json` ran the whole benchmark (HF eager and fastllm, minutes on a real model),
    # printed the table, then failed with "[Errno 2] No such file or directory": the results were lost.
    target = tmp_path / "no-such-folder" / "bench.json"
    assert main(["bench", tiny, "--input-len", "4", "--output-len", "2", "--no-baseline", "--json", str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "", "the benchmark ran before --json was checked"
    assert "--json" in captured.err and "does not exist" in captured.err, captured.err


@pytest.mark.parametrize("key", ["", "  ", "secret "])
def test_serve_refuses_an_api_key_no_client_can_match(no_engine, capsys, monkeypatch, key):
    # Symptom: --api-key "" (or FASTLLM_API_KEY="") turned authentication on with an empty token, and a bare
    # "Authorization: Bearer" passed it; a key with blanks at its ends matched no header (the token is stripped)
    assert main(["serve", "--port", "8000", "--api-key", key]) == 2
    _one_line_error(capsys, "--api-key", "non-empty token")
    from fastllm.serve.app import check_api_key

    with pytest.raises(ValueError, match="api_key must be a non-empty token"):
        check_api_key(key)
    check_api_key(None)
    check_api_key("secret")


def test_a_triton_stream_that_fails_under_way_ends_with_an_error_event():
    # Symptom: generate_stream's events caught only EngineFault and ValueError; any other exception once the 200 was
    # sent cut the connection with no error event (the OpenAI routes send one for every exception)
    import asyncio
    from types import SimpleNamespace

    from fastllm.serve.triton_api import _events

    async def failing_streams():
        yield 0, [SimpleNamespace(text="Hello", finish_reason=None)], None
        raise RuntimeError("boom")

    async def collect():
        one = SimpleNamespace(prompt="", echo=False, stream=True)
        return [event async for event in _events(failing_streams(), one, {"model_name": "tiny"})]

    events = asyncio.run(collect())
    assert len(events) == 2 and "Hello" in events[0]
    assert "error" in events[1] and "internal server error (RuntimeError)" in events[1]


def test_v2_paths_answer_errors_in_the_v2_shape(tmp_path):
    # Symptom: an unknown /v2 path (404), a body over the limit (413) or too many headers (431) on a /v2 route were
    # answered in OpenAI's shape ({"error": {"message", "type", ...}}); Triton/KServe clients read {"error": message}
    import asyncio

    import httpx
    import torch

    import fastllm
    from fastllm.serve.app import build_app
    from fastllm.serve.engine import ServingEngine
    from tests._server import tiny_model_dir

    serving = ServingEngine(fastllm.LLM(str(tiny_model_dir(tmp_path)), dtype=torch.float32, max_model_len=64), 2)
    app = build_app(serving, "tiny", max_body_bytes=1000)

    async def call():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return [await client.post("/v2/models/tiny/nothing", json={}),
                    await client.post("/v2/models/tiny/generate", json={"text_input": "x" * 2000}),
                    await client.post("/v2/models/tiny/generate", json={"text_input": "hi"},
                                      headers={f"x-h{i}": "1" for i in range(200)}),
                    await client.post("/v1/nothing", json={})]

    try:
        missing, large, headers, openai_missing = asyncio.run(call())
    finally:
        serving.shutdown()
    for response, status in ((missing, 404), (large, 413), (headers, 431)):
        body = response.json()
        assert response.status_code == status and set(body) == {"error"} and isinstance(body["error"], str), body
    assert openai_missing.status_code == 404 and openai_missing.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("name", ["", "  "])
def test_serve_refuses_an_empty_served_model_name(no_engine, capsys, name):
    # Symptom: --served-model-name "" fell back to MODEL's name silently
    assert main(["serve", "--port", "8000", "--served-model-name", name]) == 2
    _one_line_error(capsys, "--served-model-name", "non-empty")
