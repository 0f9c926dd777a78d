"""What folding the RMSNorm weights into the projections after them (passes/decode_fusion.py, NORM_PROLOGUE
"rms_scale_deferred") does to a real model's output: the demo model (SmolLM2-135M-Instruct, a Llama), CPU.

    PYTHONPATH=. python benchmarks/fold_quality.py [--text PATH] [--max-tokens N] [--bf16-only] [--out DIR]
    PYTHONPATH=. python benchmarks/fold_quality.py --test-models N [--out DIR]

Each variant's logits over a text (default: the fixed text shipped with the tests; --text another, e.g. this
project's README.md, cut at --max-tokens) teacher-forced, against Hugging Face's fp32 forward:
relative error ||x - fp32|| / ||fp32||, top-1 agreement, and perplexity over fp32's.
- bf16: Hugging Face eager bf16; fastllm bf16 with the default passes; fastllm bf16 with decode_fusion (the fold, as
  the pass does it: each W's columns times w in fp32, rounded to bf16 once; past 16 rows, as here, the norm then runs
  without a weight and the GEMM reads the folded W).
- fp8 / int8: `quantization=` as is, and with the norms' weights folded into the float weights first (what folding
  before quantization would give: FP8 W8A8 quantizes each token's activations past 16 rows, here).
Writes DIR/fold-quality-smollm2-cpu-<yyyymmdd>[-n].json (quality, not speed).

--test-models N: instead, the random-weight Llama of tests/test_gpu_parity.py's bf16 comparison with fp32
(`tests._models.build("llama", seed=s)` for s < N), each over 4 x 8 x 128 random tokens (the test's 8 x 128 and three
more draws): per model, for HF eager bf16, fastllm bf16 with the default passes and with decode_fusion, the positions
whose top-1 differs from fp32's and the relative error. Writes DIR/fold-quality-test-llama-cpu-<yyyymmdd>[-n].json.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import pathlib
import sys

import torch
from _common import unused_path

HERE = pathlib.Path(__file__).parent
TEXT = HERE.parent / "tests" / "data" / "perplexity_text.txt"
# fastllm's runtime (its passes and the kernels' reference ops), not Hugging Face's path, which the CPU defaults to
RUNTIME = {"cpu_runtime": True, "on_capture_failure": "raise"}


@torch.no_grad()
def fold_norms(model) -> None:
    """Each decoder layer's input norm into q/k/v, its post-attention norm into gate/up (a Llama's module names),
    in fp32, rounded once to the weights' dtype; the norms' weights then 1."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, linears in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                              (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
            scale = norm.weight.float()
            for linear in linears:
                linear.weight.copy_(linear.weight.float() * scale)
            norm.weight.fill_(1.0)


TOKEN_SEEDS = (3, 11, 12, 13)  # 3: test_gpu_parity's _ids(batch=8, length=128)


def _variant_passes() -> dict[str, tuple[str, ...]]:
    import fastllm

    without_fusion = tuple(p for p in fastllm.DEFAULT_PASSES if p != "decode_fusion")
    return {"fastllm_bf16": without_fusion, "fastllm_bf16_decode_fusion": (*without_fusion, "decode_fusion")}


