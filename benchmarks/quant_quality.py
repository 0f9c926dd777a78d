"""Quantization quality on the real demo model (SmolLM2-135M-Instruct, CPU): perplexity on the fixed text shipped
with the tests, and greedy text for three prompts, for fp32 and each scheme side by side.

    PYTHONPATH=. python benchmarks/quant_quality.py [--out DIR]

fp32 runs Hugging Face's eager forward and generate; each scheme runs `fastllm.optimize(model, quantization=...)`
(the runtime's reference ops on the CPU). SmolLM2's hidden size is 576, which int4's group of 128 does not divide
(those layers stay fp32, reported); groups of 64 and 32 take every layer; "-zp": with zero points.

Two gates of the FP8 issue, measured here on the real model (tests/test_quant_quality.py asserts them):
- "fp8_logits_sqnr": W8A8 logits against Hugging Face's unoptimized forward of the same weights, teacher-forced over
  the fixed text, SQNR = 10 log10(mean(ref^2) / mean((ref - fp8)^2)) over all logits: the bf16 model (the gate,
  >= 25 dB) and the fp32 model, each quantized in its own dtype; bf16 against fp32 for scale.
- "fp8_kv_long_context": teacher-forced top-1 agreement of an FP8 KV cache with the bf16 cache (bf16 weights, both on
  fastllm's runtime) over --kv-tokens tokens (default 8192, SmolLM2's max_position_embeddings) of the fixed text
  repeated, prefilled in steps of --kv-chunk tokens that attend to the earlier ones through the cache (the gate:
  >= 0.99), with the seconds each model's prefill took on this CPU; beside it ("auto_scales") the same with the
  per-layer scales fastllm computes at start-up (`QuantConfig(kv_cache="fp8", kv_scales="auto")`).

Writes DIR/quant-quality-smollm2-cpu-<yyyymmdd>[-n].json (quality, not speed: the CPU is fine; a later run of the
same day takes the next free -n).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import torch
from _common import unused_path

HERE = pathlib.Path(__file__).parent
TEXT = HERE.parent / "tests" / "data" / "perplexity_text.txt"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
SCHEMES = {"fp8": "fp8", "int8": "int8", "int4-g128": ("int4", 128), "int4-g64": ("int4", 64),
           "int4-g32": ("int4", 32), "int4-g64-zp": ("int4", 64, True), "int4-g32-zp": ("int4", 32, True)}


def perplexity(model, tokenizer, text: str) -> float:
    """exp(mean next-token cross-entropy) over the whole text, one forward."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(torch.exp(loss))


def greedy(model, tokenizer, prompt: str, new_tokens: int = 16) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def quantization(spec):
    import fastllm

    if not isinstance(spec, tuple):
        return spec
    return fastllm.QuantConfig(spec[0], group_size=spec[1], zero_point=len(spec) > 2 and spec[2])


