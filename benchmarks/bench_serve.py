"""W2 through the HTTP server: concurrent streaming clients on `/v1/completions` beside offline `LLM.generate`, in one
run on the same model and engine settings.

    PYTHONPATH=. python benchmarks/bench_serve.py [--model llama31_8b] [--workload fixed] [--num-requests 1000]
        [--clients 4] [--out DIR]
    PYTHONPATH=. python benchmarks/bench_serve.py --model tiny --num-requests 64   # CPU smoke run, writes nothing

The offline side is `fastllm.LLM(model)` (defaults sized from the card) generating every request at once, as
bench_throughput.py does. The served side is what `fastllm serve` runs: the same `LLM` defaults in an engine process
(`EngineClient`, the same weights built from the same seed) behind the server's app (uvicorn, in this process, on
127.0.0.1), with the admission queue sized to take every request; `--clients` processes each open their
share of the requests at once as streaming completions (token-id prompts, greedy, `ignore_eos`, usage in the last
event) and time them: TTFT = first event with a token, TPOT = (last - first) / (tokens - 1), output tok/s =
generated tokens / (last response end - first request sent). Neither side has a tokenizer (random-weight model), so
neither detokenizes. Writes DIR/W2-serve-<gpu>-<yyyymmdd>.json; exits 2 without a GPU unless --model tiny.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import importlib.util
import json
import multiprocessing
import socket
import sys
import threading
import time

import torch
from _common import missing_gpu, write_result
from bench_decode import MODELS, _build
from bench_throughput import _percentiles, _requests

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=2048)


def _model(name: str):
    if name != "tiny":
        return _build(name)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, eos_token_id=None, bos_token_id=None, pad_token_id=0)).eval()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _warm(llm, prompts) -> None:
    """The first full batch, 2 tokens each (as bench_throughput.py warms up): per-shape compilation happens here."""
    import fastllm

    n = min(llm.scheduler.max_num_seqs, len(prompts))
    llm.generate(prompts[:n], [fastllm.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)] * n,
                 use_tqdm=False)
    _sync()


def run_offline(model, requests) -> dict:
    import fastllm

    prompts = [p for p, _ in requests]
    params = [fastllm.SamplingParams(max_tokens=new, temperature=0, ignore_eos=True) for _, new in requests]
    with fastllm.LLM(model) as llm:
        _warm(llm, prompts)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        _sync()
        wall = time.perf_counter() - start
        settings = {"max_num_seqs": llm.scheduler.max_num_seqs,
                    "max_num_batched_tokens": llm.scheduler.max_num_batched_tokens}
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    (t50, t99) = _percentiles([o.metrics.time_to_first_token for o in outputs])
    (p50, p99) = _percentiles([o.metrics.time_per_output_token for o in outputs
                               if o.metrics.time_per_output_token is not None])
    return {"output_tok_s": generated / wall, "requests_s": len(requests) / wall, "wall_s": wall,
            "generated_tokens": generated, "ttft_ms_p50": 1e3 * t50, "ttft_ms_p99": 1e3 * t99,
            "tpot_ms_p50": 1e3 * p50, "tpot_ms_p99": 1e3 * p99, **settings}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _served_llm(model_name: str, requests):
    """In the engine process: the model (same seed: same weights as offline), its LLM with defaults, warmed up."""
    import fastllm

    llm = fastllm.LLM(_model(model_name))
    _warm(llm, [p for p, _ in requests])
    return llm


def run_served(model_name: str, requests, clients: int) -> dict:
    import httpx
    import uvicorn

    from fastllm.entrypoints.engine_process import EngineClient
    from fastllm.serve.app import build_app
    from fastllm.serve.engine import ServingEngine

    engine = EngineClient(functools.partial(_served_llm, model_name, requests))
    serving = ServingEngine(engine, max_queue=len(requests))
    settings = {"max_num_seqs": engine.max_num_seqs,
                "max_num_batched_tokens": engine.info.max_num_batched_tokens}
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(serving, "bench"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)
    shares = [requests[i::clients] for i in range(clients)]
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(clients + 1)  # every client process started and imported before the clock starts
    try:
        with context.Pool(clients, initializer=ready.wait) as pool:
            ready.wait()
            start_at = time.monotonic() + 0.2
            per_client = pool.starmap(_client, [(url, share, start_at) for share in shares])
            records = [r for share in per_client for r in share]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.shutdown()
    failed = [r for r in records if r["error"] is not None]
    ok = [r for r in records if r["error"] is None]
    wall = max(r["end"] for r in ok) - min(r["sent"] for r in records) if ok else float("nan")
    generated = sum(r["tokens"] for r in ok)
    ttft = [r["first"] - r["sent"] for r in ok]
    tpot = [(r["end_token"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    (t50, t99), (p50, p99) = _percentiles(ttft), _percentiles(tpot)
    short = sum(1 for r, (_, new) in zip(records, [q for share in shares for q in share]) if r["tokens"] != new)
    return {"output_tok_s": generated / wall, "requests_s": len(ok) / wall, "wall_s": wall,
            "generated_tokens": generated, "ttft_ms_p50": 1e3 * t50, "ttft_ms_p99": 1e3 * t99,
            "tpot_ms_p50": 1e3 * p50, "tpot_ms_p99": 1e3 * p99, "failed_requests": len(failed),
            "wrong_length_requests": short, "first_error": failed[0]["error"] if failed else None,
            "client_processes": clients, **settings}


def _client(url: str, share, start_at: float) -> list[dict]:
    """One client process: its share of the requests sent at once as streams; a timing record per request."""
    return asyncio.run(_client_async(url, share, start_at))


async def _client_async(url: str, share, start_at: float) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=None,
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as client:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        return await asyncio.gather(*(_one_stream(client, prompt, new) for prompt, new in share))


async def _one_stream(client, prompt: list[int], new: int) -> dict:
    record = {"sent": time.monotonic(), "first": None, "end_token": None, "end": None, "tokens": 0, "error": None}
    body = {"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record["error"] = f"{response.status_code}: {(await response.aread())[:300]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("choices"):
                    now = time.monotonic()
                    record["first"] = record["first"] or now
                    record["end_token"] = now
                if event.get("usage"):
                    record["tokens"] = event["usage"]["completion_tokens"]
        record["end"] = time.monotonic()
    except Exception as error:  # recorded and counted: a failed request is a result
        record["error"] = f"{type(error).__name__}: {error}"[:300]
    if record["error"] is None and record["first"] is None:
        record["error"] = "the stream ended without a token"
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama31_8b", choices=[*MODELS, "tiny"])
    parser.add_argument("--workload", default="fixed", choices=["fixed", "mixed"])
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4, help="client processes sharing the requests")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.model != "tiny" and missing_gpu(__file__):
        return 2
    model = _model(args.model)
    requests = _requests(args.workload, args.num_requests, model.config.vocab_size)
    offline = run_offline(model, requests)
    del model  # the engine process builds its own copy (same seed)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    served = run_served(args.model, requests, args.clients)
    served["fraction_of_offline"] = served["output_tok_s"] / offline["output_tok_s"]
    key = f"{args.model}_{args.workload}"
    rows = [("offline LLM", offline), ("HTTP /v1/completions stream", served)]
    print(f"{'':30} {'out tok/s':>10} {'TTFT p50/p99 ms':>18} {'TPOT p50/p99 ms':>18}")
    for name, r in rows:
        print(f"{name:30} {r['output_tok_s']:10.0f} {r['ttft_ms_p50']:8.1f}/{r['ttft_ms_p99']:<9.1f}"
              f" {r['tpot_ms_p50']:8.2f}/{r['tpot_ms_p99']:<9.2f}")
    print(f"served / offline = {served['fraction_of_offline']:.3f}; failed {served['failed_requests']}, "
          f"wrong length {served['wrong_length_requests']}")
    if args.model == "tiny":
        return 0 if served["failed_requests"] == served["wrong_length_requests"] == 0 else 1
    config = {"model": args.model, "workload": args.workload, "num_requests": args.num_requests,
              "clients": args.clients, "dtype": "bf16", "weights": "random, seed 0",
              "engine": "LLM defaults, in an engine process (EngineClient)",
              # uvicorn parses HTTP with httptools (C) when it is installed, else h11 (pure Python)
              "http_parser": "httptools" if importlib.util.find_spec("httptools") else "h11"}
    path = write_result("W2-serve", torch.cuda.get_device_name(), config, {key: served},
                        {"offline_llm": {key: offline}}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
