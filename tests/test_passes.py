"""Each fusion pass on a toy module, and the registry that orders them.

Per pass: a toy module whose forward is the pass's `pattern()` (or the Hugging Face spelling it matches) is
captured as fastllm captures models and rewritten by that pass alone; the tests check the match count, the ops
before and after (the pattern's ops gone, the fused kernel there) and the numbers (rewritten graph == eager
module). Separately, `replacement()` is called on random inputs and compared with `pattern()`.

Tolerances (fp32, CPU): on CPU tensors every kernel runs its `<op>_ref`, written operation for operation as
the Hugging Face code the pattern is, so a norm, rotary or dropout rewrite must give the same bits (exact
comparisons). Merging linears (gated_mlp, qkv) computes the same dot products inside one larger GEMM, which
the BLAS may block and sum in another order: those differ by fp32 rounding only (~1e-7 relative), far below
any mistake of the rewrite (a wrong slice, a swapped gate/up, a wrong activation are O(1) errors).
"""

from __future__ import annotations

import operator
import types
import warnings
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fastllm
import fastllm.config
from fastllm import kernels
from fastllm.capture import capture
from fastllm.passes import (
    ALL_PASSES,
    DEFAULT_PASSES,
    RUNTIME_REQUIRED,
    attention,
    decode_act_fusion,
    decode_fusion,
    dropout,
    fp8_input_quant,
    gated_mlp,
    int4_act_fusion,
    layer_norm,
    linear_norm,
    list_index,
    op_histogram,
    qkv,
    quantize,
    reference_ops,
    registry,
    resolve_passes,
    rms_norm,
    rope_table,
    rotary,
    run_passes,
    skinny_linear,
)
from fastllm.passes._context import PassContext, WeightMerger
from fastllm.passes._graph import eliminate_dead_code
from tests._models import build, optimize, with_random_norms

# Merged GEMMs vs separate ones: fp32 rounding only (module docstring). rtol 1e-5 is ~80 fp32 ulps: room for
# a K-term sum regrouped (K ≤ 40 here), while every real mistake is off by O(1).
GEMM_MERGE = dict(rtol=1e-5, atol=1e-5)
EXACT = dict(rtol=0, atol=0)


@dataclass
class Rewrite:
    """A toy module captured and rewritten by one pass."""

    out: object      # what the rewritten graph returned
    matches: int     # the pass's match count
    before: Counter  # unfused ops of the captured graph (op_histogram: shape bookkeeping left out)
    after: Counter   # unfused ops left after the pass
    fused: Counter   # fastllm kernel calls after the pass


def run_pass(module: nn.Module, inputs: tuple, name: str) -> Rewrite:
    """Capture `module` as fastllm does (dynamo, one fx graph) and rewrite it with pass `name` alone."""
    seen = {}

    def transform(gm, tensors):
        seen["before"] = op_histogram(gm)[1]
        seen["matches"] = run_passes(gm, tensors, WeightMerger(), (name,))[name]
        seen["fused"], seen["after"] = op_histogram(gm)
        return gm

    with torch.no_grad():
        out = capture(module.forward, transform)(*inputs)
    return Rewrite(out, seen["matches"], seen["before"], seen["after"], seen["fused"])


class Pattern(nn.Module):
    """Calls a pattern function with its own parameters, so the pass sees weights as parameters (as in a model)."""

    def __init__(self, fn, *params, **consts):
        super().__init__()
        self.fn, self.consts = fn, consts
        self.params = nn.ParameterList([nn.Parameter(p, requires_grad=False) for p in params])

    def forward(self, *inputs):
        return self.fn(*inputs, *self.params, **self.consts)


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _eager(module, *inputs):
    with torch.no_grad():
        return module(*inputs)


# --- dead code ---------------------------------------------------------------------------------------------

def test_dead_code_elimination_keeps_in_place_calls_and_drops_pure_dunder_methods():
    """`x.__eq__(y)` is pure though it ends in an underscore: left unused (HF's packed-sequence mask once the attention
    pass has dropped the mask) it kept a dozen kernels of every CUDA step alive. In-place forms stay."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.call_method("__eq__", (graph.call_method("cumsum", (x, -1)), x))  # pure, unused: both go
    graph.call_method("add_", (x, 1))  # in place
    graph.call_method("__iadd__", (x, 1))
    graph.call_method("__setitem__", (x, 0, 1))
    graph.call_function(operator.eq, (x, x))  # pure, unused
    graph.output(x)
    assert eliminate_dead_code(graph) == 3
    assert [n.target for n in graph.nodes if n.op == "call_method"] == ["add_", "__iadd__", "__setitem__"]
    assert not any(n.op == "call_function" for n in graph.nodes)


# --- list_index ------------------------------------------------------------------------------------------

class ListIndexing(nn.Module):
    """Falcon's multi-query split (`x[..., [-2], :]`), a two-element list, and a tuple index left alone."""

    def forward(self, x):
        pair = (x, x)
        return x[..., [-2], :] + x[..., [0, -1], :].sum(-2, keepdim=True) + pair[1][:, :1]


def _list_indices(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem
            and any(isinstance(p, list) for p in (n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)))]


def test_list_indices_become_device_constants():
    x = _rand(2, 3, 6, 16)
    seen = {}

    def transform(gm, tensors):
        seen["lists_before"] = len(_list_indices(gm))
        seen["matches"] = run_passes(gm, tensors, WeightMerger(), ("list_index",))["list_index"]
        seen["lists_after"] = len(_list_indices(gm))
        seen["constants"] = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
        return gm

    with torch.no_grad():
        out = capture(ListIndexing().forward, transform)(x)
    assert seen["lists_before"] == 2 and seen["matches"] == 2 and seen["lists_after"] == 0
    assert sorted(t.tolist() for t in seen["constants"]) == [[-2], [0, -1]]
    assert all(t.dtype == torch.long and t.device == x.device for t in seen["constants"])
    torch.testing.assert_close(out, _eager(ListIndexing(), x), **EXACT)  # the same indexing, a constant index


# --- reference_ops ---------------------------------------------------------------------------------------

