"""paged_attention: the ref against torch SDPA, the Triton kernels (interpreter on CPU, GPU when present) against
the ref, op registration, input checks, and CUDA-graph capture of the decode launcher.

Tolerances (output against paged_attention_ref on the same inputs):
- float32: both compute in fp32 and differ in summation order, exp2 vs exp and the online rescaling: a few ulps of
  O(1) outputs, well inside 1e-5 (seen: <= 1e-6 on the CPU).
- float16 (the ref rounds its fp32 output once): the kernel rounds its output once (one fp16 ulp, 2^-10 relative,
  ~2e-3 absolute for |out| in [2, 4), which few-key rows of unit-variance v reach) and rounds the probabilities to
  fp16 before the P.V product (each weight off by <= 2^-11 relative: <= 2^-11 max|v| on the average): 2e-3.
- bfloat16 (GPU only, against the fp32 ref): the same two roundings with bf16's 2^-8: 2 ulps ~ 2e-2.
"""

import contextlib

import pytest
import torch

from fastllm.kernels import paged_attention, paged_attention_ref, triton_on_cpu
from fastllm.kernels.paged_attention import default_num_splits

TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}
CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.bfloat16, torch.float16]

# (Hq, Hkv): MHA, GQA 4:1, GQA 3:1, MQA.
HEADS = [(4, 4), (8, 2), (6, 2), (4, 1)]
HEAD_DIMS = [64, 80, 128]
# Batches as (query length, context length incl. the queries) per sequence:
BATCHES = {
    # one sequence prefilling 13 tokens after 5 cached, one decoding 1 token after 40, one fresh prompt of 7
    "mixed": [(13, 18), (1, 41), (7, 7)],
    # pure decode, contexts 1, 17 and 300 (several splits)
    "decode": [(1, 1), (1, 17), (1, 300)],
    # a chunk of 40 queries after 260 cached keys: whole unmasked key tiles before the causal diagonal
    "chunked": [(40, 300), (3, 3)],
}


