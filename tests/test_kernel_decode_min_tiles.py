"""The decode kernel's fewest tiles a split (paged_attention._MIN_TILES_PER_SPLIT) and its single-split output.

The split count is fixed at launch for the longest context; each program then decides from the real context how many
key tiles a split takes (at least MIN_TILES), and a context whose keys all fall to split 0 is written by that
program directly (no partials, no arrival counter, no merge). Checked against the reference with the tolerances of
test_kernel_paged_attention (written there). Not bit for bit against the one-split launch: the interpreter's fp32
products (numpy) differ in the last bit between launches of the same values, seen at 3e-8.
"""

import importlib

import pytest
import torch
from test_kernel_paged_attention import _assert_close, _paged_batch, _run

from fastllm.kernels import paged_attention

# The module (fastllm.kernels exports its launcher under the same name).
paged_attention_module = importlib.import_module("fastllm.kernels.paged_attention")

# Contexts of 1, 17, 64 (one 64-key tile), 129 (three tiles, the last of one key) and 300 (five tiles).
DECODE = [(1, 1), (1, 17), (1, 64), (1, 129), (1, 300)]


@pytest.fixture
def min_tiles(monkeypatch):
    def set_min_tiles(n: int):
        monkeypatch.setattr(paged_attention_module, "_MIN_TILES_PER_SPLIT", n)

    return set_min_tiles


def _counters(seqs, hkv, device="cpu"):
    return torch.zeros(len(seqs) * hkv + 3, dtype=torch.int32, device=device)


@pytest.mark.parametrize("merge", ["combine_kernel", "in_decode_kernel"])
@pytest.mark.parametrize("tiles", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_min_tiles_matches_reference_cpu(min_tiles, tiles, merge, dtype):
    min_tiles(tiles)
    args = _paged_batch(DECODE, 8, 2, 64, dtype)
    kwargs = {"scale": 0.125, "num_splits": 7}
    if merge == "in_decode_kernel":
        kwargs["split_counters"] = counters = _counters(DECODE, 2)
    _assert_close(*_run(args, kwargs, dtype), dtype)
    if merge == "in_decode_kernel":
        assert torch.count_nonzero(counters) == 0  # left ready for the next launch


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [2, 4])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (32, 32)])
def test_min_tiles_gpu(min_tiles, tiles, hq, hkv):
    """Llama-3.1-8B's and Llama-2-7B's heads in bf16, merged in the decode kernel as runtime steps do, at contexts
    from one key to several splits; repeated launches equal the first bit for bit (the merge reads other SMs'
    partials)."""
    min_tiles(tiles)
    seqs = DECODE + [(1, 700), (1, 4000)]
    args = _paged_batch(seqs, hq, hkv, 128, torch.bfloat16, device="cuda", seed=3)
    counters = _counters(seqs, hkv, "cuda")
    kwargs = {"scale": 128**-0.5, "split_counters": counters, "num_splits": 48}
    _assert_close(*_run(args, kwargs, torch.bfloat16, on_cpu=False), torch.bfloat16)
    first = paged_attention(*args, **kwargs)
    outs = torch.stack([paged_attention(*args, **kwargs) for _ in range(100)])
    torch.cuda.synchronize()
    assert torch.equal(outs, first.expand_as(outs))
    assert torch.count_nonzero(counters).item() == 0

