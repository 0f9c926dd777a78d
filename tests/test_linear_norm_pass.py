"""The opt-in linear_norm pass on a 16-bit model's compiled step: every o_proj and down_proj with the residual add and
RMSNorm after it becomes one linear_add_rms_norm call (the skinny GEMM's last program normalises), whose counter
lives on the weights' device when the graph comes from the graph cache (whose recorded shapes are on "meta");
on the CPU, where the references run, the logits and tokens are the default step's bit for bit."""

import torch

import fastllm
from fastllm.passes import linear_norm
from tests._models import build, optimize


def test_linear_norm_folds_each_norm_into_the_linear_before_it(tmp_path, monkeypatch):
    graphs = []
    apply = linear_norm.apply

    def recording(ctx):
        graphs.append(ctx.gm)
        return apply(ctx)

    monkeypatch.setattr(linear_norm, "apply", recording)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    results = []
    passes = (*fastllm.DEFAULT_PASSES, "linear_norm")
    # The second optimize() reads the graph the first one captured from the graph cache (before the passes)
    for selection in (fastllm.DEFAULT_PASSES, passes):
        model = build("llama", tmp_path / "llama", dtype=torch.float16)
        optimize(model, passes=selection)
        with torch.no_grad():
            logits = model(ids).logits
        results.append((logits, model.generate(ids, max_new_tokens=6, do_sample=False), fastllm.explain(model)))
    n = model.config.num_hidden_layers
    (logits, tokens, default), (fused_logits, fused_tokens, fused) = results
    assert "linear_norm" not in default.matches and fused.startup["graph_from_cache"]
    assert fused.matches["linear_norm"] == 2 * n  # o_proj and down_proj, each with the norm after it
    assert fused.graph.fused_ops["linear_add_rms_norm"] == 2 * n and "fused_add_rms_norm" not in fused.graph.fused_ops
    counters = [b for b in graphs[-1].buffers() if b.dtype == torch.int32 and b.numel() == 1]
    assert len(counters) == 1 and counters[0].device.type == "cpu" and counters[0].item() == 0
    assert torch.equal(fused_logits, logits) and torch.equal(fused_tokens, tokens)