def _paged_batch(seqs, hq, hkv, head_dim, dtype, *, block_size=16, device="cpu", seed=0, q_scale=1.0):
    """Unit-variance q and cache for `seqs` = [(q_len, ctx)], each sequence's blocks at shuffled, non-contiguous
    ids; block-table entries past a sequence's blocks point outside the cache (they must never be read)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = [-(-ctx // block_size) for _, ctx in seqs]
    total = sum(num_blocks) + 3  # a few blocks nobody owns
    ids = torch.randperm(total, generator=g)
    block_tables = torch.full((len(seqs), max(num_blocks) + 2), 2**30, dtype=torch.int32)
    start = 0
    for i, n in enumerate(num_blocks):
        block_tables[i, :n] = ids[start : start + n].int()
        start += n
    shape = (total, block_size, hkv, head_dim)
    k_cache = torch.randn(shape, generator=g).to(device, dtype)
    v_cache = torch.randn(shape, generator=g).to(device, dtype)
    q = (torch.randn(sum(n for n, _ in seqs), hq, head_dim, generator=g) * q_scale).to(device, dtype)
    cu = torch.tensor([0] + [n for n, _ in seqs], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq_lens = torch.tensor([ctx for _, ctx in seqs], dtype=torch.int32)
    meta = (block_tables.to(device), seq_lens.to(device), cu.to(device))
    return q, k_cache, v_cache, *meta, max(n for n, _ in seqs)


def _run(args, kwargs, dtype, *, on_cpu=True):
    """The kernel's output and the ref's (computed in fp32 from the same inputs, rounded to the output dtype
    only for the CPU dtypes, whose tolerance is written for one rounding of the ref)."""
    q, k_cache, v_cache, *meta = args
    ref_kwargs = {key: value for key, value in kwargs.items() if key not in ("num_splits", "split_counters")}
    expected = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), *meta, **ref_kwargs)
    if on_cpu:
        with triton_on_cpu():
            actual = paged_attention(*args, **kwargs)
        return actual, expected.to(dtype)
    return paged_attention(*args, **kwargs).float(), expected


def _assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


def record_decode_launches(monkeypatch, keyword: str) -> list:
    """The value of `keyword` each decode-kernel launch passes from now on (the launches still run)."""
    import importlib

    module = importlib.import_module("fastllm.kernels.paged_attention")  # the package exports the function by name
    kernel, seen = module._decode_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs[keyword])
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, "_decode_kernel", Spy())
    return seen


# --- the reference against torch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("prefix", [0, 11])
def test_ref_matches_sdpa(hq, hkv, prefix):
    """On a contiguous layout: causal MHA/GQA, fresh prompts (is_causal) and chunks after a cached prefix (the
    bottom-right-aligned causal mask written out, since SDPA's is_causal aligns top-left)."""
    seqs = [(9, 9 + prefix), (5, 5 + prefix)]
    q, k_cache, v_cache, block_tables, seq_lens, cu, max_q = _paged_batch(seqs, hq, hkv, 32, torch.float32)
    out = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, cu, max_q, scale=0.3)
    for i, (q_len, ctx) in enumerate(seqs):
        blocks = block_tables[i, : -(-ctx // 16)].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)  # [Hkv, ctx, D]
        v = v_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)
        qi = q[cu[i] : cu[i + 1]].transpose(0, 1)  # [Hq, L, D]
        if prefix == 0:
            expected = torch.nn.functional.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=0.3,
                                                                        enable_gqa=True)  # fmt: skip
        else:
            mask = torch.ones(q_len, ctx, dtype=torch.bool).tril(ctx - q_len)
            expected = torch.nn.functional.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=0.3,
                                                                        enable_gqa=True)  # fmt: skip
        torch.testing.assert_close(out[cu[i] : cu[i + 1]], expected.transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("features", [("sliding_window",), ("alibi_slopes",), ("softcap",),
                                      ("sliding_window", "alibi_slopes", "softcap")])
@pytest.mark.parametrize("q_len", [6, 20])
def test_ref_features_match_dense_formula(features, q_len):
    """Sliding window, ALiBi and softcap, alone and together, against one dense formula written independently (one
    sequence of 20 positions, MHA): its last 6 as a chunk after 14 cached, or all 20 as a fresh prompt."""
    ctx, window, cap = 20, 4, 2.0
    seqs = [(q_len, ctx)]
    q, k_cache, v_cache, block_tables, seq_lens, cu, max_q = _paged_batch(seqs, 2, 2, 16, torch.float32, q_scale=3)
    slopes = torch.tensor([0.5, 0.125])
    kwargs = {"sliding_window": window, "alibi_slopes": slopes, "softcap": cap}
    out = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, cu, max_q, scale=0.25,
                              **{name: kwargs[name] for name in features})  # fmt: skip
    k = k_cache[block_tables[0, :2].long()].flatten(0, 1)[:ctx]
    v = v_cache[block_tables[0, :2].long()].flatten(0, 1)[:ctx]
    for h in range(2):
        for j in range(q_len):
            p = ctx - q_len + j
            s = k[: p + 1, h] @ q[j, h] * 0.25
            if "softcap" in features:
                s = cap * torch.tanh(s / cap)
            if "alibi_slopes" in features:
                s = s + slopes[h] * (torch.arange(p + 1) - p)
            if "sliding_window" in features:
                s[: max(p + 1 - window, 0)] = float("-inf")
            torch.testing.assert_close(out[j, h], torch.softmax(s, 0) @ v[: p + 1, h], atol=1e-6, rtol=1e-5)


# --- the Triton kernels on the CPU (interpreter) ---------------------------------------------------------------


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_paged_attention_triton_cpu(batch, hq, hkv, head_dim, dtype):
    args = _paged_batch(BATCHES[batch], hq, hkv, head_dim, dtype)
    actual, expected = _run(args, {"scale": head_dim**-0.5}, dtype)
    _assert_close(actual, expected, dtype)