def _norm_then_gate(x, w_norm, w_gate, w_up):
    return gated_mlp.pattern(rms_norm.pattern(x, w_norm, 1e-6), w_gate, w_up)


def test_cpu_graphs_call_the_references_directly():
    """After the fusions, a CPU graph calls `<op>_ref` where it called the launcher (same numbers); the report still
    names the launchers' ops."""
    module = Pattern(_norm_then_gate, _rand(32), _rand(16, 32), _rand(16, 32))
    x = _rand(2, 3, 32)
    seen = {}

    def transform(gm, tensors):
        counts = run_passes(gm, tensors, WeightMerger(), ("rms_norm", "gated_mlp", "reference_ops"))
        seen["counts"], (seen["fused"], _) = counts, op_histogram(gm)
        seen["targets"] = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        return gm

    with torch.no_grad():
        out = capture(module.forward, transform)(x)
    assert seen["counts"] == {"rms_norm": 1, "gated_mlp": 1, "reference_ops": 2}
    assert {kernels.rms_norm_ref, kernels.silu_and_mul_ref} <= seen["targets"]
    assert not {kernels.rms_norm, kernels.silu_and_mul} & seen["targets"]
    assert seen["fused"] == {"rms_norm": 1, "silu_and_mul": 1}
    torch.testing.assert_close(out, _eager(module, x), **GEMM_MERGE)  # gate/up merged: fp32 rounding only


def test_graphs_that_run_kernels_keep_their_launchers():
    """Where the launchers run Triton (CUDA, or the CPU inside triton_on_cpu()), the pass changes nothing."""
    module = Pattern(rms_norm.pattern, _rand(32), eps=1e-6)
    seen = {}

    def transform(gm, tensors):
        with kernels.triton_on_cpu():
            seen["counts"] = run_passes(gm, tensors, WeightMerger(), ("rms_norm", "reference_ops"))
        return gm

    with torch.no_grad():
        capture(module.forward, transform)(_rand(2, 32))
    assert seen["counts"] == {"rms_norm": 1, "reference_ops": 0}


# --- dropout ---------------------------------------------------------------------------------------------

class DropoutResidual(nn.Module):
    """GPT-2's spelling: `residual + dropout(h)` through an `nn.Dropout` module."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, h, residual):
        return residual + self.drop(h * 2.0)


def test_dropout_pattern_is_removed():
    x = _rand(3, 8)
    r = run_pass(Pattern(dropout.pattern, p=0.1), (x,), "dropout")
    assert r.matches == 1 and r.before == {"dropout": 1}
    assert r.after == {} and r.fused == {}
    torch.testing.assert_close(r.out, x, **EXACT)


def test_dropout_module_in_eval_is_removed():
    module = DropoutResidual().eval()
    h, residual = _rand(2, 5, 8), _rand(2, 5, 8)
    r = run_pass(module, (h, residual), "dropout")
    assert r.matches == 1 and r.before["dropout"] == 1
    assert r.after == {"mul": 1, "add": 1}  # the residual add is now plain, for the norm passes to fuse
    torch.testing.assert_close(r.out, _eager(module, h, residual), **EXACT)


def test_dropout_in_training_stays():
    r = run_pass(DropoutResidual().train(), (_rand(4, 8), _rand(4, 8)), "dropout")
    assert r.matches == 0 and r.after["dropout"] == 1


# --- rms_norm --------------------------------------------------------------------------------------------

RMS_OPS = {"pow", "mean", "add", "rsqrt", "mul"}


@pytest.mark.parametrize("hidden", [8, 769])
def test_rms_norm(hidden):
    module = Pattern(rms_norm.pattern, _rand(hidden), eps=1e-6)
    x = _rand(2, 3, hidden)
    r = run_pass(module, (x,), "rms_norm")
    assert r.matches == 1 and RMS_OPS <= set(r.before)
    assert r.after == {} and r.fused == {"rms_norm": 1}
    torch.testing.assert_close(r.out, _eager(module, x), **EXACT)


def _gemma_rms(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).type_as(x)


def test_rms_norm_gemma_one_plus_weight_form():
    module = Pattern(_gemma_rms, _rand(64), eps=1e-6)
    x = _rand(5, 64)
    r = run_pass(module, (x,), "rms_norm")
    assert r.matches == 1 and RMS_OPS | {"type_as"} <= set(r.before)
    assert r.after == {} and r.fused == {"rms_norm": 1}
    # (1 + w) must reach the kernel as weight_offset: without it the output is off by x_normed, O(1).
    torch.testing.assert_close(r.out, _eager(module, x), **EXACT)


def _residual_rms(a, b, weight, eps):
    s = a + b
    return rms_norm.pattern(s, weight, eps), s


def test_rms_norm_fuses_residual_add():
    module = Pattern(_residual_rms, _rand(32), eps=1e-5)
    a, b = _rand(4, 32), _rand(4, 32)
    r = run_pass(module, (a, b), "rms_norm")
    assert r.matches == 1 and r.before["add"] == 2  # the residual add and the eps add
    assert r.after == {} and r.fused == {"fused_add_rms_norm": 1}
    out, summed = r.out
    expected_out, expected_sum = _eager(module, a, b)
    torch.testing.assert_close(out, expected_out, **EXACT)
    torch.testing.assert_close(summed, expected_sum, **EXACT)  # the residual stream continues from the kernel


def test_rms_norm_leaves_other_reductions_alone():
    # mean over dim 0, not the hidden dim: not an RMSNorm.
    def not_a_norm(x, weight, eps):
        return weight * (x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps))

    r = run_pass(Pattern(not_a_norm, _rand(16), eps=1e-6), (_rand(3, 16),), "rms_norm")
    assert r.matches == 0 and r.after == r.before and r.fused == {}


# --- layer_norm ------------------------------------------------------------------------------------------

def _residual_ln(a, b, weight, bias, eps):
    s = a + b
    return layer_norm.pattern(s, weight, bias, eps), s


@pytest.mark.parametrize("spelling", ["pattern", "nn.LayerNorm"])
def test_layer_norm(spelling):
    hidden = 769
    if spelling == "pattern":
        module = Pattern(layer_norm.pattern, _rand(hidden), _rand(hidden), eps=1e-5)
    else:
        module = nn.LayerNorm(hidden, eps=1e-5)
        with torch.no_grad():
            module.weight.normal_(), module.bias.normal_()
    x = _rand(3, hidden)
    r = run_pass(module, (x,), "layer_norm")
    assert r.matches == 1 and r.before == {"layer_norm": 1}
    assert r.after == {} and r.fused == {"layer_norm": 1}
    torch.testing.assert_close(r.out, _eager(module, x), **EXACT)


def test_layer_norm_fuses_residual_add():
    hidden = 769
    module = Pattern(_residual_ln, _rand(hidden), _rand(hidden), eps=1e-5)
    a, b = _rand(3, hidden), _rand(3, hidden)
    r = run_pass(module, (a, b), "layer_norm")
    assert r.matches == 1 and r.before == {"add": 1, "layer_norm": 1}
    assert r.after == {} and r.fused == {"fused_add_layer_norm": 1}
    out, summed = r.out
    expected_out, expected_sum = _eager(module, a, b)
    torch.testing.assert_close(out, expected_out, **EXACT)
    torch.testing.assert_close(summed, expected_sum, **EXACT)


# --- rope_table ------------------------------------------------------------------------------------------

def _logits_with_and_without(model, prompts, passes):
    """Logits of each prompt (at positions 0.., so every table row a prompt reaches is read) from the model
    optimized with `passes`; the model is released after."""
    optimize(model, passes=passes)
    try:
        with torch.no_grad():
            return fastllm.explain(model), [model(ids).logits for ids in prompts]
    finally:
        fastllm.release(model)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt_neox", "gemma"])
def test_rope_table_folds_cos_sin_into_a_table_with_the_same_bits(family, tmp_path):
    model = build(family, tmp_path)
    prompts = [torch.tensor([[5, 6, 7, 8, 9]]), torch.randint(3, 100, (1, 37))]
    without = fastllm.DEFAULT_PASSES[:-1]
    assert fastllm.DEFAULT_PASSES[-1] == "rope_table"
    report, expected = _logits_with_and_without(model, prompts, without)
    assert {"cos", "sin"} <= set(report.unfused_ops)
    report, got = _logits_with_and_without(model, prompts, fastllm.DEFAULT_PASSES)
    assert report.matches["rope_table"] == 2  # cos and sin, shared by every layer
    assert not {"cos", "sin", "cat", "matmul"} & set(report.unfused_ops)
    assert report.unfused_ops["index_select"] == 2
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, **EXACT)


class _PositionMixingRope(nn.Module):
    """A toy model whose cos/sin rows depend on every position of the call (scaled by the largest): no table can
    stand in for it, and rope_table must leave it alone."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.rand(4), persistent=False)

    def forward(self, x, positions):
        freqs = positions[..., None].float() * self.inv_freq / (positions.max() + 1).float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return rotary.pattern(x, emb.cos(), emb.sin())  # the rotary pass makes it a kernel call


