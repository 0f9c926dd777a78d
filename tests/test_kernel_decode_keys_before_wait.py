"""The decode kernel's keys loaded before its PDL wait (paged_attention._DECODE_KEYS_BEFORE_WAIT).

A decode program may load its split's first key tile, all but the new token's row (position p = context - 1), and
the step's metadata before it waits for the kernel before it (the rotary and KV write, which writes position p);
p's row joins the tile after the wait. Checked here:
- on the CPU (the interpreter, where pdl_wait is a no-op and the setting is forced on): the same cases as
  test_kernel_paged_attention's decode tests, against the reference with its tolerances (written there), and the
  fused rotary kernel bit for bit against the two kernels it replaces, as test_kernel_decode_rotary checks it;
- on the GPU: bit for bit against the kernel with the setting off (the same products in the same order), and in a
  CUDA graph whose rotary kernel writes p right before the decode kernel starts, p's row having been overwritten
  with NaN just before: a read of p before the wait would turn up as NaN in some of the 200 replays.
"""

from __future__ import annotations

import importlib

import pytest
import test_kernel_decode_rotary as rotary_tests
import test_kernel_paged_attention as attention_tests
import torch
from test_kernel_paged_attention import FEATURES, _alibi, _assert_close, _paged_batch, _run, record_decode_launches

from fastllm.kernels import paged_attention, paged_attention_ref, rotary_and_write_kv, triton_on_cpu

paged_attention_module = importlib.import_module("fastllm.kernels.paged_attention")

# Contexts of 1 (p alone), 17, 64 (p the last row of a tile), 65 (p alone in the second tile), 130 and 300.
CONTEXTS = [(1, 1), (1, 17), (1, 64), (1, 65), (1, 130), (1, 300)]


@pytest.fixture
def keys_before_wait(monkeypatch):
    monkeypatch.setattr(paged_attention_module, "_DECODE_KEYS_BEFORE_WAIT", True)


def test_the_setting_reaches_the_kernel(monkeypatch):
    """Forced on (or off), the decode launch passes it; unset, it follows the launch's PDL (none on the CPU)."""
    seen = record_decode_launches(monkeypatch, "KEYS_BEFORE_WAIT")
    args = _paged_batch(CONTEXTS[:2], 4, 2, 64, torch.float32)
    for setting in (True, False, None):
        monkeypatch.setattr(paged_attention_module, "_DECODE_KEYS_BEFORE_WAIT", setting)
        with triton_on_cpu():
            paged_attention(*args, scale=0.125)
    assert seen == [True, False, False]


# 7 splits are more than the 5 key tiles of the longest context: some splits of every sequence are empty. 40 (most of
# them empty) once per merge and dtype, on the fewest heads: the interpreter runs every program, and the whole grid
# at 40 took 170 s of CI (2026-12-03).
@pytest.mark.parametrize("merge", ["combine_kernel", "in_decode_kernel"])
@pytest.mark.parametrize("num_splits,hq,hkv,dtype", [
    *[(splits, hq, hkv, dtype) for splits in (1, 3, 7) for hq, hkv in ((4, 4), (6, 2), (4, 1))
      for dtype in (torch.float32, torch.float16)],
    (40, 4, 1, torch.float32), (40, 4, 1, torch.float16)])
def test_against_reference_cpu(keys_before_wait, merge, num_splits, hq, hkv, dtype):
    args = _paged_batch(CONTEXTS, hq, hkv, 64, dtype)
    kwargs = {"scale": 0.125, "num_splits": num_splits}
    if merge == "in_decode_kernel":
        kwargs["split_counters"] = counters = torch.zeros(len(CONTEXTS) * hkv, dtype=torch.int32)
    _assert_close(*_run(args, kwargs, dtype), dtype)
    if merge == "in_decode_kernel":
        assert torch.count_nonzero(counters) == 0


@pytest.mark.parametrize("min_tiles", [1, 3])
@pytest.mark.parametrize("block_size", [8, 32])
def test_splits_of_several_tiles_and_page_sizes_cpu(keys_before_wait, monkeypatch, min_tiles, block_size):
    """Splits of several tiles (the first loaded before the wait, the rest in the loop) over pages smaller and larger
    than the 64-key tile, in fp16 (odd head size 80)."""
    monkeypatch.setattr(paged_attention_module, "_MIN_TILES_PER_SPLIT", min_tiles)
    args = _paged_batch(CONTEXTS, 6, 2, 80, torch.float16, block_size=block_size)
    counters = torch.zeros(len(CONTEXTS) * 2, dtype=torch.int32)
    _assert_close(*_run(args, {"scale": 0.125, "num_splits": 4, "split_counters": counters}, torch.float16),
                  torch.float16)  # fmt: skip