@pytest.mark.parametrize("head_dim", [96, 256])
@pytest.mark.parametrize("batch", ["mixed", "decode"])
def test_large_and_odd_head_dims_cpu(head_dim, batch):
    seqs = [(5, 9), (1, 20)] if batch == "mixed" else [(1, 70), (1, 3)]
    args = _paged_batch(seqs, 4, 2, head_dim, torch.float16)
    _assert_close(*_run(args, {"scale": head_dim**-0.5}, torch.float16), torch.float16)


FEATURES = {
    "window": {"sliding_window": 24},
    "window_1": {"sliding_window": 1},
    "alibi": {"alibi_slopes": "alibi"},
    "softcap": {"softcap": 5.0},
    "all": {"sliding_window": 30, "alibi_slopes": "alibi", "softcap": 5.0},
    "non_causal": {"causal": False},
    "non_causal_window": {"causal": False, "sliding_window": 8},
}


def _alibi(hq, device="cpu"):
    # Bloom's slopes for hq heads (a geometric series from 2^(-8/hq)).
    return torch.tensor([2 ** (-8 * (h + 1) / hq) for h in range(hq)], device=device)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_features_triton_cpu(feature, batch, dtype):
    hq, hkv, head_dim = 6, 2, 64
    kwargs = {"scale": head_dim**-0.5, **FEATURES[feature]}
    if kwargs.get("alibi_slopes") == "alibi":
        kwargs["alibi_slopes"] = _alibi(hq)
    # Scores of a few units so that the softcap (5) bends them and the window cuts real weight.
    args = _paged_batch(BATCHES[batch], hq, hkv, head_dim, dtype, q_scale=3.0)
    _assert_close(*_run(args, kwargs, dtype), dtype)


@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_block_sizes_cpu(block_size, batch):
    # A window of 200 leaves the chunk's queries masked key tiles on both sides of whole ones.
    args = _paged_batch(BATCHES[batch], 8, 2, 64, torch.float16, block_size=block_size)
    _assert_close(*_run(args, {"scale": 0.125, "sliding_window": 200}, torch.float16), torch.float16)


@pytest.mark.parametrize("merge", ["combine_kernel", "in_decode_kernel"])
@pytest.mark.parametrize("num_splits", [1, 2, 7, 40])
def test_decode_num_splits_cpu(num_splits, merge):
    # 40 splits of a 300-key context leave some splits empty (whole 64-key tiles per split); context 1 leaves all
    # but one empty. In the decode kernel the last program of each (sequence, kv head) merges: the interpreter runs
    # programs one by one, so this checks the counting and the merge's arithmetic, not the GPU's memory ordering
    # (test_decode_in_kernel_merge_repeats_gpu does).
    args = _paged_batch(BATCHES["decode"], 4, 2, 64, torch.float32)
    kwargs = {"scale": 0.125, "num_splits": num_splits}
    if merge == "in_decode_kernel":
        kwargs["split_counters"] = counters = torch.zeros(3 * 2 + 5, dtype=torch.int32)  # 3 sequences x 2 kv heads
    _assert_close(*_run(args, kwargs, torch.float32), torch.float32)
    if merge == "in_decode_kernel":
        assert torch.count_nonzero(counters) == 0  # left ready for the next launch


