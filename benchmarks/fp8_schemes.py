"""Which FP8 (e4m3) scaling could meet the whole-model logits gate (>= 25 dB): a plain-PyTorch study on the real demo
model (SmolLM2-135M-Instruct, fp32, CPU), independent of fastllm's kernels.

Every linear but the LM head gets its weight quantized and dequantized ("chan": a scale per output channel, what
fastllm's fp8 does; "block": per 128 x 128 block, DeepSeek-V3's and transformers' fine-grained FP8; "g128": per
output channel and 128 input channels; "none") and its input likewise ("token": a scale per row, fastllm's; "group":
per row and 128 input channels; "none"). SQNR (dB) of the logits against the fp32 model, over the fixed text shipped
with the tests. SmolLM2's 576 input features are not a multiple of 128: its groups there are 64 wide.

    PYTHONPATH=. python benchmarks/fp8_schemes.py [--out DIR]

Writes DIR/fp8-schemes-smollm2-cpu-<yyyymmdd>.json (a study, not a speed measurement).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import torch.nn.functional as F
from _common import write_result

HERE = pathlib.Path(__file__).parent
TEXT = HERE.parent / "tests" / "data" / "perplexity_text.txt"
FP8, FP8_MAX = torch.float8_e4m3fn, 448.0
SCHEMES = [("chan", "token"), ("chan", "none"), ("none", "token"), ("block", "group"), ("block", "none"),
           ("none", "group"), ("g128", "group"), ("g128", "token"), ("block", "token")]


def qdq_rows(x: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """x quantized to e4m3 and back with a scale per row (per `group` columns of a row)."""
    shape = x.shape
    if group:
        x = x.reshape(*shape[:-1], shape[-1] // group, group)
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return ((x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale).reshape(shape)


def qdq_blocks(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    """w quantized to e4m3 and back with a scale per block x block tile (edges padded)."""
    n, k = w.shape
    pn, pk = -(-n // block) * block, -(-k // block) * block
    tiles = F.pad(w, (0, pk - k, 0, pn - n)).reshape(pn // block, block, pk // block, block)
    scale = tiles.abs().amax(dim=(1, 3), keepdim=True).clamp_min(1e-12) / FP8_MAX
    return ((tiles / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale).reshape(pn, pk)[:n, :k]


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - test).pow(2).mean()))


def logits_sqnr(model, ids, reference, weights: str, activations: str) -> float:
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    originals = [m.weight.data for m in linears]
    hooks = []
    for m, w in zip(linears, originals):
        group = 64 if m.in_features % 128 else 128
        m.weight.data = {"chan": lambda w=w: qdq_rows(w), "block": lambda w=w: qdq_blocks(w),
                         "g128": lambda w=w, g=group: qdq_rows(w, g), "none": lambda w=w: w}[weights]()
        if activations != "none":
            g = None if activations == "token" else group
            hooks.append(m.register_forward_pre_hook(lambda module, args, g=g: (qdq_rows(args[0], g),)))
    try:
        with torch.no_grad():
            return sqnr_db(reference, model(ids).logits)
    finally:
        for hook in hooks:
            hook.remove()
        for m, w in zip(linears, originals):
            m.weight.data = w


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    from fastllm.models.demo import load_demo_model

    model, tokenizer = load_demo_model()
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(ids).logits
    results = {}
    for weights, activations in SCHEMES:
        results[f"weights_{weights}_activations_{activations}"] = db = logits_sqnr(model, ids, reference, weights,
                                                                                 activations)
        print(f"weights {weights:5s} activations {activations:5s}: {db:5.1f} dB", flush=True)
    config = {"model": "SmolLM2-135M-Instruct (fp32)", "tokens": ids.shape[1], "gate_db": 25.0,
              "lm_head": "not quantized", "groups": "128 input channels (64 where 576 is not a multiple of 128)"}
    path = write_result("fp8-schemes-smollm2", "cpu", config, {"logits_sqnr_db_vs_fp32": results}, {}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