@pytest.mark.parametrize("feature", ["window", "window_1", "alibi", "softcap", "all"])
def test_features_cpu(keys_before_wait, feature):
    kwargs = {"scale": 0.125, **FEATURES[feature]}
    if kwargs.get("alibi_slopes") == "alibi":
        kwargs["alibi_slopes"] = _alibi(6)
    args = _paged_batch(CONTEXTS, 6, 2, 64, torch.float16, q_scale=3.0)
    _assert_close(*_run(args, kwargs, torch.float16), torch.float16)


def test_padding_sequences_cpu(keys_before_wait):
    """Sequences without a query keep their real context and a block table pointing outside the cache past their
    blocks: the loads before the wait must skip them as the rest of the kernel does."""
    attention_tests.test_padding_sequences_and_strided_q_out_cpu()


@pytest.mark.parametrize("num_splits", [1, 5])
@pytest.mark.parametrize("merged", [False, True])
def test_fused_rotary_bit_identical_cpu(keys_before_wait, num_splits, merged):
    """With the rotary fused in (the program holding p writes it, then reads it after the wait). 5 splits leave empty
    ones past the longest context's 3 tiles (test_kernel_decode_rotary runs 40 without the setting)."""
    rotary_tests.test_bit_identical_to_the_kernels_it_replaces_cpu(num_splits, merged)


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.37, 0.011)])
def test_fp8_cache_cpu(keys_before_wait, scales):
    rotary_tests.test_fp8_cache_cpu(scales)


# --- GPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(32, 8), (32, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_bits_as_without_gpu(monkeypatch, hq, hkv, dtype):
    seqs = [(1, 1), (1, 64), (1, 65), (1, 300), (1, 4000), (1, 129)]
    args = _paged_batch(seqs, hq, hkv, 128, dtype, device="cuda", seed=5)
    outs = {}
    for setting in (False, True):
        monkeypatch.setattr(paged_attention_module, "_DECODE_KEYS_BEFORE_WAIT", setting)
        counters = torch.zeros(len(seqs) * hkv, dtype=torch.int32, device="cuda")
        outs[setting] = paged_attention(*args, scale=128**-0.5, split_counters=counters)
    assert torch.equal(outs[True], outs[False])
    expected = paged_attention_ref(*(t.float() for t in args[:3]), *args[3:], scale=128**-0.5)
    _assert_close(outs[True].float(), expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(32, 8), (32, 32)])
def test_new_token_read_after_the_wait_gpu(hq, hkv):
    """A batch-1-like decode step in a CUDA graph, launched as runtime steps launch it (PDL, merged splits): p's rows
    are filled with NaN, then the rotary kernel writes them and the decode kernel follows at once. Each of 200
    replays must give the reference's output (a NaN anywhere means p was read before its write)."""
    assert paged_attention_module._DECODE_KEYS_BEFORE_WAIT is not False
    contexts = [64, 300, 65, 1]
    step, caches = rotary_tests._decode_step(contexts, hq, hkv, 128, 128, torch.bfloat16, device="cuda", seed=7)
    slots = step["slot_mapping"].long()
    scale = 128**-0.5
    counters = torch.zeros(len(contexts) * hkv, dtype=torch.int32, device="cuda")
    q_rot = torch.empty_like(step["q"])
    out = torch.empty_like(step["q"])

    def run():
        for cache in caches:  # p's rows garbage until the rotary kernel writes them
            cache.view(-1, hkv, 128).index_fill_(0, slots, float("nan"))
        rotary_and_write_kv(step["q"], step["k"], step["v"], step["cos"], step["sin"], *caches,
                            step["slot_mapping"], q_out=q_rot)  # fmt: skip
        paged_attention(q_rot, *caches, step["block_tables"], step["seq_lens"], step["cu_seqlens_q"], 1,
                        scale=scale, out=out, split_counters=counters)  # fmt: skip

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    expected = paged_attention_ref(q_rot.float(), *(c.float() for c in caches), step["block_tables"],
                                   step["seq_lens"], step["cu_seqlens_q"], 1, scale=scale)  # fmt: skip
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    results = []
    for _ in range(200):
        graph.replay()
        results.append(out.clone())
    torch.cuda.synchronize()
    results = torch.stack(results)
    assert not torch.isnan(results).any()
    assert torch.equal(results, results[0].expand_as(results))
    _assert_close(results[0].float(), expected, torch.bfloat16)