def _rope_table_rewrite(module, x, positions, max_positions):
    seen = {}

    def transform(gm, tensors):
        nodes = {n: t for n, t in tensors.items() if n.op == "placeholder"}
        position_node = next(n for n, t in nodes.items() if t is positions)
        x_node = next(n for n, t in nodes.items() if t is x)
        seen["matches"] = run_passes(gm, tensors, WeightMerger(), ("rotary", "rope_table"),
                                     step_inputs=(x_node, position_node), max_positions=max_positions)["rope_table"]
        seen["unfused"] = op_histogram(gm)[1]
        return gm

    with torch.no_grad():
        out = capture(module.forward, transform)(x, positions)
    return out, seen["matches"], seen["unfused"]


def test_rope_table_leaves_cos_sin_that_depend_on_other_positions():
    torch.manual_seed(0)
    module = _PositionMixingRope()
    x, positions = _rand(1, 5, 2, 8), torch.tensor([[3, 4, 5, 6, 7]])
    out, matches, unfused = _rope_table_rewrite(module, x, positions, max_positions=64)
    assert matches == 0 and unfused["cos"] == 1
    torch.testing.assert_close(out, _eager(module, x, positions), **EXACT)


class _PlainRope(_PositionMixingRope):
    def forward(self, x, positions):
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return rotary.pattern(x, emb.cos(), emb.sin())


def test_rope_table_covers_max_positions_and_reads_rows_by_position():
    torch.manual_seed(0)
    module = _PlainRope()
    x, positions = _rand(1, 3, 2, 8), torch.tensor([[9, 0, 63]])  # any order, the last row included
    out, matches, unfused = _rope_table_rewrite(module, x, positions, max_positions=64)
    assert matches == 2 and unfused == {"index_select": 2}
    torch.testing.assert_close(out, _eager(module, x, positions), **EXACT)


# --- rotary ----------------------------------------------------------------------------------------------

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
    r = run_pass(module, (q, cos, sin), "rotary")
    assert r.matches == 1 and {"neg", "mul", "add"} <= set(r.before)
    assert ("stack" if form == "gptj" else "cat") in r.before
    assert r.after == {} and r.fused == {"rotary_embedding": 1}  # the partial form's re-joining cat too
    torch.testing.assert_close(r.out, _eager(module, q, cos, sin), **EXACT)


# --- gated_mlp -------------------------------------------------------------------------------------------

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


def test_gated_mlp_pattern():
    module = Pattern(gated_mlp.pattern, _rand(37, 24), _rand(37, 24))
    x = _rand(2, 3, 24)
    expected = _eager(module, x)
    r = run_pass(module, (x,), "gated_mlp")
    assert r.matches == 1 and r.before == {"linear": 2, "silu": 1, "mul": 1}
    assert r.after == {"linear": 1} and r.fused == {"silu_and_mul": 1}  # one gate_up GEMM
    torch.testing.assert_close(r.out, expected, **GEMM_MERGE)


