"""decode_attention_with_rotary: a decode step's rotary, KV-cache write and paged attention in one kernel, against
its reference (`rotary_and_write_kv_ref` then `paged_attention_ref`) and against the two kernels it replaces (Triton
interpreted on the CPU; the GPU tests at the end).

Tolerances against the reference: V is stored exactly; the rotated K as tests/test_kernel_kv_cache_write.py checks
the rotary write kernel (tests/_kernel_tolerances.py: the reference rotates in the input dtype, as Hugging Face
does, the kernel in fp32 rounded once); the outputs with tests/test_kernel_paged_attention.py's tolerance for the
dtype. Against the unfused kernels (rotary_and_write_kv, then
paged_attention) everything is bit-identical in the interpreter (the same operations in the same order; an FP8 cache
included, whose interpreter rounding is wrong for some values but the same in both paths).
"""

from __future__ import annotations

import sys

import pytest
import torch
from _kernel_tolerances import assert_close

from fastllm.kernels import paged_attention, rotary_and_write_kv, triton_on_cpu
from fastllm.kernels.paged_attention import decode_attention_with_rotary, decode_attention_with_rotary_ref

FP8 = torch.float8_e4m3fn
TOLERANCES = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 2e-3, "rtol": 2e-3},
              torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}  # fmt: skip
BLOCK = 16