@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 4)])
def test_decode_in_kernel_merge_over_several_loads_cpu(hq, hkv):
    # The merge takes MERGE_S splits a load (16 at 4 padded query heads of head size 128, 64 at one): the 40 splits
    # of a 2560-key context (32-key fp32 tiles, two a split) are three loads at 16, the last one partial; 1100 keys
    # fill 35 splits; 3 query heads pad to 4 (masked rows)
    from fastllm.kernels.paged_attention import _merge_tile

    assert _merge_tile(hq // hkv, 128)["MERGE_S"] == (16 if hkv == 2 else 64)
    args = _paged_batch([(1, 2560), (1, 3), (1, 1100)], hq, hkv, 128, torch.float32)
    counters = torch.zeros(3 * hkv, dtype=torch.int32)
    kwargs = {"scale": 128**-0.5, "num_splits": 40, "split_counters": counters}
    _assert_close(*_run(args, kwargs, torch.float32), torch.float32)
    assert torch.count_nonzero(counters) == 0


def test_padding_sequences_and_strided_q_out_cpu():
    """A graph-padded decode batch: the sequences without a query (cu_seqlens_q repeats) and the tokens outside
    cu_seqlens_q are left alone; q is a strided view (a slice of a fused QKV output), out a strided buffer."""
    hq, hkv, head_dim = 4, 2, 64
    for max_q in (1, 4):  # the decode kernels, then the prefill kernel on the same batch
        q, k_cache, v_cache, block_tables, seq_lens, _, _ = _paged_batch(
            [(1, 30), (1, 5), (1, 1), (1, 90)], hq, hkv, head_dim, torch.float32
        )
        cu = torch.tensor([0, 1, 1, 2, 2], dtype=torch.int32)  # sequences 1 and 3 have no query; tokens 2, 3 padding
        qkv = torch.randn(4, hq + 2 * hkv, head_dim)
        qkv[:, :hq] = q
        q = qkv[:, :hq]
        out = torch.full((4, hq, 2 * head_dim), 7.0)[..., :head_dim]
        counters = torch.zeros(4 * hkv, dtype=torch.int32)  # the in-kernel merge skips the padding sequences too
        with triton_on_cpu():
            result = paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu, max_q, scale=0.125, out=out,
                                     num_splits=3, split_counters=counters)  # fmt: skip
        assert result is out
        expected = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, cu, max_q, scale=0.125)
        _assert_close(out[:2], expected[:2], torch.float32)
        assert torch.all(out[2:] == 7.0)
        assert torch.count_nonzero(counters) == 0


def test_cpu_dispatch_is_the_reference():
    args = _paged_batch(BATCHES["mixed"], 8, 2, 64, torch.float16)
    kwargs = {"scale": 0.125, "sliding_window": 9, "alibi_slopes": _alibi(8), "softcap": 20.0}
    assert torch.equal(paged_attention(*args, **kwargs), paged_attention_ref(*args, **kwargs))


def test_default_num_splits():
    cpu = torch.device("cpu")
    assert default_num_splits(1, 8, 32768, cpu) == 64  # 528 programs wanted, capped at 64 splits
    assert default_num_splits(1, 8, 1024, cpu) == 8  # 128 keys a split at least
    assert default_num_splits(32, 8, 4096, cpu) == 3  # 256 programs already: ~2 waves more
    assert default_num_splits(128, 8, 32768, cpu) == 1  # 1024 programs fill the GPU without splitting
    assert default_num_splits(4, 1, 1, cpu) == 1


def test_opcheck():
    q, k_cache, v_cache, block_tables, seq_lens, cu, _ = _paged_batch([(3, 5), (1, 2)], 4, 2, 16, torch.float32)
    out = torch.empty(q.shape)
    op = torch.ops.fastllm.paged_attention.default
    torch.library.opcheck(op, (q, k_cache, v_cache, block_tables, seq_lens, cu, None, out, 3, 0.25, True, 0, 0.0, 1,
                               1.0, None))  # fmt: skip
    slopes = _alibi(4)
    torch.library.opcheck(op, (q, k_cache, v_cache, block_tables, seq_lens, cu, slopes, out, 3, 0.25, False, 2,
                               3.0, 4, 1.0, None))  # fmt: skip
    counters = torch.zeros(4, dtype=torch.int32)
    torch.library.opcheck(op, (q, k_cache, v_cache, block_tables, seq_lens, cu, None, out, 1, 0.25, True, 0, 0.0, 3,
                               1.0, counters))  # fmt: skip