@pytest.mark.parametrize("act,kernel", [
    (F.silu, "silu_and_mul"),
    (lambda x: F.gelu(x, approximate="tanh"), "gelu_and_mul"),  # Gemma
    (F.gelu, "gelu_and_mul"),
])
@pytest.mark.parametrize("merged", [False, True])
def test_gated_mlp(act, kernel, merged):
    module = GatedMLP(24, 37, act, merged)
    x = _rand(2, 3, 24)
    expected = _eager(module, x)
    r = run_pass(module, (x,), "gated_mlp")
    assert r.matches == 1 and r.before["linear"] == (2 if merged else 3) and r.before["mul"] == 1
    assert r.after == {"linear": 2} and r.fused == {kernel: 1}  # gate_up GEMM + down
    torch.testing.assert_close(r.out, expected, **GEMM_MERGE)  # also catches tanh vs exact GELU (~1e-3 apart)
    if not merged:  # the merged weight is the parameters' storage, not a copy
        assert module.up.weight.data_ptr() == module.gate.weight.data_ptr() + module.gate.weight.nbytes


def test_gated_mlp_ignores_other_activations():
    r = run_pass(GatedMLP(16, 8, torch.tanh), (_rand(2, 16),), "gated_mlp")
    assert r.matches == 0 and r.after == r.before and r.fused == {}


# --- qkv -------------------------------------------------------------------------------------------------

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


def test_qkv_pattern():
    module = Pattern(qkv.pattern, _rand(48, 40), _rand(16, 40), _rand(16, 40))
    x = _rand(2, 7, 40)
    expected = _eager(module, x)
    r = run_pass(module, (x,), "qkv")
    assert r.matches == 1 and r.before == {"linear": 3}
    assert r.after == {"linear": 1} and r.fused == {}  # one GEMM, sliced into q, k, v
    for got, want in zip(r.out, expected, strict=True):
        torch.testing.assert_close(got, want, **GEMM_MERGE)


@pytest.mark.parametrize("bias", [False, True])
def test_qkv(bias):
    module = Attention(40, 48, 16, bias)  # 3:1 grouped-query shapes
    x = _rand(2, 7, 40)
    expected = _eager(module, x)
    r = run_pass(module, (x,), "qkv")
    assert r.matches == 1
    assert r.before["linear"] == 4 and r.after["linear"] == 2  # q, k, v → one GEMM; o stays
    assert r.after - Counter(linear=2) == r.before - Counter(linear=4)  # nothing else touched
    torch.testing.assert_close(r.out, expected, **GEMM_MERGE)
    assert module.k.weight.data_ptr() == module.q.weight.data_ptr() + module.q.weight.nbytes
    assert module.v.weight.data_ptr() == module.k.weight.data_ptr() + module.k.weight.nbytes


def test_qkv_leaves_mixed_bias_groups_apart():
    module = Attention(32, 32, 32, bias=False)
    module.k = nn.Linear(32, 32, bias=True)
    r = run_pass(module, (_rand(3, 32),), "qkv")
    assert r.matches == 1 and r.after["linear"] == 3  # q and v merge; k (with bias) and o stay alone
    assert module.v.weight.data_ptr() == module.q.weight.data_ptr() + module.q.weight.nbytes


# --- skinny_linear ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_skinny_linear_pattern(dtype):
    module = Pattern(skinny_linear.pattern, _rand(32, 64, dtype=dtype))
    x = _rand(1, 3, 64, dtype=dtype)
    r = run_pass(module, (x,), "skinny_linear")
    assert r.matches == 1 and r.before == {"linear": 1}
    assert r.after == {} and r.fused == {"skinny_linear": 1}
    # On CPU tensors skinny_linear runs skinny_linear_ref, which is F.linear itself: the same bits.
    torch.testing.assert_close(r.out, _eager(module, x), **EXACT)


@pytest.mark.parametrize("dtype,expected", [(torch.float16, 4), (torch.bfloat16, 4), (torch.float32, 0)])
def test_skinny_linear_takes_16_bit_linears(dtype, expected):
    module = Attention(32, 32, 16, bias=True).to(dtype)
    x = _rand(1, 3, 32, dtype=dtype)
    reference = _eager(module, x)
    r = run_pass(module, (x,), "skinny_linear")
    assert r.matches == expected  # q, k, v and o when 16-bit; fp32 models keep cuBLAS
    assert r.fused == ({"skinny_linear": 4} if expected else {})
    assert r.after["linear"] == 4 - expected
    torch.testing.assert_close(r.out, reference, **EXACT)  # F.linear on the CPU (above)


def test_passes_call_the_public_kernels():
    # The rewritten graphs call the public launchers, which route CPU tensors to the `_ref` ops.
    for fn in (kernels.rms_norm, kernels.rotary_embedding, kernels.silu_and_mul):
        assert fn.__module__.startswith("fastllm.kernels")


# --- replacement() computes what pattern() does -----------------------------------------------------------
# Each case: (pattern's output, replacement's output, tolerance) on random inputs.

def _dropout_case():
    x = _rand(3, 8)
    return dropout.pattern(x, 0.1), dropout.replacement(x, 0.1), EXACT


def _rms_norm_case():
    x, w = _rand(3, 5, 64), _rand(64)
    return rms_norm.pattern(x, w, 1e-6), rms_norm.replacement(x, w, 1e-6), EXACT


def _layer_norm_case():
    x, w, b = _rand(3, 5, 769), _rand(769), _rand(769)
    return layer_norm.pattern(x, w, b, 1e-5), layer_norm.replacement(x, w, b, 1e-5), EXACT


def _rotary_case():
    x = _rand(2, 5, 3, 80).transpose(1, 2)
    cos, sin = _rand(2, 1, 5, 80), _rand(2, 1, 5, 80)
    return rotary.pattern(x, cos, sin), rotary.replacement(x, cos, sin), EXACT


def _rope_table_case():
    inv_freq, positions = _rand(4).abs(), torch.tensor([[7, 2, 0, 11]])
    table = rope_table.pattern(torch.arange(12).view(1, -1), inv_freq)
    return rope_table.pattern(positions, inv_freq), rope_table.replacement(positions, table), EXACT


