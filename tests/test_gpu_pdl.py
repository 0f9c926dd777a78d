"""Programmatic dependent launch (kernels/_registry.py): on a Hopper GPU the kernels launch with it, and it changes
only when kernels start, never what they compute."""

import gc

import pytest
import torch

import fastllm
from fastllm.kernels import _registry
from tests._models import VOCAB, build

pytestmark = pytest.mark.gpu


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.skipif(not _hopper(), reason="PDL needs compute capability 9.0+")
def test_kernels_launch_with_pdl_on_hopper_when_asked(monkeypatch):
    x = torch.empty(1, device="cuda")
    assert _registry.pdl_options(x) == {} or _registry._PDL_ENV  # opt-in: off unless FASTLLM_PDL=1
    monkeypatch.setattr(_registry, "_PDL_ENV", True)
    assert _registry.pdl_options(x) == {"USE_PDL": True, "launch_pdl": True}
    assert _registry.pdl_options(x.cpu()) == {}


@pytest.mark.skipif(not _hopper(), reason="PDL needs compute capability 9.0+")
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_pdl_leaves_greedy_tokens_and_logits_bit_identical(family, tmp_path, monkeypatch):
    """bf16, decode through CUDA graphs: the same model with PDL on and off gives bit-identical logits and tokens
    (the same kernels with the same launch settings sum in the same order; a missing wait would read stale data)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (3, 19), generator=g).cuda()
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(_registry, "_PDL_ENV", enabled)
        model = fastllm.optimize(build(family, tmp_path / str(enabled), dtype=torch.bfloat16).cuda(),
                                 num_kv_tokens=4096)
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
        results.append((logits, tokens))
        del model
        gc.collect()
        torch.cuda.empty_cache()
    (logits_on, tokens_on), (logits_off, tokens_off) = results
    assert torch.equal(logits_on, logits_off)
    assert torch.equal(tokens_on, tokens_off)
