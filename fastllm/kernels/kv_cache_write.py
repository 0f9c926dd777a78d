"""Writes into the paged KV cache: plain (`write_kv_cache`) and fused with rotary (`rotary_and_write_kv`).

Cache layout (the runtime's contract): per layer `k_cache`, `v_cache` of [num_blocks, block_size, Hkv, D],
contiguous. The token at position p of a sequence lives in block `block_tables[seq, p // block_size]`, row
`p % block_size`; its slot is block_id * block_size + row, so `cache.view(-1, Hkv, D)[slot]` is its row.

    write_kv_cache:       k_cache[slot[t]] = k[t],  v_cache[slot[t]] = v[t]      for every t with slot[t] >= 0
    rotary_and_write_kv:  q_rot = rope(q),  k_cache[slot[t]] = rope(k)[t],  v_cache[slot[t]] = v[t]

where rope is `rotary_embedding_ref` (neox or gptj pairs, partial rotary copies the tail). A negative slot marks a
padding token of a CUDA-graph batch: nothing is written for it (its rotated q is still computed, and unused).
"""

import torch

from fastllm.kernels._registry import (
    FLOAT_DTYPES,
    FP8_KV_DTYPE,
    check_float,
    check_kv_scale,
    check_same_device,
    device_guard,
    next_power_of_2,
    out_or_new,
    pdl_options,
    pdl_wait,
    ref_output,
    register_out_op,
    tl,
    triton,
    use_triton,
)
from fastllm.kernels.rotary import rotary_embedding_ref

# Elements of one [BLOCK_H, BLOCK_D] tile: 4096 keeps 4 warps at 32 elements a thread (16 rotation pairs).
_MAX_TILE = 4096


@triton.jit
def _to_element(x, PTR):
    """x in PTR's element type. A float8 e4m3 KV cache (an FP8 KV cache) saturates at +-448 rather than overflow,
    as `to_cache_dtype` does."""
    if PTR.dtype.element_ty == tl.float8e4nv:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0)
    return x.to(PTR.dtype.element_ty)


@triton.jit
def _to_cache(x, PTR, inv_scale):
    """x as a KV cache stores it: an FP8 cache holds x / scale (its multiplier: real = stored x scale), saturated;
    any other cache holds x itself (the scale is 1.0 there)."""
    if PTR.dtype.element_ty == tl.float8e4nv:
        x = x.to(tl.float32) * inv_scale
    return _to_element(x, PTR)


