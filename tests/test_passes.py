"""Each fusion pass on a toy module: match count, ops before and after, and the numbers."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastllm import kernels
from fastllm.capture import capture
from fastllm.passes import PASSES, layer_norm, rms_norm, rotary, run_passes
from fastllm.passes._context import WeightMerger


def _ops(gm) -> Counter:
    """Calls in the graph, by op name."""
    names = Counter()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            names[node.target if isinstance(node.target, str) else node.target.__name__] += 1
    return names


def run_pass(module: nn.Module, inputs: tuple, name: str):
    """(output, matches, ops before, ops after) of `module` captured and rewritten by pass `name` alone."""
    seen = {}

    def transform(gm, tensors):
        seen["before"] = _ops(gm)
        seen["matches"] = run_passes(gm, tensors, WeightMerger(), (name,))[name]
        seen["after"] = _ops(gm)
        return gm

    with torch.no_grad():
        out = capture(module.forward, transform)(*inputs)
    return out, seen["matches"], seen["before"], seen["after"]


class Pattern(nn.Module):
    """Calls a pass's `pattern()` with its own parameters, so the pass sees weights as parameters."""

    def __init__(self, fn, *params, **consts):
        super().__init__()
        self.fn, self.consts = fn, consts
        self.params = nn.ParameterList([nn.Parameter(p) for p in params])

    def forward(self, *inputs):
        return self.fn(*inputs, *self.params, **self.consts)


def _rand(*shape):
    return torch.randn(*shape)


def test_every_pass_has_pattern_and_replacement():
    for module in PASSES.values():
        assert callable(module.pattern) and callable(module.replacement) and callable(module.apply)


@pytest.mark.parametrize("hidden", [8, 769])
def test_rms_norm(hidden):
    module = Pattern(rms_norm.pattern, _rand(hidden), eps=1e-6)
    x = _rand(2, 3, hidden)
    out, matches, before, after = run_pass(module, (x,), "rms_norm")
    assert matches == 1
    assert "rsqrt" in before and "rsqrt" not in after and "pow" not in after
    assert "rms_norm" in after
    torch.testing.assert_close(out, module(x), rtol=0, atol=0)


def _gemma_rms(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).type_as(x)


def _residual_rms(a, b, weight, eps):
    s = a + b
    return rms_norm.pattern(s, weight, eps), s


def test_rms_norm_gemma_form_uses_weight_offset():
    module = Pattern(_gemma_rms, _rand(64), eps=1e-6)
    x = _rand(5, 64)
    out, matches, _, after = run_pass(module, (x,), "rms_norm")
    assert matches == 1 and "rms_norm" in after and "type_as" not in after
    torch.testing.assert_close(out, module(x), rtol=0, atol=0)


def test_rms_norm_fuses_residual_add():
    module = Pattern(_residual_rms, _rand(32), eps=1e-5)
    a, b = _rand(4, 32), _rand(4, 32)
    (out, summed), matches, before, after = run_pass(module, (a, b), "rms_norm")
    assert matches == 1 and "fused_add_rms_norm" in after and "add" in before
    expected_out, expected_sum = module(a, b)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    torch.testing.assert_close(summed, expected_sum, rtol=0, atol=0)


def test_rms_norm_leaves_other_reductions_alone():
    # mean over dim 0, not the hidden dim: not an RMSNorm.
    def not_a_norm(x, weight, eps):
        return weight * (x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps))

    module = Pattern(not_a_norm, _rand(16), eps=1e-6)
    _, matches, _, after = run_pass(module, (_rand(3, 16),), "rms_norm")
    assert matches == 0 and "rsqrt" in after


@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm(residual):
    hidden = 769
    w, b = _rand(hidden), _rand(hidden)
    if residual:
        module = Pattern(lambda x, y, w, b, eps: layer_norm.pattern(x + y, w, b, eps), w, b, eps=1e-5)
        inputs = (_rand(3, hidden), _rand(3, hidden))
    else:
        module = Pattern(layer_norm.pattern, w, b, eps=1e-5)
        inputs = (_rand(3, hidden),)
    out, matches, before, after = run_pass(module, inputs, "layer_norm")
    assert matches == 1 and "layer_norm" in before
    assert ("fused_add_layer_norm" if residual else "layer_norm") in after
    torch.testing.assert_close(out, module(*inputs), rtol=0, atol=0)


def _gptj_rotary(x, cos, sin):
    rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


def _partial_rotary(q, cos, sin):
    r = cos.shape[-1]
    q_rot, q_pass = q[..., :r], q[..., r:]
    return torch.cat((rotary.pattern(q_rot, cos, sin), q_pass), dim=-1)