def test_models(count: int) -> dict:
    """Per seed of the test model: {variant: {"top1_differs": n, "positions": n, "rel_err": e}} (see the docstring)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    import fastllm
    from tests._models import VOCAB, build

    token_sets = [torch.randint(3, VOCAB, (8, 128), generator=torch.Generator().manual_seed(s)) for s in TOKEN_SEEDS]
    per_model = []
    for seed in range(count):
        with tempfile.TemporaryDirectory() as path:
            build("llama", path, seed=seed)

            def load(dtype):
                return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

            with torch.no_grad():
                truth = [t.logits for t in map(load(torch.float32), token_sets)]

            def measure(model) -> dict:
                differs, error, norm = 0, 0.0, 0.0
                with torch.no_grad():
                    for ids, expected in zip(token_sets, truth):
                        logits = model(ids).logits.float()
                        differs += int((logits.argmax(-1) != expected.argmax(-1)).sum())
                        error += float((logits - expected).norm()) ** 2
                        norm += float(expected.norm()) ** 2
                return {"top1_differs": differs, "positions": len(token_sets) * 8 * 128,
                        "rel_err": (error / norm) ** 0.5}

            row = {"seed": seed, "hf_bf16": measure(load(torch.bfloat16))}
            for name, passes in _variant_passes().items():
                model = fastllm.optimize(load(torch.bfloat16), passes=passes, **RUNTIME)
                row[name] = measure(model)
                row[name]["folded_norms"] = fastllm.explain(model).matches.get("decode_fusion", 0)
                fastllm.release(model)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        per_model.append(row)
    totals = {name: {"top1_differs": sum(r[name]["top1_differs"] for r in per_model),
                     "positions": sum(r[name]["positions"] for r in per_model),
                     "rel_err_over_hf_mean": sum(r[name]["rel_err"] / r["hf_bf16"]["rel_err"] for r in per_model)
                     / len(per_model)}
              for name in ("hf_bf16", *_variant_passes())}
    return {"model": "tests._models.build('llama', seed=s), bf16", "token_seeds": TOKEN_SEEDS,
            "per_model": per_model, "totals": totals}


def _write(out: str, stem: str, record: dict) -> None:
    directory = pathlib.Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    path = unused_path(directory / f"{stem}-{datetime.date.today():%Y%m%d}.json")
    record = {"torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"), **record}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--text", default=str(TEXT), help="the text scored (default: tests/data/perplexity_text.txt)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="its first tokens scored (default: 8192)")
    parser.add_argument("--bf16-only", action="store_true", help="skip the quantized variants")
    parser.add_argument("--test-models", type=int, metavar="N",
                        help="measure N seeds of the GPU parity test's random Llama instead (see above)")
    args = parser.parse_args(argv)
    if args.max_tokens < 2:
        parser.error(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.test_models is not None:
        if args.test_models < 1:
            parser.error(f"--test-models must be at least 1, got {args.test_models}")
        _write(args.out, "fold-quality-test-llama-cpu", test_models(args.test_models))
        return 0
    text = pathlib.Path(args.text)

    import fastllm
    from fastllm.models import demo

    model, tokenizer = demo.load_demo_model()
    ids = tokenizer(text.read_text(), return_tensors="pt").input_ids[:, :args.max_tokens]
    with torch.no_grad():
        truth = model(ids).logits.float()

    def perplexity_of(logits: torch.Tensor) -> torch.Tensor:
        return torch.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))

    reference = perplexity_of(truth)

    def measure(model) -> dict:
        with torch.no_grad():
            logits = model(ids).logits.float()
        perplexity = perplexity_of(logits)
        return {"rel_err": float((logits - truth).norm() / truth.norm()),
                "top1_agreement": float((logits.argmax(-1) == truth.argmax(-1)).float().mean()),
                "perplexity_vs_fp32": float(perplexity / reference)}

    variants = {"hf_bf16": lambda m: m.to(torch.bfloat16)}
    for name, passes in _variant_passes().items():
        variants[name] = lambda m, p=passes: fastllm.optimize(m.to(torch.bfloat16), passes=p, **RUNTIME)
    for scheme in () if args.bf16_only else ("fp8", "int8"):
        variants[f"fastllm_{scheme}"] = lambda m, s=scheme: fastllm.optimize(m, quantization=s, **RUNTIME)
        variants[f"fastllm_{scheme}_folded_first"] = lambda m, s=scheme: (
            fold_norms(m), fastllm.optimize(m, quantization=s, **RUNTIME))[1]
    results = {}
    for name, make in variants.items():
        model, _ = demo.load_demo_model()
        results[name] = measure(make(model))
        if name == "fastllm_bf16_decode_fusion":
            results[name]["folded_norms"] = fastllm.explain(model).matches.get("decode_fusion", 0)
        r = results[name]
        print(f"{name:32} rel err {r['rel_err']:.4e}  top-1 {r['top1_agreement']:.4f}  "
              f"perplexity {r['perplexity_vs_fp32']:.4f}x fp32's")
    _write(args.out, "fold-quality-smollm2-cpu",
           {"model": "SmolLM2-135M-Instruct (demo wheel)", "text": text.name,
            "text_sha256": hashlib.sha256(text.read_bytes()).hexdigest(), "tokens": ids.shape[1],
            "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