@triton.jit
def _write_kv_kernel(
    K,  # [T, Hkv, D], strides (stride_kt, stride_kh, 1)
    V,  # [T, Hkv, D], strides (stride_vt, stride_vh, 1)
    K_CACHE,  # [num_slots, Hkv, D] contiguous
    V_CACHE,  # like K_CACHE
    SLOTS,  # [T] int32/int64
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    num_kv_heads,
    head_dim,
    k_inv_scale, v_inv_scale,  # 1 / an FP8 cache's K and V multipliers (1.0 for other caches: not read)
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):  # fmt: skip
    """Program (t, h-block) copies k[t, heads, :] and v[t, heads, :] to the cache row of slot[t] (if >= 0)."""
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < num_kv_heads)[:, None] & (d < head_dim)[None, :]
    cache_off = slot * num_kv_heads * head_dim + h[:, None] * head_dim + d[None, :]
    k = tl.load(K + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(K_CACHE + cache_off, _to_cache(k, K_CACHE, k_inv_scale), mask=mask)
    tl.store(V_CACHE + cache_off, _to_cache(v, V_CACHE, v_inv_scale), mask=mask)


@triton.jit
def _rotate_heads(
    X, Y, COS, SIN, x_row, y_row, cs_row, stride_xh, stride_yh, h, h_mask, half, head_dim, inv_scale,
    INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):  # fmt: skip
    """y[h, :] = rope(x[h, :]) for a block of heads h of one token, in fp32, rounded once to Y's dtype (divided by
    the scale first when Y is an FP8 cache: `_to_cache`).

    x_row, y_row, cs_row: the token's offsets into X, Y and COS/SIN; the pair (a, b) follows rotary.py.
    """
    j = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        a = 2 * j
        b = a + 1
    else:
        a = j
        b = j + half
    pair_mask = j < half
    mask = h_mask[:, None] & pair_mask[None, :]
    x_off = x_row + h[:, None] * stride_xh
    y_off = y_row + h[:, None] * stride_yh
    x_a = tl.load(X + x_off + a[None, :], mask=mask, other=0.0).to(tl.float32)
    x_b = tl.load(X + x_off + b[None, :], mask=mask, other=0.0).to(tl.float32)
    # cos/sin: one [R] row per token, shared by the heads (broadcast over the head axis).
    cos_a = tl.load(COS + cs_row + a, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    cos_b = tl.load(COS + cs_row + b, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    sin_a = tl.load(SIN + cs_row + a, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    sin_b = tl.load(SIN + cs_row + b, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + y_off + a[None, :], _to_cache(x_a * cos_a - x_b * sin_a, Y, inv_scale), mask=mask)
    tl.store(Y + y_off + b[None, :], _to_cache(x_b * cos_b + x_a * sin_b, Y, inv_scale), mask=mask)
    if BLOCK_TAIL > 0:  # partial rotary: copy x[h, R:] through
        c = 2 * half + tl.arange(0, BLOCK_TAIL)
        tail_mask = h_mask[:, None] & (c < head_dim)[None, :]
        x_t = tl.load(X + x_off + c[None, :], mask=tail_mask, other=0.0)
        tl.store(Y + y_off + c[None, :], _to_cache(x_t, Y, inv_scale), mask=tail_mask)


@triton.jit
def rope_tile(X, offsets, d, mask, COS, SIN, cs_row, half, INTERLEAVED: tl.constexpr):
    """rope(x) of a tile of whole heads, element by element, in fp32 (`_rotate_heads`' formulas, in the same order
    of operations): x at X + offsets[:, None] + d[None, :] ([rows, BLOCK_D]), cos/sin at COS/SIN + cs_row + d. Each
    element's partner p(d) in its pair: y[d] = x[d] cos[d] - x[p] sin[d] for the pair's first element, x[d] cos[d] +
    x[p] sin[d] for its second; past the rotary dim 2 * half, x[d] unchanged (partial rotary)."""
    if INTERLEAVED:
        partner = d ^ 1
        first = (d % 2) == 0
    else:
        partner = tl.where(d < half, d + half, d - half)
        first = d < half
    rotated = d < 2 * half
    x = tl.load(X + offsets[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x_p = tl.load(X + offsets[:, None] + partner[None, :], mask=mask & rotated[None, :], other=0.0).to(tl.float32)
    cos = tl.load(COS + cs_row + d, mask=rotated, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(SIN + cs_row + d, mask=rotated, other=0.0).to(tl.float32)[None, :]
    y = tl.where(first[None, :], x * cos - x_p * sin, x * cos + x_p * sin)
    return tl.where(rotated[None, :], y, x)


@triton.jit
def _rotary_write_kv_kernel(
    Q,  # [T, Hq, D], strides (stride_qt, stride_qh, 1)
    K,  # [T, Hkv, D]
    V,  # [T, Hkv, D]
    COS,  # [T, R], row stride stride_ct
    SIN,  # [T, R], row stride stride_st (cos's and sin's row strides are equal, checked by the launcher)
    Q_OUT,  # [T, Hq, D]
    K_CACHE,  # [num_slots, Hkv, D] contiguous
    V_CACHE,
    SLOTS,  # [T]
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_ct,
    num_q_heads,
    num_kv_heads,
    half,  # R / 2
    head_dim,
    k_inv_scale, v_inv_scale,  # as in _write_kv_kernel
    INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):  # fmt: skip
    """Program (t, hb): hb < cdiv(Hq, BLOCK_H) rotates a block of q heads of token t into Q_OUT; the programs
    after them rotate a block of k heads into the cache and copy the matching v heads (if slot[t] >= 0)."""
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    num_q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    cs_row = t * stride_ct
    if hb < num_q_blocks:
        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate_heads(
            Q, Q_OUT, COS, SIN, t * stride_qt, t * stride_ot, cs_row, stride_qh, stride_oh, h, h < num_q_heads,
            half, head_dim, 1.0, INTERLEAVED, BLOCK_HALF, BLOCK_TAIL,
        )  # fmt: skip
    else:
        slot = tl.load(SLOTS + t).to(tl.int64)
        if slot >= 0:
            h = (hb - num_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            h_mask = h < num_kv_heads
            cache_row = slot * num_kv_heads * head_dim
            _rotate_heads(
                K, K_CACHE, COS, SIN, t * stride_kt, cache_row, cs_row, stride_kh, head_dim, h, h_mask,
                half, head_dim, k_inv_scale, INTERLEAVED, BLOCK_HALF, BLOCK_TAIL,
            )  # fmt: skip
            d = tl.arange(0, BLOCK_D)
            mask = h_mask[:, None] & (d < head_dim)[None, :]
            v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
            tl.store(V_CACHE + cache_row + h[:, None] * head_dim + d[None, :], _to_cache(v, V_CACHE, v_inv_scale),
                     mask=mask)  # fmt: skip


# The KV cache may be float8 e4m3 (an FP8 KV cache: `quantization="fp8_kv"`): K and V stored divided by their layer's
# scale (a checkpoint's k_scale / v_scale; 1.0, unscaled, otherwise); values past e4m3's largest (448) saturate.
# Attention widens them back to q's dtype as it reads them, K's scale folded into the score scale and V's applied to
# the output.
KV_CACHE_DTYPES = (*FLOAT_DTYPES, FP8_KV_DTYPE)


def to_cache_dtype(x: torch.Tensor, cache: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x in the cache's dtype; into a float8 cache x / scale (times the fp32 inverse, as the kernels do) saturated at
    +-448, from fp32 (rounded once)."""
    if cache.dtype == FP8_KV_DTYPE:
        x = x.float() if scale == 1.0 else x.float() * (1.0 / scale)
        return x.clamp(-448.0, 448.0).to(FP8_KV_DTYPE)
    return x.to(cache.dtype)


def write_kv_cache_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Plain-PyTorch spec of `write_kv_cache`: the rows of the tokens whose slot is >= 0 copied to their slots."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    rows = (slot_mapping >= 0).nonzero().squeeze(1)  # one mask pass, then index_select/index_copy (cheaper on the
    slots = slot_mapping.index_select(0, rows).long()  # CPU than four boolean-mask indexings)
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        values = to_cache_dtype(x.index_select(0, rows), cache, scale)
        if cache.dtype == FP8_KV_DTYPE:  # torch has no float8 index_copy_ on the CPU: the same bytes, as uint8
            cache, values = cache.view(torch.uint8), values.view(torch.uint8)
        cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, values)


def rotary_and_write_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    interleaved: bool = False,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Plain-PyTorch spec of `rotary_and_write_kv`: rotary on q and k ([T, H, D] with cos/sin [T, 1, R]), then
    `write_kv_cache_ref` of the rotated k and the raw v. Returns the rotated q."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    q_rot = rotary_embedding_ref(q, cos, sin, interleaved=interleaved)
    k_rot = rotary_embedding_ref(k, cos, sin, interleaved=interleaved)
    write_kv_cache_ref(k_rot, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q_rot


def _check_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor):
    """Shared checks: k, v [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D] of k's dtype or float8 e4m3; slots
    [T] int."""
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if name.endswith("cache") and isinstance(t, torch.Tensor) and t.dtype == FP8_KV_DTYPE:
            pass  # an FP8 KV cache: checked below
        else:
            check_float(name, t)
        if name != "k":
            check_same_device(name, t, "k", k)
    if k.ndim != 3:
        raise ValueError(f"k must be [num_tokens, num_kv_heads, head_dim], got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}, expected k's shape {tuple(k.shape)}")
    if k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.shape[-2:] != k.shape[-2:]:
        raise ValueError(
            f"the cache holds {k_cache.shape[-2]} heads of dim {k_cache.shape[-1]} but k has {k.shape[-2]} heads "
            f"of dim {k.shape[-1]}"
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in (k.dtype, FP8_KV_DTYPE):
            raise TypeError(f"{name} has dtype {t.dtype}, expected k's dtype {k.dtype} or {FP8_KV_DTYPE} (FP8 KV "
                            "cache)")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {tuple(t.stride())}")
    if v.dtype != k.dtype:
        raise TypeError(f"v has dtype {v.dtype}, expected k's dtype {k.dtype}")
    if not isinstance(slots, torch.Tensor) or slots.dtype not in (torch.int32, torch.int64):
        got = slots.dtype if isinstance(slots, torch.Tensor) else type(slots).__name__
        raise TypeError(f"slot_mapping must be an int32 or int64 tensor, got {got}")
    check_same_device("slot_mapping", slots, "k", k)
    if slots.shape != k.shape[:1]:
        raise ValueError(f"slot_mapping must have shape ({k.shape[0]},) (one slot per token), got {tuple(slots.shape)}")
    if slots.numel() > 1 and slots.stride(0) != 1:
        raise ValueError("slot_mapping must be contiguous")


def _head_block(num_heads: int, row: int) -> int:
    """Heads per program so that a [BLOCK_H, row] tile stays under _MAX_TILE elements."""
    return max(1, min(next_power_of_2(num_heads), _MAX_TILE // row))


@register_out_op("write_kv_cache", mutates_args=("k_cache", "v_cache"))
def _write_kv_cache_op(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float, v_scale: float,
) -> None:
    if not use_triton(k):
        write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_d = next_power_of_2(head_dim)
    block_h = _head_block(num_kv_heads, block_d)
    with device_guard(k):
        _write_kv_kernel[(num_tokens, triton.cdiv(num_kv_heads, block_h))](
            k, v, k_cache, v_cache, slot_mapping,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            num_kv_heads, head_dim, 1.0 / k_scale, 1.0 / v_scale,
            BLOCK_H=block_h, BLOCK_D=block_d, num_warps=max(1, min(4, block_h * block_d // 256)), **pdl_options(k),
        )  # fmt: skip


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    *, k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Store each token's key and value in its cache slot (in place); slots < 0 are skipped.

    Args:
        k, v: [T, Hkv, D] (any strides with a contiguous last dim, e.g. slices of a fused QKV output).
        k_cache, v_cache: [num_blocks, block_size, Hkv, D], contiguous, k's dtype or float8 e4m3; written in place.
        slot_mapping: [T] int32/int64, slot = block_id * block_size + row; negative = padding, not written.
        k_scale, v_scale: an FP8 cache's multipliers (it stores k / k_scale, v / v_scale); 1.0 for other caches.
    """
    _check_kv(k, v, k_cache, v_cache, slot_mapping)
    check_kv_scale("k_scale", k_scale, k_cache)
    check_kv_scale("v_scale", v_scale, v_cache)
    if not use_triton(k):  # the CPU path: the reference itself, no op dispatch
        write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    _write_kv_cache_op(k, v, k_cache, v_cache, slot_mapping, float(k_scale), float(v_scale))


@register_out_op("rotary_and_write_kv", mutates_args=("k_cache", "v_cache", "q_out"))
def _rotary_and_write_kv_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_out: torch.Tensor,
    interleaved: bool,
    k_scale: float,
    v_scale: float,
) -> None:
    if not use_triton(q):
        q_out.copy_(rotary_and_write_kv_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, interleaved=interleaved,
                                            k_scale=k_scale, v_scale=v_scale))
        return
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    half = cos.shape[1] // 2
    block_half = next_power_of_2(half)
    tail = head_dim - 2 * half
    block_h = _head_block(max(num_q_heads, num_kv_heads), 2 * block_half)
    grid = (num_tokens, triton.cdiv(num_q_heads, block_h) + triton.cdiv(num_kv_heads, block_h))
    with device_guard(q):
        _rotary_write_kv_kernel[grid](
            q, k, v, cos, sin, q_out, k_cache, v_cache, slot_mapping,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            q_out.stride(0), q_out.stride(1), cos.stride(0),
            num_q_heads, num_kv_heads, half, head_dim, 1.0 / k_scale, 1.0 / v_scale,
            INTERLEAVED=interleaved, BLOCK_H=block_h, BLOCK_HALF=block_half,
            BLOCK_TAIL=next_power_of_2(tail) if tail else 0, BLOCK_D=next_power_of_2(head_dim),
            num_warps=max(1, min(4, block_h * block_half // 128)), **pdl_options(q),
        )  # fmt: skip


def rotary_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    interleaved: bool = False,
    q_out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Rotary on q and k, rotated k and raw v written to the paged cache, in one kernel launch.

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D] (any strides with a contiguous last dim), one float dtype.
        cos, sin: [T, R] per-token angles (R even, R <= D; R < D copies the tail of each head unchanged),
            one dtype; the math is `rotary_embedding_ref` (see fastllm/kernels/rotary.py).
        k_cache, v_cache, slot_mapping: as for `write_kv_cache` (slots < 0 are not written).
        interleaved: False for the neox layout (rotate halves), True for the gptj layout (even/odd pairs).
        q_out: optional [T, Hq, D] buffer of dtype promote(q, cos) (q's dtype when cos has it), last dim contiguous.
        k_scale, v_scale: as for `write_kv_cache`.
    Returns:
        The rotated q: q_out, or a new contiguous tensor.
    """
    check_rotary_write_inputs(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if q_out is None and not use_triton(q):  # the CPU path: the reference itself, no buffer nor op dispatch
        return ref_output(rotary_and_write_kv_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
                                                  interleaved=interleaved, k_scale=k_scale, v_scale=v_scale),
                          torch.promote_types(q.dtype, cos.dtype), q)
    # promote_types, not result_type: dynamo traces it (both are tensors of rank >= 1: the same dtype).
    q_out = out_or_new("q_out", q_out, q.shape, torch.promote_types(q.dtype, cos.dtype), q.device)
    _rotary_and_write_kv_op(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, q_out, bool(interleaved),
                            float(k_scale), float(v_scale))
    return q_out


def check_rotary_write_inputs(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    """`rotary_and_write_kv`'s argument checks (also `paged_attention.decode_attention_with_rotary`'s)."""
    _check_kv(k, v, k_cache, v_cache, slot_mapping)
    check_kv_scale("k_scale", k_scale, k_cache)
    check_kv_scale("v_scale", v_scale, v_cache)
    for name, t in (("q", q), ("cos", cos), ("sin", sin)):
        check_float(name, t)
        check_same_device(name, t, "k", k)
    if q.ndim != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim] with k's {k.shape[0]} tokens and head dim "
                         f"{k.shape[2]}, got shape {tuple(q.shape)}")  # fmt: skip
    if q.dtype != k.dtype:
        raise TypeError(f"q has dtype {q.dtype}, expected k's dtype {k.dtype}")
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        raise ValueError(f"cos and sin must have one shape and layout, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dtype != sin.dtype:
        raise TypeError(f"cos and sin must have one dtype, got {cos.dtype} and {sin.dtype}")
    if cos.ndim != 2 or cos.shape[0] != q.shape[0]:
        raise ValueError(f"cos and sin must be [num_tokens, rotary_dim] with {q.shape[0]} tokens, "
                         f"got {tuple(cos.shape)}")  # fmt: skip
    r = cos.shape[1]
    if r % 2 or not 0 < r <= q.shape[2]:
        raise ValueError(f"the rotary dim cos.shape[-1] must be even and in [2, {q.shape[2]}] (the head dim), got {r}")