def _gated_mlp_case():
    x, w_gate, w_up = _rand(2, 3, 24), _rand(37, 24), _rand(37, 24)
    merged = torch.cat([w_gate, w_up])  # the layout apply() builds: [Wg; Wu]
    return gated_mlp.pattern(x, w_gate, w_up), gated_mlp.replacement(x, merged), GEMM_MERGE


def _qkv_case():
    x, w_q, w_k, w_v = _rand(2, 7, 40), _rand(48, 40), _rand(16, 40), _rand(16, 40)
    merged, sizes = torch.cat([w_q, w_k, w_v]), [48, 16, 16]
    return qkv.pattern(x, w_q, w_k, w_v), qkv.replacement(x, merged, sizes), GEMM_MERGE


def _skinny_linear_case(dtype):
    x, w = _rand(1, 3, 64, dtype=dtype), _rand(32, 64, dtype=dtype)
    return skinny_linear.pattern(x, w), skinny_linear.replacement(x, w), EXACT  # F.linear on the CPU


def _decode_fusion_case():
    half = dict(dtype=torch.float16)
    x, residual, w_down = _rand(1, 48, **half), _rand(1, 32, **half), _rand(32, 48, **half)
    norm_weight, w_next = _rand(32, **half), _rand(24, 32, **half)
    args = (x, residual, w_down, norm_weight, w_next, 1e-6)
    # The references of the fused kernels, rounded where the unfused ones round: the same bits on the CPU
    return decode_fusion.pattern(*args), decode_fusion.replacement(*args), EXACT


def _decode_act_fusion_case():
    half = dict(dtype=torch.float16)
    gate_up, w_down = _rand(1, 2 * 40, **half), _rand(24, 40, **half)
    return decode_act_fusion.pattern(gate_up, w_down), decode_act_fusion.replacement(gate_up, w_down), EXACT


def _linear_norm_case():
    """On the CPU both forms run the references (the linear, then the residual add and the norm): the same bits."""
    half = dict(dtype=torch.float16)
    x, w, residual, norm_weight = _rand(1, 48, **half), _rand(32, 48, **half), _rand(1, 32, **half), _rand(32, **half)
    counter = torch.zeros(1, dtype=torch.int32)
    return (linear_norm.pattern(x, w, residual, norm_weight, 1e-6),
            linear_norm.replacement(x, w, residual, norm_weight, 1e-6, counter), EXACT)


def _fp8_input_quant_case():
    """On the CPU both forms run the references (the norm in fp32, then fp8_linear_ref): the same bits."""
    x, norm_weight = _rand(5, 64), _rand(64)
    qweight, scale = quantize.quantized_tensors(_rand(24, 64), "fp8", 128)
    args = (x, norm_weight, qweight, scale, 1e-6)
    return fp8_input_quant.pattern(*args), fp8_input_quant.replacement(*args), EXACT


def _int4_act_fusion_case():
    """On the CPU both forms run the references (int4_linear_ref, then silu_and_mul_ref): the same bits."""
    x = _rand(3, 64)
    packed, scales = quantize.quantized_tensors(_rand(48, 64), "int4", 32)
    return int4_act_fusion.pattern(x, packed, scales), int4_act_fusion.replacement(x, packed, scales), EXACT


def _quantize_case():
    """fp8 on values e4m3 holds exactly (each row's largest magnitude 448 times a power of two): quantizing loses
    nothing, so the quantized linear computes the float one up to summation order."""
    from fastllm.quant.fp8 import FP8

    def exact(rows, cols, scale):
        codes = _rand(rows, cols).mul(64).clamp(-448, 448).to(FP8).float()
        codes[:, 0] = 448.0
        return codes * scale

    x, w = exact(5, 64, 2.0**-9), exact(24, 64, 2.0**-12)
    qweight, scale = quantize.quantized_tensors(w, "fp8", 128)
    return quantize.pattern(x, w), quantize.replacement(x, qweight, scale), GEMM_MERGE


def _attention_case():
    """One causal sequence of 7 tokens through the paged op: its K/V written to a 4-slot-block cache, then attended
    over through the block table (grouped-query: 4 query heads over 2 KV heads)."""
    from fastllm.kernels.step_attention import AttentionMetadata, StepContext

    tokens, q_heads, kv_heads, head_dim, block_size = 7, 4, 2, 16, 4
    q, k, v = _rand(1, q_heads, tokens, head_dim), _rand(1, kv_heads, tokens, head_dim), _rand(1, kv_heads, tokens,
                                                                                                head_dim)
    caches = [(torch.full((3, block_size, kv_heads, head_dim), float("nan")),
               torch.full((3, block_size, kv_heads, head_dim), float("nan")))]  # unwritten slots are never read
    metadata = AttentionMetadata(slot_mapping=torch.tensor([4, 5, 6, 7, 0, 1, 2]),  # blocks 1 then 0
                                 block_tables=torch.tensor([[1, 0]], dtype=torch.int32),
                                 seq_lens=torch.tensor([tokens], dtype=torch.int32),
                                 cu_seqlens_q=torch.tensor([0, tokens], dtype=torch.int32), max_seqlen_q=tokens)
    context = StepContext()
    with context.step(metadata, caches):
        got = attention.replacement(q, k, v, context.id, 0, 0.25)
    # fp32: the reference paged attention sums in another order than SDPA (softmax over gathered blocks).
    return attention.pattern(q, k, v, 0.25), got, GEMM_MERGE


def _list_index_case():
    x = _rand(2, 5, 6, 16)
    return list_index.pattern(x), list_index.replacement(x, torch.tensor([-2])), EXACT


def _reference_ops_case():
    x, w = _rand(3, 5, 64), _rand(64)
    return reference_ops.pattern(x, w, 1e-6), reference_ops.replacement(x, w, 1e-6), EXACT