def evaluate(scheme: str | None) -> dict:
    import fastllm
    from fastllm.models.demo import load_demo_model

    model, tokenizer = load_demo_model()
    entry = {}
    if scheme is not None:
        fastllm.optimize(model, quantization=quantization(SCHEMES[scheme]))
        layers = fastllm.explain(model).graph.quantized_layers
        entry["quantized_layers"] = sum(1 for s in layers.values() if not s.startswith("not"))
        entry["unquantized_layers"] = sum(1 for s in layers.values() if s.startswith("not"))
    entry["perplexity"] = perplexity(model, tokenizer, TEXT.read_text())
    entry["greedy"] = {p: greedy(model, tokenizer, p) for p in PROMPTS}
    return entry


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(mean(ref^2) / mean((ref - test)^2)) over every element."""
    ref, test = ref.double(), test.double()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - test).pow(2).mean()))


def fp8_logits_sqnr() -> dict:
    """SQNR (dB) of the W8A8 model's logits against Hugging Face's forward of the same weights in bf16 and in fp32."""
    import fastllm
    from fastllm.models.demo import load_demo_model

    _, tokenizer = load_demo_model()
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids
    logits = {}
    for dtype in (torch.bfloat16, torch.float32):
        for quantized in (False, True):
            model, _ = load_demo_model()
            model.to(dtype)
            if quantized:
                fastllm.optimize(model, quantization="fp8", on_capture_failure="raise")
            with torch.no_grad():
                logits[dtype, quantized] = model(ids).logits.float()
    return {"tokens": ids.shape[1],
            "vs_bf16_db": sqnr_db(logits[torch.bfloat16, False], logits[torch.bfloat16, True]),
            "vs_fp32_db": sqnr_db(logits[torch.float32, False], logits[torch.float32, True]),
            "bf16_vs_fp32_db": sqnr_db(logits[torch.float32, False], logits[torch.bfloat16, False]),
            "top1_agreement_vs_bf16": float((logits[torch.bfloat16, False].argmax(-1)
                                             == logits[torch.bfloat16, True].argmax(-1)).float().mean())}


def fp8_kv_long_context(tokens: int, chunk: int) -> dict:
    """Top-1 agreement of the FP8 KV cache with the bf16 cache over `tokens` tokens (capped at the model's context)
    of the fixed text repeated, prefilled in steps of `chunk` tokens."""
    import fastllm
    from fastllm.models.demo import load_demo_model

    model, tokenizer = load_demo_model()
    tokens = min(tokens, model.config.max_position_embeddings)
    text = tokenizer(TEXT.read_text()).input_ids
    ids = (text * -(-tokens // len(text)))[:tokens]
    next_tokens, seconds, scales = {}, {}, None
    auto = fastllm.QuantConfig(weights=None, kv_cache="fp8", kv_scales="auto")
    for name, quantization in (("bf16", None), ("fp8_kv", "fp8_kv"), ("fp8_kv_auto", auto)):
        if name != "bf16":
            model, _ = load_demo_model()
        model.to(torch.bfloat16)
        fastllm.optimize(model, quantization=quantization, cpu_runtime=True, max_num_batched_tokens=chunk,
                         on_capture_failure="raise")
        start = time.perf_counter()
        with torch.no_grad():  # a call longer than a step runs in steps of max_num_batched_tokens
            next_tokens[name] = model(torch.tensor([ids])).logits[0].argmax(-1)
        seconds[name] = time.perf_counter() - start
        if name == "fp8_kv_auto":
            scales = model._fastllm_state.engine().runner.compiled.context.kv_scales
    reference = next_tokens["bf16"]

    def agreement(name):
        same = (reference == next_tokens[name]).float()
        return {"top1_agreement": float(same.mean()), "top1_agreement_first_copy": float(same[:len(text)].mean()),
                "top1_agreement_repeats": float(same[len(text):].mean())}

    return {"tokens": tokens, "chunk": chunk, "dtype": "bfloat16", **agreement("fp8_kv"),
            "bf16_copies_repeats": float((reference[len(text):-1] == torch.tensor(ids[len(text) + 1:])).float().mean()),
            "prefill_seconds": seconds, "auto_scales": {**agreement("fp8_kv_auto"), "scales": scales}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--kv-tokens", type=int, default=8192, help="FP8 KV cache context (capped at the model's)")
    parser.add_argument("--kv-chunk", type=int, default=2048, help="max_num_batched_tokens of its chunked prefill")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {"fp32": evaluate(None)}
    for scheme in SCHEMES:
        results[scheme] = evaluate(scheme)
        results[scheme]["perplexity_vs_fp32"] = results[scheme]["perplexity"] / results["fp32"]["perplexity"]
    for name, r in results.items():
        print(f"{name:10} ppl {r['perplexity']:8.3f}  " + " | ".join(repr(t) for t in r["greedy"].values()))
    sqnr = fp8_logits_sqnr()
    print(f"fp8 logits SQNR over {sqnr['tokens']} tokens: {sqnr['vs_bf16_db']:.2f} dB vs bf16, "
          f"{sqnr['vs_fp32_db']:.2f} dB vs fp32 (bf16 vs fp32: {sqnr['bf16_vs_fp32_db']:.2f} dB)")
    start = time.perf_counter()
    kv = fp8_kv_long_context(args.kv_tokens, args.kv_chunk)
    kv["seconds"] = time.perf_counter() - start
    print(f"fp8 KV cache at {kv['tokens']} tokens (chunks of {kv['chunk']}): top-1 agreement "
          f"{kv['top1_agreement']:.4f} with the bf16 cache ({kv['auto_scales']['top1_agreement']:.4f} with "
          f"kv_scales='auto'), {kv['seconds']:.0f} s")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = unused_path(out / f"quant-quality-smollm2-cpu-{datetime.date.today():%Y%m%d}.json")
    path.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (demo wheel)", "torch": torch.__version__,
                                "text": TEXT.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                                "results": results, "fp8_logits_sqnr": sqnr, "fp8_kv_long_context": kv},
                               indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
