"""Quantization quality on the real demo model (SmolLM2-135M-Instruct, CPU): perplexity on the fixed text shipped
with the tests, and greedy text for three prompts, for fp32 and each scheme side by side.

    PYTHONPATH=. python benchmarks/quant_quality.py [--out DIR]

fp32 runs Hugging Face's eager forward and generate; each scheme runs `fastllm.optimize(model, quantization=...)`
(the runtime's reference ops on the CPU). SmolLM2's hidden size is 576, which int4's group of 128 does not divide
(those layers stay fp32, reported); groups of 64 and 32 take every layer; "-zp": with zero points. Writes
DIR/quant-quality-smollm2-cpu-<yyyymmdd>.json (quality, not speed: the CPU is fine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import torch

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {"fp32": evaluate(None)}
    for scheme in SCHEMES:
        results[scheme] = evaluate(scheme)
        results[scheme]["perplexity_vs_fp32"] = results[scheme]["perplexity"] / results["fp32"]["perplexity"]
    for name, r in results.items():
        print(f"{name:10} ppl {r['perplexity']:8.3f}  " + " | ".join(repr(t) for t in r["greedy"].values()))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"quant-quality-smollm2-cpu-{datetime.date.today():%Y%m%d}.json"
    path.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (demo wheel)", "torch": torch.__version__,
                                "text": TEXT.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                                "results": results}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