REPLACEMENT_CASES = {
    "reference_ops": _reference_ops_case,
    "attention": _attention_case,
    "list_index": _list_index_case,
    "dropout": _dropout_case,
    "rms_norm": _rms_norm_case,
    "layer_norm": _layer_norm_case,
    "rotary": _rotary_case,
    "rope_table": _rope_table_case,
    "gated_mlp": _gated_mlp_case,
    "qkv": _qkv_case,
    "quantize": _quantize_case,
    "decode_fusion": _decode_fusion_case,
    "decode_act_fusion": _decode_act_fusion_case,
    "fp8_input_quant": _fp8_input_quant_case,
    "int4_act_fusion": _int4_act_fusion_case,
    "linear_norm": _linear_norm_case,
    "skinny_linear[fp16]": lambda: _skinny_linear_case(torch.float16),
    "skinny_linear[bf16]": lambda: _skinny_linear_case(torch.bfloat16),
}


@pytest.mark.parametrize("case", sorted(REPLACEMENT_CASES))
def test_replacement_computes_pattern(case):
    torch.manual_seed(0)
    expected, got, tolerance = REPLACEMENT_CASES[case]()
    if isinstance(expected, tuple):  # qkv: three projections
        assert isinstance(got, tuple) and len(got) == len(expected)
    else:
        expected, got = (expected,), (got,)
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        torch.testing.assert_close(g, e, **tolerance)


def test_every_pass_has_a_replacement_case():
    covered = {case.split("[")[0] for case in REPLACEMENT_CASES}
    assert covered == set(registry.REGISTRY.order)


# --- the registry: one list, one order --------------------------------------------------------------------

def test_all_passes_is_one_list():
    assert fastllm.ALL_PASSES == fastllm.config.ALL_PASSES == ALL_PASSES == registry.REGISTRY.selectable
    assert ALL_PASSES == ("dropout", "rms_norm", "layer_norm", "rotary", "gated_mlp", "qkv", "decode_act_fusion",
                          "decode_fusion", "fp8_input_quant", "int4_act_fusion", "linear_norm", "rope_table")
    assert RUNTIME_REQUIRED == ("list_index", "attention", "quantize", "skinny_linear", "reference_ops")
    # decode_fusion, fp8_input_quant, int4_act_fusion and linear_norm are opt-in
    assert fastllm.DEFAULT_PASSES == registry.DEFAULT_PASSES == (*ALL_PASSES[:-5], "rope_table")
    assert fastllm.OptimizeConfig().passes == fastllm.DEFAULT_PASSES


def _pass_modules():
    return [registry.REGISTRY.module(name) for name in registry.REGISTRY.order]


@pytest.mark.parametrize("listing", ["as registered", "reversed"])
def test_canonical_order_follows_the_declarations(listing):
    modules = _pass_modules()
    # Listed backwards, only the declared constraints can keep the order right (the listing breaks ties only).
    order = registry.PassRegistry(modules[::-1] if listing == "reversed" else modules).order
    rank = {name: i for i, name in enumerate(order)}
    for module in modules:
        assert all(rank[first] < rank[module.NAME] for first in module.RUNS_AFTER)
        assert all(rank[module.NAME] < rank[then] for then in module.RUNS_BEFORE)
    # The constraints themselves (why: see each module's declaration).
    assert order[0] == "dropout"
    assert rank["gated_mlp"] < rank["qkv"]
    assert rank["rotary"] < rank["attention"]
    assert rank["skinny_linear"] > max(rank["gated_mlp"], rank["qkv"])


def test_resolve_passes_orders_and_adds_the_runtime_passes():
    assert resolve_passes(("qkv", "gated_mlp")) == ("list_index", "gated_mlp", "qkv", "attention", "quantize",
                                                    "skinny_linear", "reference_ops")
    assert resolve_passes(()) == ("list_index", "attention", "quantize", "skinny_linear", "reference_ops")
    assert resolve_passes(("rotary",)) == ("list_index", "rotary", "attention", "quantize", "skinny_linear",
                                           "reference_ops")
    full = resolve_passes(ALL_PASSES)
    assert full == registry.REGISTRY.order and resolve_passes(full) == full  # idempotent
    with pytest.raises(ValueError, match=r"unknown pass name\(s\) \['fused_softmax'\]; allowed: dropout"):
        resolve_passes(("rms_norm", "fused_softmax"))


def test_config_puts_passes_in_canonical_order():
    # The order a user writes does not matter: gated_mlp must run before qkv or the MLP fusion is lost.
    assert fastllm.OptimizeConfig(passes=("qkv", "gated_mlp")).passes == ("gated_mlp", "qkv")
    assert fastllm.OptimizeConfig(passes=["rotary", "dropout", "rotary"]).passes == ("dropout", "rotary")
    with pytest.raises(ValueError, match=r"\['attention'\] always run in the runtime's graph.*allowed: dropout"):
        fastllm.OptimizeConfig(passes=("rms_norm", "attention"))
    with pytest.raises(ValueError, match=r"unknown pass name\(s\) \['rmsnorm'\]; allowed: dropout, rms_norm"):
        fastllm.OptimizeConfig(passes=("rmsnorm",))


def test_run_passes_runs_the_canonical_order():
    module = GatedMLP(24, 37, F.silu)
    x = _rand(2, 3, 24)
    expected = _eager(module, x)
    seen = {}

    def transform(gm, tensors):
        seen["matches"] = run_passes(gm, tensors, WeightMerger(), ("qkv", "gated_mlp"))
        seen["fused"] = op_histogram(gm)[0]
        return gm

    with torch.no_grad():
        out = capture(module.forward, transform)(x)
    # Run as given, qkv would merge gate/up into one plain linear and gated_mlp would find nothing.
    assert list(seen["matches"].items()) == [("gated_mlp", 1), ("qkv", 0)]
    assert seen["fused"] == {"silu_and_mul": 1}
    torch.testing.assert_close(out, expected, **GEMM_MERGE)


def test_run_passes_refuses_an_unknown_name_before_running_any():
    class EvalDropout(nn.Module):
        def forward(self, x):
            return dropout.pattern(x, 0.1)

    gm = torch.fx.symbolic_trace(EvalDropout())
    with pytest.raises(ValueError, match=r"unknown pass name\(s\) \['fused_softmax'\]; allowed: dropout"):
        run_passes(gm, {}, WeightMerger(), ("dropout", "fused_softmax"))
    assert op_histogram(gm)[1] == {"dropout": 1}  # the dropout pass did not run either