def test_bad_inputs():
    q, k_cache, v_cache, block_tables, seq_lens, cu, max_q = _paged_batch([(3, 5)], 6, 2, 16, torch.float32)
    meta = (block_tables, seq_lens, cu, max_q)
    with pytest.raises(ValueError, match="6 heads are not a multiple of the cache's 4 kv heads"):
        paged_attention(q, k_cache.repeat(1, 1, 2, 1), v_cache.repeat(1, 1, 2, 1), *meta, scale=1.0)
    with pytest.raises(ValueError, match="head_dim 8 does not match the cache's head_dim 16"):
        paged_attention(q[..., :8], k_cache, v_cache, *meta, scale=1.0)
    with pytest.raises(TypeError, match="block_tables must be int32, got torch.int64"):
        paged_attention(q, k_cache, v_cache, block_tables.long(), *meta[1:], scale=1.0)
    with pytest.raises(TypeError, match="seq_lens must be int32"):
        paged_attention(q, k_cache, v_cache, block_tables, seq_lens.long(), cu, max_q, scale=1.0)
    with pytest.raises(TypeError, match="k_cache has dtype torch.float16"):
        paged_attention(q, k_cache.half(), v_cache.half(), *meta, scale=1.0)
    with pytest.raises(ValueError, match="must describe one batch"):
        paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu[:1], max_q, scale=1.0)
    with pytest.raises(ValueError, match="max_seqlen_q must be a positive Python int"):
        paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu, torch.tensor(3), scale=1.0)
    with pytest.raises(ValueError, match="sliding_window must be None or a positive int"):
        paged_attention(q, k_cache, v_cache, *meta, scale=1.0, sliding_window=0)
    with pytest.raises(TypeError, match="alibi_slopes must be a float32 tensor"):
        paged_attention(q, k_cache, v_cache, *meta, scale=1.0, alibi_slopes=torch.ones(6, dtype=torch.float16))
    with pytest.raises(ValueError, match="out has shape"):
        paged_attention(q, k_cache, v_cache, *meta, scale=1.0, out=torch.empty(3, 6, 8))
    with pytest.raises(ValueError, match="head_dim must be in"):
        big = torch.empty(1, 1, 512)
        paged_attention(big, big.view(1, 1, 1, 512), big.view(1, 1, 1, 512), *meta, scale=1.0)
    for scale in (float("nan"), float("inf"), 0.0, -0.5):
        with pytest.raises(ValueError, match="scale must be a finite positive number"):
            paged_attention(q, k_cache, v_cache, *meta, scale=scale)
    with pytest.raises(TypeError, match="split_counters must be int32"):
        paged_attention(q, k_cache, v_cache, *meta, scale=1.0, split_counters=torch.zeros(2))
    with pytest.raises(ValueError, match="split_counters has 1 entries; this batch needs at least 2"):
        paged_attention(q, k_cache, v_cache, *meta, scale=1.0, split_counters=torch.zeros(1, dtype=torch.int32))


# --- GPU: bf16/fp16 against the fp32 ref -----------------------------------------------------------------------

# (Hq, Hkv, D): Llama-3.1-8B (GQA 4:1, 128), Llama-2/GPT-2 style MHA at 64, GQA 3:1 at 96, Phi-2's 80 (MHA),
# Gemma-7B-like 256 with MQA.
GPU_HEADS = [(32, 8, 128), (16, 16, 64), (12, 4, 96), (8, 8, 80), (8, 1, 256)]
GPU_BATCHES = {
    "mixed": [(13, 18), (1, 41), (7, 7), (200, 700), (1, 1000)],
    "decode": [(1, 1), (1, 17), (1, 300), (1, 1500), (1, 64)],
}


