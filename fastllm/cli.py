"""The `fastllm` command line.

    fastllm run [MODEL] --prompt TEXT [--max-new-tokens N] [--dtype ...] [--device ...] [--cpu-runtime]
    fastllm serve [MODEL] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [engine options]
    fastllm bench [MODEL] [--input-len 128] [--output-len 256] [--num-prompts 1] [--quantization ...] [--json PATH]

`run` generates greedily with Hugging Face eager, optimizes the model with `fastllm.optimize`, generates
again, prints the optimized model's text and a side-by-side table (tokens/s, identical tokens or not).
`bench` times random-token prompts of fixed lengths with Hugging Face eager and with `fastllm.LLM` (fastllm/bench.py).
Subcommands are argparse sub-parsers.

Errors the user can fix (a missing model folder, a missing demo wheel, a bad argument) print one line on
stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Sequence

EXIT_USAGE = 2
_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICES = ("auto", "cpu", "cuda")
# A hub id is "name" or "org/name"; anything else that does not exist locally is a mistyped path, reported at
# once instead of after a hub lookup that cannot succeed.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class UsageError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block before the error; one line plus a pointer to --help reads better.
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="local Hugging Face model folder or hub id (default: the embedded demo model)")


def _add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=_DTYPES, default="auto",
                        help="weight dtype (auto: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--device", choices=_DEVICES, default="auto",
                        help="device (auto: cuda if available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `fastllm` command, one sub-parser per subcommand."""
    from fastllm._version import __version__

    parser = _Parser(prog="fastllm", description="PyTorch-native JIT acceleration for Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=f"fastllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser(
        "run",
        help="generate with HF eager and with fastllm.optimize(), and compare",
        description="Load a model, generate greedily with Hugging Face eager, optimize it with fastllm, "
        "generate again, and print the text with a side-by-side speed table.",
    )
    run.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="local Hugging Face model folder or hub id (default: the embedded demo model SmolLM2-135M-Instruct)",
    )
    run.add_argument("--prompt", required=True, help="text to complete")
    run.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    _add_placement_arguments(run)
    run.add_argument("--cpu-runtime", action="store_true",
                     help="on the CPU, generate on fastllm's runtime instead of Hugging Face's path (faster there)")
    run.set_defaults(func=_cmd_run)

    serve = sub.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI-compatible and Triton/KServe v2 routes)",
        description="Load a model, optimize it, reserve its engine and serve it: /v1/completions, "
        "/v1/chat/completions, /v1/models, /v2/models/{model}/generate[_stream], /v2/models/{model}/infer, "
        "/metrics, /health. Listens on 127.0.0.1 unless --host says otherwise.",
    )
    _add_model_argument(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("FASTLLM_API_KEY"),
                       help="require `Authorization: Bearer KEY` on every route but health (default: "
                            "$FASTLLM_API_KEY; none)")
    serve.add_argument("--served-model-name", help="the model's name in requests (default: MODEL or 'demo')")
    serve.add_argument("--max-num-seqs", type=int, help="completions run at once (default: sized from the card)")
    serve.add_argument("--max-num-batched-tokens", type=int, help="tokens a step (default: sized from the card)")
    serve.add_argument("--max-queue", type=int, default=None,
                       help="completions that may wait beyond those running; more are refused with 503 "
                            "(default: as many as run)")
    serve.add_argument("--max-model-len", type=int, help="longest prompt + completion (default: the model's)")
    serve.add_argument("--num-kv-tokens", type=int, help="fixed KV-cache size in tokens (default: a share of the card)")
    serve.add_argument("--kv-cache-memory-fraction", type=float, default=0.9)
    serve.add_argument("--quantization", choices=("fp8", "int8", "int4"),
                       help="quantize the linear layers (fp8: W8A8, needs FP8 tensor cores; int8/int4: weight-only)")
    _add_placement_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    bench = sub.add_parser(
        "bench",
        help="time random-token prompts with HF eager and with fastllm, side by side",
        description="Generate from random-token prompts of --input-len tokens, exactly --output-len new tokens each "
        "(greedy), with Hugging Face eager and then with fastllm.LLM, each warmed up, in this process. One prompt: "
        "TTFT and decode tok/s ((new tokens - 1) / the time after the first); several: output tok/s and "
        "requests/s.",
    )
    _add_model_argument(bench)
    bench.add_argument("--input-len", type=int, default=128, help="prompt tokens (default: 128)")
    bench.add_argument("--output-len", type=int, default=256, help="new tokens per prompt (default: 256)")
    bench.add_argument("--num-prompts", type=int, default=1, help="prompts (default: 1, batch-1 latency)")
    bench.add_argument("--hf-batch-size", type=int, default=32,
                       help="prompts Hugging Face eager generates at once (default: 32)")
    bench.add_argument("--quantization", choices=("fp8", "int8", "int4"),
                       help="quantize fastllm's linear layers (HF eager keeps the model's dtype)")
    bench.add_argument("--no-baseline", action="store_true", help="skip Hugging Face eager")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default: 0)")
    bench.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    _add_placement_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fastllm` console script and of `python -m fastllm`; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        # --help and argument errors exit inside argparse; return the code so in-process callers get it too.
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except (UsageError, OSError, ValueError) as e:
        # OSError covers FileNotFoundError and transformers' "not a valid model identifier / no config.json";
        # the message itself is what the user needs, a traceback would bury it.
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fastllm: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fastllm: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------------------------------- run


@dataclass
class GenerationResult:
    """What one provider produced: token ids, the decoded completion and its timings."""

    provider: str
    token_ids: list[int]  # new tokens only, prompt excluded
    text: str
    first_call_s: float  # the warm-up generate (includes any lazy capture or compilation)
    seconds: float  # the timed generate, after the warm-up

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("inf")


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was given, but no CUDA GPU is available (try --device cpu)")
    return torch.device(name)


def _resolve_dtype(name: str, device):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # Half precision on the CPU is slow and its greedy tokens drift from fp32; fp32 is the reference there.
    return torch.float32


def _check_model_arg(model_arg: str | None) -> None:
    """UsageError unless MODEL is omitted, a Hugging Face model folder, or looks like a hub id."""
    if model_arg is None:
        return
    if os.path.exists(model_arg):
        if not os.path.isdir(model_arg):
            raise UsageError(f"MODEL must be a Hugging Face model folder, not a file: {model_arg}")
        if not os.path.isfile(os.path.join(model_arg, "config.json")):
            raise UsageError(f"no config.json in {model_arg}: not a Hugging Face model folder")
    elif not _HUB_ID.match(model_arg):
        raise UsageError(f"model folder not found: {model_arg}")


def _load(model_arg: str | None, dtype, device, with_tokenizer: bool = True):
    """Load (model, tokenizer) for MODEL, or the demo model when MODEL is omitted (tokenizer None unless
    `with_tokenizer`, or the demo's)."""
    if model_arg is None:
        from fastllm.models.demo import load_demo_model

        return load_demo_model(dtype=dtype, device=device)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_model_arg(model_arg)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_arg, dtype=dtype)
    except OSError as e:
        where = "local folder" if os.path.exists(model_arg) else "not a local folder; hub"
        raise UsageError(f"could not load model {model_arg} ({where}): {e}") from e
    model.to(device)
    model.eval()
    if not with_tokenizer:
        return model, None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_arg)
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load a tokenizer from {model_arg}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _generate(provider: str, model, tokenizer, inputs: dict, max_new_tokens: int, device) -> GenerationResult:
    """One warm-up generate, then one timed generate of the same prompt, greedy."""
    import torch

    from fastllm.bench import timed

    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    prompt_len = inputs["input_ids"].shape[1]
    # no_grad rather than inference_mode: tensors that optimize() creates lazily during the first call
    # would become inference tensors and could not be updated in place outside inference mode later.
    with torch.no_grad():
        _, first_call_s = timed(lambda: model.generate(**inputs, **kwargs), device)
        out, seconds = timed(lambda: model.generate(**inputs, **kwargs), device)
    new_ids = out[0, prompt_len:].tolist()
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return GenerationResult(provider, new_ids, text, first_call_s, seconds)


def _text_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, the first row a header underlined with dashes."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(results: Sequence[GenerationResult], reference: GenerationResult) -> str:
    """Side-by-side table: provider, new tokens, first call, tokens/s, identical tokens to `reference`."""
    rows = [("provider", "new tokens", "first call s", "tokens/s", "identical tokens")]
    for r in results:
        same = "(reference)" if r is reference else ("yes" if r.token_ids == reference.token_ids else "NO")
        rows.append((r.provider, str(len(r.token_ids)), f"{r.first_call_s:.2f}", f"{r.tokens_per_s:.1f}", same))
    return _text_table(rows)


def _cmd_run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.prompt:
        raise UsageError("--prompt must not be empty")

    import torch

    import fastllm

    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    model, tokenizer = _load(args.model, dtype, device)
    inputs = {k: v.to(device) for k, v in tokenizer(args.prompt, return_tensors="pt").items()}
    _check_length(model, inputs["input_ids"].shape[1], args.max_new_tokens)

    # HF eager first: optimize() rewrites the model in place, so the baseline must be measured before it.
    eager = _generate("hf_eager", model, tokenizer, inputs, args.max_new_tokens, device)

    start = time.perf_counter()
    with torch.no_grad():
        model = fastllm.optimize(model, cpu_runtime=args.cpu_runtime)
    capture_s = time.perf_counter() - start

    report = fastllm.explain(model)
    label = "fastllm" if report.hf_path_reason is None else "fastllm (HF's path on the CPU)"
    fast = _generate(label, model, tokenizer, inputs, args.max_new_tokens, device)

    name = args.model or "demo:SmolLM2-135M-Instruct"
    print(f"{args.prompt}{fast.text}")
    print()
    print(f"model: {name}  device: {device.type}  dtype: {str(dtype).removeprefix('torch.')}  greedy")
    print(format_table([eager, fast], reference=eager))
    print(f"capture time (fastllm.optimize): {capture_s:.2f} s")
    if report.hf_path_reason is not None:
        print(f"note: {report.hf_path_reason} (--cpu-runtime)")
    if fast.token_ids != eager.token_ids:
        print(f"hf_eager text differs: {args.prompt}{eager.text}")
    return 0



def _check_length(model, prompt_len: int, max_new_tokens: int) -> None:
    """UsageError if the prompt and the new tokens do not fit the model's context: checked before the timed runs, as
    Hugging Face's eager generate would run past it (positions the model never learned) and fastllm's refuse it."""
    context = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(context, int) or prompt_len + max_new_tokens <= context:
        return
    if prompt_len >= context:
        raise UsageError(f"--prompt is {prompt_len} tokens, which fills the model's context of {context} tokens; "
                         "shorten it")
    raise UsageError(f"--prompt ({prompt_len} tokens) + --max-new-tokens {max_new_tokens} exceeds the model's context "
                     f"of {context} tokens; --max-new-tokens can be at most {context - prompt_len} for this prompt")


# --------------------------------------------------------------------------------------------------- bench


def format_bench_table(results) -> str:
    """provider, prompts, new tokens, seconds, output tok/s, requests/s; for one prompt TTFT and decode tok/s too."""
    single = results[0].num_prompts == 1
    rows = [("provider", "prompts", "new tokens", "seconds", "output tok/s", "requests/s",
             *(("TTFT ms", "decode tok/s") if single else ()))]
    for r in results:
        row = [r.provider, str(r.num_prompts), str(r.num_prompts * r.output_len), f"{r.seconds:.2f}",
               f"{r.output_tok_s:.1f}", f"{r.requests_s:.2f}"]
        if single:
            row += [f"{r.first_token_s * 1e3:.1f}", "-" if r.decode_tok_s is None else f"{r.decode_tok_s:.1f}"]
        rows.append(row)
    return _text_table(rows)


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    import fastllm
    from fastllm.bench import bench_fastllm, bench_hf, random_prompts
    from fastllm.config import scheduling_defaults

    for flag in ("input_len", "output_len", "num_prompts", "hf_batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.seed < 2**63:  # torch's generator seed (a larger one ends in "Overflow when unpacking long long")
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.json is not None and os.path.isdir(args.json):
        raise UsageError(f"--json must name a file, not a folder: {args.json}")
    if args.json is not None:  # checked now, not when the results are written after the whole run
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise UsageError(f"--json {args.json}: its folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (os.path.exists(args.json) and not os.access(args.json, os.W_OK)):
            raise UsageError(f"--json {args.json}: not writable")
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    model, _ = _load(args.model, dtype, device, with_tokenizer=False)  # token-id prompts: no tokenizer needed
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and args.input_len + args.output_len > context:
        raise UsageError(f"--input-len {args.input_len} + --output-len {args.output_len} exceeds the model's context "
                         f"of {context} tokens")
    prompts = random_prompts(model.get_input_embeddings().num_embeddings, args.num_prompts, args.input_len,
                             args.seed)
    print(f"fastllm bench: {args.num_prompts} prompt(s) of {args.input_len} tokens, {args.output_len} new tokens "
          f"each, greedy ({device.type}, {str(dtype).removeprefix('torch.')})", file=sys.stderr, flush=True)
    # HF eager first: fastllm.LLM(model) optimizes the model in place.
    results = [] if args.no_baseline else [bench_hf(model, prompts, args.output_len, args.hf_batch_size)]
    provider = "fastllm" if args.quantization is None else f"fastllm ({args.quantization})"
    sizes = {"max_model_len": args.input_len + args.output_len}
    if device.type == "cpu":  # the CPU's default cache is a fixed 65,536 tokens: take what the prompts running at
        # once need (at most the CPU's default max_num_seqs of them, each rounded up to whole blocks)
        running = min(args.num_prompts, scheduling_defaults(device)[0])
        sizes["num_kv_tokens"] = running * (sizes["max_model_len"] + 16)
    with fastllm.LLM(model, quantization=args.quantization, **sizes) as llm:
        results.append(bench_fastllm(llm, prompts, args.output_len, provider))
    name = args.model or "demo:SmolLM2-135M-Instruct"
    print(f"model: {name}  device: {device.type}  dtype: {str(dtype).removeprefix('torch.')}  "
          f"prompts: {args.num_prompts} x {args.input_len} tokens -> {args.output_len} new tokens each")
    print(format_bench_table(results))
    if len(results) == 2:
        ratio = results[1].output_tok_s / results[0].output_tok_s
        print(f"{results[1].provider} / hf_eager: {ratio:.2f}x output tok/s")
    if args.json is not None:
        config = {"model": name, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
                  "input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
                  "hf_batch_size": args.hf_batch_size, "quantization": args.quantization, "seed": args.seed}
        with open(args.json, "w") as f:
            json.dump({"config": config, "results": [r.as_dict() for r in results]}, f, indent=1)
    return 0


def _phase(what: str, since: float) -> None:
    """One line of start-up progress on stderr, with the seconds since start-up began."""
    print(f"fastllm serve [{time.perf_counter() - since:6.1f} s] {what}", file=sys.stderr, flush=True)


def _cmd_serve(args: argparse.Namespace) -> int:
    from fastllm.config import MAX_STEP_COUNT

    for name in ("port", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_kv_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        # Refused by OptimizeConfig too, but only in the engine process after the model loaded
        if name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len") and value is not None \
                and value > MAX_STEP_COUNT:
            raise UsageError(f"--{name.replace('_', '-')} must be at most {MAX_STEP_COUNT}, got {value}")
    if args.max_queue is not None and args.max_queue < 0:
        raise UsageError(f"--max-queue must be at least 0, got {args.max_queue}")
    if args.port > 65535:  # else uvicorn's bind() raises OverflowError (a traceback) once the model has loaded
        raise UsageError(f"--port must be at most 65535, got {args.port}")
    if not 0 < args.kv_cache_memory_fraction <= 1:  # NaN too; checked before the model loads, named by its flag
        raise UsageError(f"--kv-cache-memory-fraction must be in (0, 1], got {args.kv_cache_memory_fraction}")
    if args.num_kv_tokens is not None and args.max_model_len is not None and args.num_kv_tokens < args.max_model_len:
        # LLM would cap the context at what the cache holds: the server would quietly serve a shorter one
        raise UsageError(f"--max-model-len {args.max_model_len} does not fit --num-kv-tokens {args.num_kv_tokens} (one "
                         "sequence's KV cache); raise --num-kv-tokens or lower --max-model-len")
    if args.served_model_name is not None and not args.served_model_name.strip():
        # (fell back to MODEL's name silently: clients asking for the name given were refused as an unknown model)
        raise UsageError(f"--served-model-name must be a non-empty name, got {args.served_model_name!r}")
    from fastllm.serve.app import check_api_key

    try:
        check_api_key(args.api_key, "--api-key (or $FASTLLM_API_KEY)")
    except ValueError as error:
        raise UsageError(str(error)) from None
    # Before the model loads (minutes for a large one): a port in use or an address not on this machine was only found
    # by uvicorn once the server was "ready", exiting with code 3 after printing that it serves.
    _check_listen(args.host, args.port)
    try:
        import uvicorn

        from fastllm.serve.app import build_app
        from fastllm.serve.engine import ServingEngine
    except ImportError as e:
        raise UsageError(f"fastllm serve needs the server packages: pip install 'fastllm[serve]' ({e})") from e
    from fastllm.entrypoints.engine_process import EngineClient

    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    _check_model_arg(args.model)
    started = time.perf_counter()
    options = {k: v for k, v in (("max_num_seqs", args.max_num_seqs),
                                 ("max_num_batched_tokens", args.max_num_batched_tokens),
                                 ("max_model_len", args.max_model_len), ("num_kv_tokens", args.num_kv_tokens),
                                 ("quantization", args.quantization))
               if v is not None}
    # The engine runs in its own process: the server's event loop and the engine's step would share one GIL, and at a
    # thousand streams each slows the other several times over (see entrypoints/engine_process.py).
    engine = EngineClient(functools.partial(_build_served_llm, args.model, dtype, device, started,
                                            kv_cache_memory_fraction=args.kv_cache_memory_fraction, **options))
    try:
        _phase("ready", started)
        max_queue = args.max_queue if args.max_queue is not None else engine.max_num_seqs
        name = args.served_model_name or args.model or "demo"
        app = build_app(ServingEngine(engine, max_queue), name, api_key=args.api_key)
        print(f"fastllm: serving {name} on http://{args.host}:{args.port} (OpenAI: /v1, Triton/KServe: /v2)",
              flush=True)
        # Connections beyond what admission could ever use (streams, waiting clients, probes) are answered 503 by
        # uvicorn itself: a flood of idle or half-sent connections cannot exhaust the process.
        limit = 2 * (engine.max_num_seqs + max_queue) + 64
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5,
                    limit_concurrency=limit)
    finally:
        engine.shutdown()
    return 0


def _check_listen(host: str, port: int) -> None:
    """UsageError unless a server socket can bind `host`:`port` (uvicorn's own way: IPv6 for a host with a colon,
    SO_REUSEADDR so a port in TIME_WAIT is not mistaken for one in use)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:  # gaierror (unknown host) included
            reason = e.strerror or str(e)
            raise UsageError(f"cannot listen on --host {host} --port {port}: {reason}") from None


def _build_served_llm(model_arg: str | None, dtype, device, started: float, **llm_options):
    """In the engine process: load, optimize and warm up the served model, showing each phase; returns its LLM."""
    import fastllm

    _phase(f"loading {model_arg or 'the demo model'} ({dtype}, {device})", started)
    model, tokenizer = _load(model_arg, dtype, device)
    _phase("optimizing: graph capture, fusion passes, KV cache", started)
    llm = fastllm.LLM(model, tokenizer=tokenizer, **llm_options)
    _phase("warming up (first step's kernels)", started)
    llm.generate([[1, 2, 3]], fastllm.SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    return llm


if __name__ == "__main__":
    sys.exit(main())