def test_optimize_with_passes_in_the_wrong_order_still_fuses_the_mlp(tmp_path):
    model = build("llama", tmp_path)
    layers = model.config.num_hidden_layers
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(ids).logits
    optimize(model, passes=("qkv", "gated_mlp"))  # warm-up captures the compiled step
    report = fastllm.explain(model)
    assert report.matches == {"list_index": 0, "gated_mlp": layers, "qkv": layers, "attention": layers,
                              "quantize": 0, "skinny_linear": 0, "reference_ops": 2 * layers}  # silu_and_mul, attention
    assert "silu" not in report.unfused_ops
    logits = model(ids).logits  # the same compiled step: nothing captured again
    assert fastllm.explain(model).graph is report.graph
    # fp32 on the CPU: the reference ops and merged GEMMs, as test_parity.py allows.
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def _fake_pass(name, after=(), before=(), runtime=False):
    return types.SimpleNamespace(NAME=name, RUNS_AFTER=after, RUNS_BEFORE=before, RUNTIME_REQUIRED=runtime)


def test_a_declared_cycle_is_refused():
    passes = [
        _fake_pass("a", before=("b",)),
        _fake_pass("b", after=("a",)),
        _fake_pass("c", after=("b",), before=("a",)),  # a → b → c → a
        _fake_pass("d", after=("c",)),  # stuck behind the cycle, but not on it
        _fake_pass("e"),
    ]
    with pytest.raises(ValueError, match=r"form a cycle: a -> b -> c -> a$"):
        registry.PassRegistry(passes)
    with pytest.raises(ValueError, match=r"form a cycle: x -> x$"):
        registry.PassRegistry([_fake_pass("x", after=("x",))])


def test_bad_declarations_are_refused():
    with pytest.raises(ValueError, match=r"pass 'a' declares RUNS_AFTER 'qvk', which is no registered pass"):
        registry.PassRegistry([_fake_pass("a", after=("qvk",))])
    with pytest.raises(ValueError, match="two pass modules declare NAME 'a'"):
        registry.PassRegistry([_fake_pass("a"), _fake_pass("a")])
    with pytest.raises(ValueError, match="RUNS_BEFORE must be a tuple of pass names"):
        registry.PassRegistry([_fake_pass("a", before="b"), _fake_pass("b")])


def test_a_registry_of_fake_passes_resolves_like_the_real_one():
    fake = registry.PassRegistry([_fake_pass("late", after=("early",)), _fake_pass("early"),
                                  _fake_pass("always", after=("late",), runtime=True)])
    assert fake.order == ("early", "late", "always")
    assert fake.selectable == ("early", "late") and fake.runtime_required == ("always",)
    assert fake.resolve(("late",)) == ("late", "always")
    assert fake.select(("late", "early")) == ("early", "late")
    with pytest.raises(ValueError, match=r"\['always'\] always run in the runtime's graph"):
        fake.select(("always",))
    with pytest.raises(ValueError, match="sequence of pass names, got the string 'late'"):
        fake.resolve("late")


# --- decode_fusion on a whole model ----------------------------------------------------------------------

@pytest.mark.parametrize("norm_prologue", ["rms_norm", "rms_norm_deferred"])
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_decode_fusion_folds_norms_activations_and_residual_adds_into_the_decode_gemms(tmp_path, family,
                                                                                    norm_prologue, monkeypatch):
    """A 16-bit model's compiled step: every layer's two norms, its gated activation and its two residual adds go
    into fused_linear calls (the last layer's MLP add stays with the final norm, which feeds no linear directly);
    on the CPU, where the references run, the logits and the greedy tokens are the unfused step's, bit for bit (the
    deferred norm, decode_fusion.NORM_PROLOGUE, is the norm kernel's reference there too)."""
    monkeypatch.setattr(decode_fusion, "NORM_PROLOGUE", norm_prologue)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    results = {}
    for passes in ((*DEFAULT_PASSES, "decode_fusion"), DEFAULT_PASSES):
        model = with_random_norms(build(family, tmp_path / family, dtype=torch.float16))
        optimize(model, passes=passes)
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
        results[passes] = (logits, tokens, fastllm.explain(model))
    (fused_logits, fused_tokens, fused), (logits, tokens, unfused) = results.values()
    n = build(family, tmp_path / "config", dtype=torch.float16).config.num_hidden_layers
    # Per layer: SiLU/GELU * up into down_proj (decode_act_fusion, a default pass, runs first); the attention's
    # residual add + norm into o_proj and gate_up; the MLP's add + the next layer's input norm into down_proj and qkv
    # (n - 1 of those); the first input norm into qkv.
    assert fused.matches["decode_act_fusion"] == unfused.matches["decode_act_fusion"] == n
    assert fused.matches["decode_fusion"] == n + (n - 1) + 1
    assert fused.graph.fused_ops["fused_linear"] == 4 * n
    assert "silu_and_mul" not in fused.graph.fused_ops and "gelu_and_mul" not in fused.graph.fused_ops
    assert fused.graph.fused_ops["fused_add_rms_norm"] == 1  # the last layer's, before the final norm
    assert unfused.graph.fused_ops["fused_add_rms_norm"] == 2 * n
    assert torch.equal(fused_logits, logits)
    assert torch.equal(fused_tokens, tokens)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_decode_fusion_folds_the_norm_weights_into_the_gemms(tmp_path, family, monkeypatch):
    """decode_fusion.NORM_PROLOGUE "rms_scale_deferred": each folded norm's weight goes into its consumers' W (the
    norm's weight becomes offset + w = 1; Gemma's offset is 1), the same fused_linear calls as the other forms; the
    step computes what the unfolded step computed (fp16 on the CPU, where skinny_linear runs: the fold rounds each
    weight once more, 2^-11 relative, which moves these logits by ~1e-3) and the embedding is untouched. (A norm whose
    weight is 1 - offset folds a scale of exactly 1: another compile of the same model changes nothing more.)"""
    assert decode_fusion.NORM_PROLOGUE == "rms_scale_deferred"  # the pass's default form
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    reference = with_random_norms(build(family, tmp_path / "reference", dtype=torch.float16))
    optimize(reference)  # the default passes: the norms stay kernels (their references here)
    with torch.no_grad():
        expected = reference(ids).logits
    model = with_random_norms(build(family, tmp_path / "model", dtype=torch.float16))
    embed = model.get_input_embeddings().weight.clone()
    optimize(model, passes=(*DEFAULT_PASSES, "decode_fusion"))
    with torch.no_grad():
        logits = model(ids).logits
    report = fastllm.explain(model)
    n = model.config.num_hidden_layers
    assert report.matches["decode_fusion"] == n + (n - 1) + 1
    assert report.graph.fused_ops["fused_linear"] == 4 * n
    offset = 1.0 if family == "gemma" else 0.0
    for layer, ref_layer in zip(model.model.layers, reference.model.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.all(getattr(layer, norm).weight == 1.0 - offset)
        for folded, weight, norm in ((layer.self_attn.q_proj, ref_layer.self_attn.q_proj, "input_layernorm"),
                                     (layer.mlp.up_proj, ref_layer.mlp.up_proj, "post_attention_layernorm")):
            scale = offset + getattr(ref_layer, norm).weight.float()
            assert torch.equal(folded.weight, (weight.weight.float() * scale).half())  # in fp32, rounded once
        torch.testing.assert_close(layer.self_attn.o_proj.weight, ref_layer.self_attn.o_proj.weight)  # no norm before
    assert torch.equal(model.get_input_embeddings().weight, embed)
    torch.testing.assert_close(logits, expected, rtol=1e-2, atol=1e-2)
    tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, reference.generate(ids, max_new_tokens=6, do_sample=False))