@pytest.mark.parametrize("form", ["neox", "gptj", "partial"])
def test_rotary(form):
    fn = {"neox": rotary.pattern, "gptj": _gptj_rotary, "partial": _partial_rotary}[form]
    head_dim, rot_dim = 80, (40 if form == "partial" else 80)
    q = _rand(2, 5, 3, head_dim).transpose(1, 2)  # [B, H, S, D] as a non-contiguous view, as HF makes it
    cos, sin = _rand(2, 1, 5, rot_dim), _rand(2, 1, 5, rot_dim)
    module = Pattern(fn)
    out, matches, before, after = run_pass(module, (q, cos, sin), "rotary")
    assert matches == 1 and "rotary_embedding" in after
    assert "neg" in before and "neg" not in after and "cat" not in after
    torch.testing.assert_close(out, module(q, cos, sin), rtol=0, atol=0)


class GatedMLP(nn.Module):
    def __init__(self, hidden, inter, act, merged=False):
        super().__init__()
        self.act, self.merged = act, merged
        if merged:
            self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        else:
            self.gate, self.up = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        if self.merged:  # Phi-3's spelling
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(up * self.act(gate))
        return self.down(self.act(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("act,kernel", [
    (F.silu, "silu_and_mul"),
    (lambda x: F.gelu(x, approximate="tanh"), "gelu_and_mul"),
    (F.gelu, "gelu_and_mul"),
])
@pytest.mark.parametrize("merged", [False, True])
def test_gated_mlp(act, kernel, merged):
    module = GatedMLP(24, 37, act, merged)
    x = _rand(2, 3, 24)
    expected = module(x).detach()
    out, matches, before, after = run_pass(module, (x,), "gated_mlp")
    assert matches == 1 and kernel in after
    assert after["linear"] == 2 and before["linear"] == (2 if merged else 3)  # gate_up GEMM + down
    assert not after["silu"] and not after["gelu"]
    # Separate projections become one GEMM on the merged weight: same sums, another order → fp32 rounding.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    if not merged:
        assert module.up.weight.data_ptr() == module.gate.weight.data_ptr() + module.gate.weight.nbytes


def test_gated_mlp_ignores_other_activations():
    module = GatedMLP(16, 8, torch.tanh)
    _, matches, _, after = run_pass(module, (_rand(2, 16),), "gated_mlp")
    assert matches == 0 and "tanh" in after


class Attention(nn.Module):
    def __init__(self, hidden, q_out, kv_out, bias):
        super().__init__()
        self.q = nn.Linear(hidden, q_out, bias=bias)
        self.k = nn.Linear(hidden, kv_out, bias=bias)
        self.v = nn.Linear(hidden, kv_out, bias=bias)
        self.o = nn.Linear(q_out, hidden, bias=bias)

    def forward(self, x):
        q = self.q(x).view(*x.shape[:-1], -1, 16)
        k = self.k(x).view(*x.shape[:-1], -1, 16)
        return self.o((q * k.sum(-2, keepdim=True)).flatten(-2)) + self.v(x).sum(-1, keepdim=True)


@pytest.mark.parametrize("bias", [False, True])
def test_qkv(bias):
    module = Attention(40, 48, 16, bias)  # 3:1 grouped-query shapes
    x = _rand(2, 7, 40)
    expected = module(x).detach()
    out, matches, before, after = run_pass(module, (x,), "qkv")
    assert matches == 1
    assert before["linear"] == 4 and after["linear"] == 2  # q, k, v → one GEMM; o stays
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert module.k.weight.data_ptr() == module.q.weight.data_ptr() + module.q.weight.nbytes
    assert module.v.weight.data_ptr() == module.k.weight.data_ptr() + module.k.weight.nbytes


def test_qkv_leaves_mixed_bias_groups_apart():
    module = Attention(32, 32, 32, bias=False)
    module.k = nn.Linear(32, 32, bias=True)
    _, matches, _, after = run_pass(module, (_rand(3, 32),), "qkv")
    assert matches == 1 and after["linear"] == 3  # q and v merge; k (with bias) and o stay alone
    assert module.v.weight.data_ptr() == module.q.weight.data_ptr() + module.q.weight.nbytes


def test_passes_call_the_public_kernels():
    # The rewritten graphs call the public launchers, which route CPU tensors to the `_ref` ops.
    for fn in (kernels.rms_norm, kernels.rotary_embedding, kernels.silu_and_mul):
        assert fn.__module__.startswith("fastllm.kernels")


@pytest.mark.parametrize("dtype,expected", [(torch.float16, 2), (torch.float32, 0)])
def test_skinny_linear_takes_16_bit_linears(dtype, expected):
    module = Attention(32, 32, 16, bias=True).to(dtype)
    x = _rand(1, 3, 32).to(dtype)
    reference = module(x).detach()
    out, matches, before, after = run_pass(module, (x,), "skinny_linear")
    assert matches == expected * 2  # q, k, v and o: four linears when 16-bit
    if expected:
        assert after["skinny_linear"] == 4 and not after["linear"]
    # On the CPU skinny_linear runs F.linear itself: identical results.
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