@pytest.mark.gpu
@pytest.mark.parametrize("batch", list(GPU_BATCHES))
@pytest.mark.parametrize("hq,hkv,head_dim", GPU_HEADS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_paged_attention_gpu(batch, hq, hkv, head_dim, dtype):
    args = _paged_batch(GPU_BATCHES[batch], hq, hkv, head_dim, dtype, device="cuda")
    _assert_close(*_run(args, {"scale": head_dim**-0.5}, dtype, on_cpu=False), dtype)
    if batch == "decode":  # the splits merged in the decode kernel (runtime steps pass counters)
        counters = torch.zeros(len(GPU_BATCHES[batch]) * hkv, dtype=torch.int32, device="cuda")
        kwargs = {"scale": head_dim**-0.5, "split_counters": counters}
        _assert_close(*_run(args, kwargs, dtype, on_cpu=False), dtype)
        assert torch.count_nonzero(counters).item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(32, 8), (32, 32)])
def test_decode_in_kernel_merge_repeats_gpu(hq, hkv):
    """The last program to arrive reads partials other SMs wrote: if the arrival's release/acquire did not order
    them, some of many launches would read stale partials and differ. The merge sums in split order whichever
    program is last, so every launch must equal the first bit for bit, and the combine kernel's result closely."""
    seqs = [(1, 33), (1, 700), (1, 4000), (1, 129), (1, 2)]
    args = _paged_batch(seqs, hq, hkv, 128, torch.bfloat16, device="cuda", seed=3)
    counters = torch.zeros(len(seqs) * hkv, dtype=torch.int32, device="cuda")
    kwargs = {"scale": 128**-0.5, "num_splits": 48}
    first = paged_attention(*args, **kwargs, split_counters=counters)
    outs = torch.stack([paged_attention(*args, **kwargs, split_counters=counters) for _ in range(200)])
    torch.cuda.synchronize()
    assert torch.equal(outs, first.expand_as(outs))
    assert torch.count_nonzero(counters).item() == 0
    _assert_close(first.float(), paged_attention(*args, **kwargs).float(), torch.bfloat16)


# Each feature in bf16; all of them together in fp16 too (compiling every variant twice costs device time).
FEATURE_DTYPES = [(feature, torch.bfloat16) for feature in FEATURES] + [("all", torch.float16)]