def test_release_says_the_folded_weights_stay_folded(tmp_path):
    """The fold changes the model's parameters in place (its state_dict is no longer the checkpoint's): release() warns
    of it, once per release, and only where a norm was folded; a second optimize() of the released model folds
    nothing more (its norms' weights are 1) and computes the same logits."""
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model = with_random_norms(build("llama", tmp_path / "llama", dtype=torch.float16))
    optimize(model, passes=(*DEFAULT_PASSES, "decode_fusion"), cpu_runtime=True)  # model(ids) runs the compiled step
    with torch.no_grad():
        first = model(ids).logits
    n = model.config.num_hidden_layers
    assert fastllm.explain(model).matches["decode_fusion"] == 2 * n
    with pytest.warns(RuntimeWarning, match=rf"keeps the weights decode_fusion folded \({2 * n} RMSNorm"):
        fastllm.release(model)
    optimize(model, passes=(*DEFAULT_PASSES, "decode_fusion"), cpu_runtime=True)
    with torch.no_grad():
        again = model(ids).logits
    assert fastllm.explain(model).matches["decode_fusion"] == 2 * n  # fused as before, with scales of 1
    assert torch.equal(again, first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing folded this time: no warning
        fastllm.release(model)
    plain = build("llama", tmp_path / "plain", dtype=torch.float16)
    optimize(plain, cpu_runtime=True)
    with torch.no_grad():
        plain(ids)
    assert fastllm.explain(plain).status == "optimized"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastllm.release(plain)


def test_decode_fusion_does_not_fold_a_norm_into_a_shared_or_tied_weight():
    """A consumer's W that another linear also reads (a weight shared between layers would be folded twice) or that is
    an embedding table (a tied LM head) keeps its values: the norm is left as it is."""
    def graph_with(shared: bool, tied: bool):
        graph = fx.Graph()
        x, nw, w, ids, table = (graph.placeholder(name) for name in ("x", "nw", "w", "ids", "table"))
        normed = graph.call_function(kernels.rms_norm, (x, nw, 1e-6))
        out = graph.call_function(kernels.skinny_linear, (normed, w))
        outputs = [out]
        if shared:
            outputs.append(graph.call_function(kernels.skinny_linear, (x, w)))
        if tied:
            outputs.append(graph.call_function(F.embedding, (ids, table)))  # its own placeholder, W's storage
        graph.output(tuple(outputs))
        for node in (x, normed):
            node.meta["example_value"] = torch.empty(1, 8, dtype=torch.float16)
        gm = fx.GraphModule(nn.Module(), graph)
        weight = torch.randn(4, 8, dtype=torch.float16)
        tensors = {x: torch.randn(1, 8, dtype=torch.float16), nw: torch.full((8,), 2.0, dtype=torch.float16),
                   w: weight, ids: torch.zeros(1, dtype=torch.long), table: weight}
        return PassContext(gm=gm, tensors=tensors, merger=WeightMerger()), weight

    for shared, tied in ((False, False), (True, False), (False, True)):
        ctx, weight = graph_with(shared, tied)
        before = weight.clone()
        matches = decode_fusion.apply(ctx)
        assert matches == (0 if shared or tied else 1)
        assert torch.equal(weight, before * 2) if matches else torch.equal(weight, before)


def test_decode_act_fusion_takes_only_the_activations_in(tmp_path):
    """decode_act_fusion (on by default): each layer's SiLU * up goes into its down projection and nothing else
    changes (the norms stay kernels of their own); the references give the unfused step's logits bit for bit."""
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    logits = []
    assert "decode_act_fusion" in DEFAULT_PASSES
    for passes in (tuple(p for p in DEFAULT_PASSES if p != "decode_act_fusion"), DEFAULT_PASSES):
        model = build("llama", tmp_path / "llama", dtype=torch.float16)
        optimize(model, passes=passes)
        with torch.no_grad():
            logits.append(model(ids).logits)
    report = fastllm.explain(model)
    n = model.config.num_hidden_layers
    assert report.matches["decode_act_fusion"] == n
    assert report.graph.fused_ops["fused_linear"] == n
    assert report.graph.fused_ops["fused_add_rms_norm"] == 2 * n and "silu_and_mul" not in report.graph.fused_ops
    assert torch.equal(logits[0], logits[1])
