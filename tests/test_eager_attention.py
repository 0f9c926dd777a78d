"""Hand-written ("eager") attention recognised in captured graphs (passes/eager_attention.py), and the ALiBi
slopes each family's config declares (models/attention.py), against transformers' own formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastllm.capture import capture
from fastllm.models.attention import LayerAttention, geometric_alibi_slopes, mpt_alibi_slopes
from fastllm.passes import eager_attention
from fastllm.passes.attention import _eager_kwargs

H, S, D = 4, 6, 8


def _causal_mask(s: int) -> torch.Tensor:
    pos = torch.arange(s)
    return torch.where(pos[:, None] >= pos[None, :], 0.0, float("-inf"))


class GemmaStyle(nn.Module):
    """matmul → scale → soft-cap → + mask → softmax(fp32) → matmul, on [B, H, S, D]."""

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(2, 3)) * 0.25
        s = torch.tanh(s / 30.0) * 30.0
        s = s + _causal_mask(q.shape[2])
        p = nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)


class BloomStyle(nn.Module):
    """baddbmm(ALiBi, q, kᵀ) on [B * H, S, D] reshapes, + mask, softmax, bmm."""

    def forward(self, q, k, v):
        b, h, s, d = q.shape
        alibi = (torch.tensor(geometric_alibi_slopes(h))[:, None] * torch.arange(s)[None, :]).reshape(b * h, 1, s)
        scores = alibi.baddbmm(batch1=q.reshape(b * h, -1, d), batch2=k.reshape(b * h, -1, d).transpose(-1, -2),
                               beta=1.0, alpha=0.125)
        weights = scores.view(b, h, s, -1) + _causal_mask(s)
        probs = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs.view(b * h, s, -1), v.reshape(b * h, -1, d))


class PositionBias(nn.Module):
    """A learned bias added to the scores: neither a mask nor ALiBi."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(H, S, S))

    def forward(self, q, k, v):
        p = (torch.matmul(q, k.transpose(-1, -2)) + self.bias).softmax(-1)
        return torch.matmul(p, v)


class RouterSoftmax(nn.Module):
    """A softmax that is not attention (MoE routing)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, 4)

    def forward(self, q, k, v):
        return self.gate(q).softmax(-1) @ torch.ones(4, D)


def _matches(module: nn.Module) -> list:
    found = []

    def transform(gm, tensors):
        found.extend(eager_attention.match(n) for n in gm.graph.nodes if "softmax" in str(n.target))
        return gm

    q, k, v = (torch.randn(1, H, S, D) for _ in range(3))
    with torch.no_grad():
        capture(module.forward, transform)(q, k, v)
    return found


def test_gemma_style_chain():
    [found] = _matches(GemmaStyle())
    assert found is not None
    assert found.scale == pytest.approx(0.25) and found.softcap == 30.0
    assert [eager_attention.looks_like_mask(t) for t in found.additive] == [True]
    assert found.q.meta["example_value"].shape == (1, H, S, D)
    kwargs = _eager_kwargs(found, LayerAttention())
    assert kwargs == {"scale": pytest.approx(0.25), "softcap": 30.0, "alibi": None, "sliding_window": None}


def test_bloom_style_chain_returns_4d_heads_and_alibi():
    [found] = _matches(BloomStyle())
    assert found is not None and found.scale == pytest.approx(0.125) and found.softcap is None
    for node in (found.q, found.k, found.v):
        assert node.meta["example_value"].dim() == 4
    assert sorted(eager_attention.looks_like_mask(t) for t in found.additive) == [False, True]
    slopes = geometric_alibi_slopes(H)
    assert _eager_kwargs(found, LayerAttention(alibi_slopes=slopes))["alibi"] == slopes
    # The same graph without ALiBi in the config: the bias is unexplained, so the attention stays unmatched.
    assert _eager_kwargs(found, LayerAttention()) is None


def test_unexplained_bias_and_other_softmaxes_are_left_alone():
    [found] = _matches(PositionBias())
    assert found is not None and _eager_kwargs(found, LayerAttention()) is None
    assert _matches(RouterSoftmax()) == [None]


@pytest.mark.parametrize("heads", [1, 4, 6, 12, 32, 40, 71])
def test_alibi_slopes_match_transformers(heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    torch.testing.assert_close(torch.tensor(geometric_alibi_slopes(heads)), _get_alibi_slopes(heads, "cpu"))
    # MPT's tensor holds slope * (k - (L - 1)); at L = 2, column 0 is -slope.
    mpt = build_mpt_alibi_tensor(heads, 2, alibi_bias_max=8)[:, 0, 0]
    torch.testing.assert_close(torch.tensor(mpt_alibi_slopes(heads, 8)), -mpt)


class _Masks(nn.Module):
    """Additive terms as models build them: (name, term) pairs, each from positions `pos` [S]."""

    def forward(self, pos, slopes):
        causal = pos[None, :] <= pos[:, None]                                    # bool: a mask
        select = torch.where(causal, 0.0, torch.finfo(torch.float32).min)        # constants picked by a condition
        filled = torch.zeros(pos.shape[0], pos.shape[0]).masked_fill(~causal, -1e9)
        bias = slopes[:, None, None] * pos[None, None, :].float()                # ALiBi: positions times slopes
        folded = (bias / 4.0).masked_fill(~causal, -1e9)                          # Falcon: bias folded into a mask
        return causal, select, filled + select, bias, folded, select + bias


def test_looks_like_mask_tells_masks_from_biases():
    graphs = []

    def keep(gm, tensors):
        graphs.append(gm)
        return gm

    capture(_Masks(), keep)(torch.arange(6), torch.rand(4))
    output = next(n for n in graphs[0].graph.nodes if n.op == "output").args[0]
    verdicts = [eager_attention.looks_like_mask(term) for term in output]
    assert verdicts == [True, True, True, False, False, False]


def test_sdpa_mask_carrying_an_undeclared_bias_stays_with_the_model(tmp_path, monkeypatch):
    """Falcon-RW folds ALiBi into its SDPA mask. Without the config's ALiBi declared, the attention pass must not
    treat that mask as a plain mask (dropping the bias): the model keeps HF's generate loop, and its output."""
    import transformers as T

    from fastllm.models import attention as declared
    from tests._models import VOCAB, build, optimize

    reference = build("falcon_rw", tmp_path)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = reference.generate(ids, **kwargs)
    monkeypatch.setattr(declared, "ALIBI", {k: v for k, v in declared.ALIBI.items() if k != "falcon"})
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with pytest.warns(RuntimeWarning, match="cannot run on fastllm's paged runtime"):
        optimize(model, graph_cache=False)
    assert model._fastllm_state.core is None
    assert torch.equal(model.generate(ids, **kwargs), expected)