def _decode_step(contexts, hq, hkv, head_dim, rot, dtype, *, cache_dtype=None, device="cpu", seed=0):
    """One decode step of len(contexts) sequences, each context counting its new token (the last position): the
    cache holds the earlier keys in shuffled blocks; q, k, v, cos, sin are the step's; a context of 0 marks a
    padding sequence (no query: cu_seqlens_q repeats, its slot -1)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = [max(1, -(-c // BLOCK)) for c in contexts]
    ids = torch.randperm(sum(num_blocks) + 2, generator=g)
    tables = torch.zeros(len(contexts), max(num_blocks) + 1, dtype=torch.int32)
    start = 0
    for i, n in enumerate(num_blocks):
        tables[i, :n] = ids[start : start + n].int()
        start += n
    shape = (sum(num_blocks) + 2, BLOCK, hkv, head_dim)
    caches = [torch.randn(shape, generator=g).to(cache_dtype or dtype) for _ in range(2)]
    live = [c > 0 for c in contexts]
    tokens = sum(live)
    q, k, v = (torch.randn(tokens, h, head_dim, generator=g).to(dtype) for h in (hq, hkv, hkv))
    angles = torch.randn(tokens, rot // 2, generator=g)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    slots = torch.tensor([int(tables[i, (c - 1) // BLOCK]) * BLOCK + (c - 1) % BLOCK
                          for i, c in enumerate(contexts) if c > 0])  # fmt: skip
    cu = torch.tensor([0] + [int(x) for x in live]).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([max(c, 1) for c in contexts], dtype=torch.int32)
    step = dict(q=q, k=k, v=v, cos=cos, sin=sin, slot_mapping=slots, block_tables=tables, seq_lens=seq_lens,
                cu_seqlens_q=cu)  # fmt: skip
    return {key: t.to(device) for key, t in step.items()}, [c.to(device) for c in caches]


def _fused(step, caches, **kwargs):
    return decode_attention_with_rotary(step["q"], step["k"], step["v"], step["cos"], step["sin"], *caches,
                                        step["slot_mapping"], step["block_tables"], step["seq_lens"],
                                        step["cu_seqlens_q"], **kwargs)  # fmt: skip


def _reference(step, caches, **kwargs):
    kwargs = {key: value for key, value in kwargs.items() if key not in ("num_splits", "split_counters", "out")}
    return decode_attention_with_rotary_ref(step["q"], step["k"], step["v"], step["cos"], step["sin"], *caches,
                                            step["slot_mapping"], step["block_tables"], step["seq_lens"],
                                            step["cu_seqlens_q"], **kwargs)  # fmt: skip


def _unfused(step, caches, scale, interleaved=False, k_scale=1.0, v_scale=1.0, **kwargs):
    q_rot = rotary_and_write_kv(step["q"], step["k"], step["v"], step["cos"], step["sin"], *caches,
                                step["slot_mapping"], interleaved=interleaved, k_scale=k_scale, v_scale=v_scale)
    return paged_attention(q_rot, *caches, step["block_tables"], step["seq_lens"], step["cu_seqlens_q"], 1,
                           scale=scale * k_scale, v_scale=v_scale, **kwargs)  # fmt: skip


def _clone(caches):
    return [c.clone() for c in caches]


def _bytes(caches):
    return [c.view(torch.uint8) if c.dtype == FP8 else c for c in caches]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,head_dim,rot", [(4, 2, 64, 64), (6, 2, 80, 40), (4, 1, 64, 16), (4, 4, 32, 32)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_against_reference_cpu(dtype, hq, hkv, head_dim, rot, interleaved):
    step, caches = _decode_step([300, 17, 1, 65], hq, hkv, head_dim, rot, dtype)
    expected_caches = _clone(caches)
    expected = _reference(step, expected_caches, scale=head_dim**-0.5, interleaved=interleaved)
    counters = torch.zeros(4 * hkv, dtype=torch.int32)
    with triton_on_cpu():
        out = _fused(step, caches, scale=head_dim**-0.5, interleaved=interleaved, num_splits=3,
                     split_counters=counters)  # fmt: skip
    assert_close(caches[0], expected_caches[0])
    assert torch.equal(caches[1], expected_caches[1])
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
    assert torch.count_nonzero(counters) == 0


@pytest.mark.parametrize("num_splits", [1, 2, 5, 40])
@pytest.mark.parametrize("merged", [False, True])
def test_bit_identical_to_the_kernels_it_replaces_cpu(num_splits, merged):
    """Splits in the combine kernel and merged in the decode kernel; 40 splits leave most of them without keys (the
    writer is the last split that has some); a padding sequence between the others."""
    step, caches = _decode_step([130, 0, 64, 2, 129], 8, 2, 64, 64, torch.float32)
    expected_caches = _clone(caches)
    kwargs = {"scale": 0.125, "num_splits": num_splits}
    with triton_on_cpu():
        counters = torch.zeros(5 * 2, dtype=torch.int32) if merged else None
        expected = _unfused(step, expected_caches, split_counters=counters, **kwargs)  # the same merge
        out = _fused(step, caches, split_counters=counters, **kwargs)
    assert torch.equal(caches[0], expected_caches[0]) and torch.equal(caches[1], expected_caches[1])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.37, 0.011)])
def test_fp8_cache_cpu(scales):
    """An FP8 KV cache with a checkpoint's multipliers: the new token stored as the rotary write kernel stores it
    (the same bytes), read back through the scales like the rest."""
    k_scale, v_scale = scales
    step, caches = _decode_step([90, 33, 200], 4, 2, 64, 64, torch.float32, cache_dtype=FP8, seed=3)
    expected_caches = _clone(caches)
    kwargs = {"k_scale": k_scale, "v_scale": v_scale, "num_splits": 2}
    with triton_on_cpu():
        expected = _unfused(step, expected_caches, scale=0.125, **kwargs)
        out = _fused(step, caches, scale=0.125 * k_scale, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(_bytes(caches), _bytes(expected_caches)))
    assert torch.equal(out, expected)


def test_window_alibi_softcap_cpu():
    step, caches = _decode_step([300, 40], 4, 2, 64, 64, torch.float32, seed=4)
    slopes = torch.tensor([2 ** (-8 * (h + 1) / 4) for h in range(4)])
    kwargs = {"scale": 0.125, "sliding_window": 70, "alibi_slopes": slopes, "softcap": 5.0}
    expected_caches = _clone(caches)
    expected = _reference(step, expected_caches, **kwargs)
    with triton_on_cpu():
        out = _fused(step, caches, num_splits=3, **kwargs)
    assert torch.equal(caches[0], expected_caches[0])
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])


def test_cpu_dispatch_is_the_reference():
    step, caches = _decode_step([50, 7], 4, 2, 32, 32, torch.float32, seed=5)
    expected_caches = _clone(caches)
    assert torch.equal(_fused(step, caches, scale=0.2), _reference(step, expected_caches, scale=0.2))
    assert torch.equal(caches[0], expected_caches[0]) and torch.equal(caches[1], expected_caches[1])


def test_bad_inputs():
    step, caches = _decode_step([50, 7], 4, 2, 32, 32, torch.float32, seed=6)
    with pytest.raises(TypeError, match="cos and sin must have q's dtype"):
        _fused({**step, "cos": step["cos"].half(), "sin": step["sin"].half()}, caches, scale=0.2)
    with pytest.raises(ValueError, match="the rotary dim"):
        _fused({**step, "cos": step["cos"][:, :3], "sin": step["sin"][:, :3]}, caches, scale=0.2)
    with pytest.raises(ValueError, match="slot_mapping must have shape"):
        _fused({**step, "slot_mapping": step["slot_mapping"][:1]}, caches, scale=0.2)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        _fused(step, caches, scale=float("nan"))
    with pytest.raises(ValueError, match="split_counters has 1 entries"):
        _fused(step, caches, scale=0.2, split_counters=torch.zeros(1, dtype=torch.int32))


def test_opcheck():
    from fastllm.kernels.paged_attention import _decode_attention_with_rotary_op as op

    step, caches = _decode_step([20, 5], 4, 2, 16, 16, torch.float32, seed=7)
    out = torch.empty_like(step["q"])
    args = (step["q"], step["k"], step["v"], step["cos"], step["sin"], *caches, step["slot_mapping"],
            step["block_tables"], step["seq_lens"], step["cu_seqlens_q"])  # fmt: skip
    torch.library.opcheck(op, (*args, None, out, 0.25, False, 1.0, 1.0, 0, 0.0, 2, None))
    torch.library.opcheck(op, (*args, None, out, 0.25, True, 1.0, 1.0, 8, 3.0, 1, torch.zeros(4, dtype=torch.int32)))


# --- GPU ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,head_dim,rot,interleaved", [(32, 8, 128, 128, False), (32, 32, 128, 128, False),
                                                              (12, 4, 96, 48, True), (8, 1, 256, 256, False)])
def test_against_the_kernels_it_replaces_gpu(dtype, hq, hkv, head_dim, rot, interleaved):
    """The caches hold exactly what rotary_and_write_kv writes; the outputs match the unfused kernels' closely (the
    rotation may contract into FMAs differently: q can differ by an ulp) and the fp32 reference within bf16/fp16's
    tolerance. Merged in the kernel, 50 launches of the same step give the same bits."""
    contexts = [1, 17, 300, 1500, 64, 4000]
    step, caches = _decode_step(contexts, hq, hkv, head_dim, rot, dtype, device="cuda")
    expected_caches = _clone(caches)
    scale = head_dim**-0.5
    expected = _unfused(step, expected_caches, scale, interleaved=interleaved)
    counters = torch.zeros(len(contexts) * hkv, dtype=torch.int32, device="cuda")
    out = _fused(step, caches, scale=scale, interleaved=interleaved, split_counters=counters)
    assert torch.equal(caches[0], expected_caches[0]) and torch.equal(caches[1], expected_caches[1])
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCES[dtype])
    reference = _reference({key: t.float() if t.is_floating_point() else t for key, t in step.items()},
                           [c.float() for c in _clone(caches)], scale=scale, interleaved=interleaved)
    torch.testing.assert_close(out.float(), reference, **TOLERANCES[dtype])
    again = torch.stack([_fused(step, caches, scale=scale, interleaved=interleaved, split_counters=counters)
                         for _ in range(50)])  # fmt: skip
    assert torch.equal(again, out.expand_as(again)) and torch.count_nonzero(counters).item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.37, 0.011)])
def test_fp8_cache_gpu(scales):
    """Decode steps of up to 16 tokens on Hopper run the fused kernel by default, FP8 KV caches (quantization=
    "fp8_kv") among them: bf16 queries over an e4m3 cache with a checkpoint's multipliers, merged in the kernel. The
    cache gets the bytes the rotary write kernel stores; the output is the unfused kernels' within bf16's tolerance
    (the rotation may contract into FMAs differently)."""
    k_scale, v_scale = scales
    step, caches = _decode_step([90, 33, 200, 1, 4000], 32, 8, 128, 128, torch.bfloat16, cache_dtype=FP8,
                                device="cuda", seed=5)  # fmt: skip
    expected_caches = _clone(caches)
    counters = torch.zeros(5 * 8, dtype=torch.int32, device="cuda")
    kwargs = {"k_scale": k_scale, "v_scale": v_scale, "split_counters": counters}
    expected = _unfused(step, expected_caches, scale=128**-0.5, **kwargs)
    out = _fused(step, caches, scale=128**-0.5 * k_scale, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(_bytes(caches), _bytes(expected_caches)))
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCES[torch.bfloat16])
    assert torch.count_nonzero(counters).item() == 0


def test_runtime_decode_step_with_the_fusion_on_cpu(monkeypatch):
    """step_attention (the op a model's attention becomes) in a decode step with rotary: FUSE_ROTARY_INTO_DECODE on
    gives the same output and caches, bit for bit, as the two kernels it replaces."""
    from fastllm.kernels.step_attention import AttentionMetadata, StepContext, step_attention_direct

    kernels_module = sys.modules["fastllm.kernels.paged_attention"]  # the package exports the function by that name

    step, caches = _decode_step([140, 0, 33], 6, 2, 64, 32, torch.float32, seed=8)
    metadata = AttentionMetadata(slot_mapping=step["slot_mapping"], block_tables=step["block_tables"],
                                 seq_lens=step["seq_lens"], cu_seqlens_q=step["cu_seqlens_q"], max_seqlen_q=1)
    q, k, v = (step[name].transpose(0, 1).unsqueeze(0) for name in ("q", "k", "v"))  # [1, H, T, D], as models do
    cos, sin = step["cos"][None, :, None, :], step["sin"][None, :, None, :]  # any shape with [T, R] inside
    context = StepContext()
    calls = []
    fused_launcher = kernels_module.decode_attention_with_rotary
    monkeypatch.setattr(kernels_module, "decode_attention_with_rotary",
                        lambda *args, **kwargs: calls.append(1) or fused_launcher(*args, **kwargs))
    results = []
    for fused in (False, True):
        monkeypatch.setattr(kernels_module, "FUSE_ROTARY_INTO_DECODE", fused)
        layer_caches = _clone(caches)
        with context.step(metadata, [layer_caches]), triton_on_cpu():
            out = step_attention_direct(q, k, v, context.id, 0, 0.125, cos=cos, sin=sin)
        results.append((out, layer_caches))
    (out0, caches0), (out1, caches1) = results
    assert len(calls) == 1  # the fused launch ran in the second step only
    assert torch.equal(out0, out1)
    assert torch.equal(caches0[0], caches1[0]) and torch.equal(caches0[1], caches1[1])


def test_by_default_the_fusion_follows_pdl(monkeypatch):
    """FUSE_ROTARY_INTO_DECODE unset (None): decode steps take the fused kernel where their launches use PDL (steps of
    up to 16 tokens on compute capability 9.0+, where it was measured faster), the two kernels elsewhere (the CPU)."""
    from fastllm.kernels.step_attention import AttentionMetadata, StepContext, step_attention_direct

    step_attention_module = sys.modules["fastllm.kernels.step_attention"]  # the package exports the op by that name
    kernels_module = sys.modules["fastllm.kernels.paged_attention"]
    assert kernels_module.FUSE_ROTARY_INTO_DECODE is None
    step, caches = _decode_step([40, 7], 4, 2, 32, 32, torch.float32, seed=9)
    metadata = AttentionMetadata(slot_mapping=step["slot_mapping"], block_tables=step["block_tables"],
                                 seq_lens=step["seq_lens"], cu_seqlens_q=step["cu_seqlens_q"], max_seqlen_q=1)
    q, k, v = (step[name].transpose(0, 1).unsqueeze(0) for name in ("q", "k", "v"))
    cos, sin = step["cos"][None, :, None, :], step["sin"][None, :, None, :]
    calls = []
    fused_launcher = kernels_module.decode_attention_with_rotary
    monkeypatch.setattr(kernels_module, "decode_attention_with_rotary",
                        lambda *args, **kwargs: calls.append(1) or fused_launcher(*args, **kwargs))
    context = StepContext()
    for pdl in (False, True):
        if pdl:  # what pdl_options answers for a small step on an H100/H200
            monkeypatch.setattr(step_attention_module, "pdl_options", lambda t: {"USE_PDL": True, "launch_pdl": True})
        with context.step(metadata, [_clone(caches)]), triton_on_cpu():
            step_attention_direct(q, k, v, context.id, 0, 0.125, cos=cos, sin=sin)
        assert len(calls) == int(pdl)


@pytest.mark.gpu
@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                          ("phi3", torch.bfloat16), ("gptj", torch.float16)])
def test_runtime_decode_with_the_fusion_on_cuda(family, dtype, tmp_path, monkeypatch):
    """A model's decode steps through CUDA graphs with FUSE_ROTARY_INTO_DECODE on give the tokens they give with it
    off (neox and gptj pairs, partial rotary), and HF eager's in fp32; batch 3 with one sequence ending early."""
    import fastllm
    from tests._models import VOCAB, build

    kernels_module = sys.modules["fastllm.kernels.paged_attention"]
    model = build(family, tmp_path, dtype=dtype).cuda()
    ids = torch.randint(3, VOCAB, (3, 19), generator=torch.Generator().manual_seed(4)).cuda()
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    results = {}
    for fused in (False, True):
        monkeypatch.setattr(kernels_module, "FUSE_ROTARY_INTO_DECODE", fused)
        fastllm.optimize(model, num_kv_tokens=4096)
        results[fused] = model.generate(ids, **kwargs)
        fastllm.release(model)
    assert torch.equal(results[True], results[False])
    if dtype == torch.float32:
        assert torch.equal(results[True], expected)