@pytest.mark.gpu
@pytest.mark.parametrize("feature,dtype", FEATURE_DTYPES)
@pytest.mark.parametrize("batch", list(GPU_BATCHES))
def test_features_gpu(feature, batch, dtype):
    hq, hkv, head_dim = 32, 8, 128
    kwargs = {"scale": head_dim**-0.5, **FEATURES[feature]}
    if kwargs.get("alibi_slopes") == "alibi":
        kwargs["alibi_slopes"] = _alibi(hq, "cuda")
    args = _paged_batch(GPU_BATCHES[batch], hq, hkv, head_dim, dtype, device="cuda", q_scale=3.0)
    _assert_close(*_run(args, kwargs, dtype, on_cpu=False), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("seqs", [[(1, 4096), (1, 32768), (1, 100)], [(2048, 2048)], [(1024, 3072), (1, 4000)]],
                         ids=["decode_4k_32k", "prefill_2048", "chunk_after_2k"])  # fmt: skip
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_long_contexts_gpu(seqs, dtype):
    args = _paged_batch(seqs, 32, 8, 128, dtype, device="cuda")
    _assert_close(*_run(args, {"scale": 128**-0.5}, dtype, on_cpu=False), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", list(GPU_BATCHES))
def test_float32_gpu(batch):
    # fp32 runs tl.dot in "ieee" precision (not tf32): the fp32 tolerance holds.
    args = _paged_batch(GPU_BATCHES[batch], 8, 2, 128, torch.float32, device="cuda")
    _assert_close(*_run(args, {"scale": 128**-0.5}, torch.float32, on_cpu=False), torch.float32)


@pytest.mark.gpu
def test_decode_cuda_graph_replay():
    """The decode launcher captured once replays correctly after the metadata buffers change (same shapes)."""
    dtype, hq, hkv, head_dim = torch.bfloat16, 32, 8, 128
    first = _paged_batch([(1, 700), (1, 5), (1, 2000)], hq, hkv, head_dim, dtype, device="cuda", seed=1)
    second = _paged_batch([(1, 1900), (1, 1300), (1, 33)], hq, hkv, head_dim, dtype, device="cuda", seed=2)
    # One static cache and metadata buffers big enough for both batches.
    static = [t.clone() for t in first[:6]]
    for i in (1, 2):
        static[i] = torch.zeros((max(first[i].shape[0], second[i].shape[0]), *first[i].shape[1:]),
                                dtype=dtype, device="cuda")  # fmt: skip
    static[3] = torch.zeros((3, max(first[3].shape[1], second[3].shape[1])), dtype=torch.int32, device="cuda")
    out = torch.empty(3, hq, head_dim, dtype=dtype, device="cuda")
    out_merged_in_kernel = torch.empty_like(out)

    def load(batch):
        q, k_cache, v_cache, block_tables, seq_lens, cu, _ = batch
        static[0].copy_(q)
        static[1][: k_cache.shape[0]].copy_(k_cache)
        static[2][: v_cache.shape[0]].copy_(v_cache)
        static[3].zero_()
        static[3][:, : block_tables.shape[1]].copy_(block_tables.clamp(max=k_cache.shape[0] - 1))
        static[4].copy_(seq_lens)
        static[5].copy_(cu)

    counters = torch.zeros(3 * hkv, dtype=torch.int32, device="cuda")

    def step():
        paged_attention(*static, 1, scale=head_dim**-0.5, out=out)
        paged_attention(*static, 1, scale=head_dim**-0.5, out=out_merged_in_kernel, split_counters=counters)

    load(first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for batch in (first, second):
        load(batch)
        graph.replay()
        torch.cuda.synchronize()
        expected = paged_attention_ref(*(t.float() for t in static[:3]), *static[3:], 1, scale=head_dim**-0.5)
        _assert_close(out.float(), expected, dtype)
        _assert_close(out_merged_in_kernel.float(), expected, dtype)
        assert torch.count_nonzero(counters).item() == 0


def test_step_decode_merges_splits_in_kernel_cpu():
    """A runtime decode step passes its model's split counters: the step's output equals the reference path's,
    the counters are the context's one zeroed buffer (reused, grown only for a larger batch) and stay zero."""
    from fastllm.kernels.step_attention import AttentionMetadata, StepContext, step_attention_direct

    hq, hkv, head_dim = 4, 2, 64
    q, k_cache, v_cache, block_tables, seq_lens, cu, _ = _paged_batch([(1, 300), (1, 9), (1, 130)], hq, hkv,
                                                                      head_dim, torch.float32)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    k_new, v_new = (torch.randn(1, hkv, 3, head_dim, generator=g) for _ in range(2))
    slots = torch.stack([block_tables[i, (n - 1) // 16].long() * 16 + (n - 1) % 16 for i, n in
                         enumerate(seq_lens.tolist())])  # each sequence's new token: its last position
    metadata = AttentionMetadata(slot_mapping=slots, block_tables=block_tables, seq_lens=seq_lens, cu_seqlens_q=cu,
                                 max_seqlen_q=1)  # fmt: skip
    context = StepContext()
    outs = []
    for on_cpu_triton in (False, True):
        caches = [(k_cache.clone(), v_cache.clone())]
        with context.step(metadata, caches), (triton_on_cpu() if on_cpu_triton else contextlib.nullcontext()):
            outs.append(step_attention_direct(q.transpose(0, 1).unsqueeze(0), k_new, v_new, context.id, 0, 0.125))
    _assert_close(outs[1], outs[0], torch.float32)
    counters = context._split_counters  # made by the Triton step (3 splits of the 336-key block table)
    assert counters is not None
    assert counters.dtype == torch.int32 and counters.numel() >= 6 and torch.count_nonzero(counters) == 0
    assert context.split_counters(6, torch.device("cpu")) is counters  # reused
    assert context.split_counters(4096, torch.device("cpu")).numel() == 4096  # a larger batch grows it
