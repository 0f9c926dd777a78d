"""The attention op the captured graph calls in place of the model's own attention.

    attention(q, k, v, layer=i, scale=s)    q: [1, Hq, T, D], k/v: [1, Hkv, T, D] → [1, Hq, T, D]

The batch is the runner's flattened ragged batch (all sequences' tokens in one row of T). This step's K/V
are written into the paged cache at the metadata's slots, then each token attends over its sequence's cached
context through the block table.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastllm import kernels
from fastllm.runtime.context import get_forward_context


@functools.cache
def _alibi_tensor(slopes: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # Made once per device, by the first (eager) step: graph capture then records a tensor that lives on.
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer: int, scale: float,
              sliding_window: int | None = None, softcap: float | None = None, cos: torch.Tensor | None = None,
              sin: torch.Tensor | None = None, interleaved: bool = False,
              alibi: tuple[float, ...] | None = None) -> torch.Tensor:
    """Paged attention of one layer. With `cos`/`sin` ([1, 1, T, R]), q and k arrive before their rotary
    embedding, which is applied in the same kernel that writes K/V to the cache. `alibi`: per-query-head
    slopes of an ALiBi bias."""
    ctx = get_forward_context()
    if ctx.metadata is None:
        # Profiling forward (one causal sequence, no cache): records each layer's KV shape for sizing the cache.
        if cos is not None:
            q = kernels.rotary_embedding(q, cos, sin, interleaved=interleaved)
            k = kernels.rotary_embedding(k, cos, sin, interleaved=interleaved)
        if ctx.shapes is not None:
            ctx.shapes[layer] = (k.shape[1], k.shape[3])
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    md = ctx.metadata
    k_cache, v_cache = ctx.kv_caches[layer]
    q_tokens, k_tokens, v_tokens = (t[0].transpose(0, 1) for t in (q, k, v))  # [T, H, D] views
    if cos is None:
        kernels.write_kv_cache(k_tokens, v_tokens, k_cache, v_cache, md.slot_mapping)
    else:
        rot = cos.shape[-1]
        q_tokens = kernels.rotary_and_write_kv(q_tokens, k_tokens, v_tokens, cos.reshape(-1, rot),
                                               sin.reshape(-1, rot), k_cache, v_cache, md.slot_mapping,
                                               interleaved=interleaved)
    slopes = None if alibi is None else _alibi_tensor(alibi, q.device)
    out = kernels.paged_attention(q_tokens, k_cache, v_cache, md.block_tables, md.seq_lens, md.cu_seqlens_q,
                                  md.max_seqlen_q, scale=scale, causal=True, sliding_window=sliding_window,
                                  softcap=softcap, alibi_slopes=slopes)
    return out.transpose(0, 1).unsqueeze(0)
