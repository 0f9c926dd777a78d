"""Rotary position embedding (RoPE) applied to queries or keys, full or partial, neox or gptj layout.

With R = cos.shape[-1] (even, <= D) and xr = x[..., :R]:

    neox  (interleaved=False, Llama):  pairs (i, i + R/2)   rot = cat(-xr[..., R/2:], xr[..., :R/2])
    gptj  (interleaved=True,  GPT-J):  pairs (2i, 2i + 1)   rot = stack(-xr[..., 1::2], xr[..., ::2]).flatten(-2)
    y[..., :R] = xr * cos + rot * sin,    y[..., R:] = x[..., R:]   (partial rotary: the tail is copied)

so for a pair (a, b): y_a = x_a cos_a - x_b sin_a and y_b = x_b cos_b + x_a sin_b. cos and sin broadcast against
x[..., :R] (Hugging Face passes [B, 1, S, R] for x [B, H, S, D]); the kernel reads them through stride-0 dims
instead of materialising the broadcast.
"""

import torch

from fastllm.kernels._registry import (
    check_float,
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

# Pairs handled by one program; 2048 pairs of fp32 in flight keeps 8 warps at 8 pairs a thread.
_MAX_TILE = 2048


@triton.jit
def _rotary_kernel(
    X,  # [size0, size1, size2, D], any strides (last dim contiguous)
    COS,  # [size0, size1, size2, R], broadcast dims have stride 0
    SIN,  # like COS
    Y,  # [size0, size1, size2, D]
    num_rows,  # size0 * size1 * size2
    size1,
    size2,
    sx0, sx1, sx2,
    sc0, sc1, sc2,
    ss0, ss1, ss2,
    sy0, sy1, sy2,
    half,  # R / 2
    head_dim,  # D
    INTERLEAVED: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):  # fmt: skip
    """A [BLOCK_ROWS, BLOCK_HALF] tile of rotation pairs per program; each row is one (i0, i1, i2) position."""
    pdl_wait(USE_PDL)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    i2 = rows % size2
    i1 = (rows // size2) % size1
    i0 = rows // size2 // size1
    x_row = (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None]
    c_row = (i0 * sc0 + i1 * sc1 + i2 * sc2)[:, None]
    s_row = (i0 * ss0 + i1 * ss1 + i2 * ss2)[:, None]
    y_row = (i0 * sy0 + i1 * sy1 + i2 * sy2)[:, None]

    j = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        a = 2 * j
        b = a + 1
    else:
        a = j
        b = j + half
    a = a[None, :]
    b = b[None, :]
    mask = row_mask[:, None] & (j < half)[None, :]
    x_a = tl.load(X + x_row + a, mask=mask, other=0.0).to(tl.float32)
    x_b = tl.load(X + x_row + b, mask=mask, other=0.0).to(tl.float32)
    cos_a = tl.load(COS + c_row + a, mask=mask, other=0.0).to(tl.float32)
    cos_b = tl.load(COS + c_row + b, mask=mask, other=0.0).to(tl.float32)
    sin_a = tl.load(SIN + s_row + a, mask=mask, other=0.0).to(tl.float32)
    sin_b = tl.load(SIN + s_row + b, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + y_row + a, (x_a * cos_a - x_b * sin_a).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_row + b, (x_b * cos_b + x_a * sin_b).to(Y.dtype.element_ty), mask=mask)

    if HAS_TAIL:  # partial rotary: copy x[..., R:] through
        t = 2 * half + tl.arange(0, BLOCK_TAIL)
        tail_mask = row_mask[:, None] & (t < head_dim)[None, :]
        x_t = tl.load(X + x_row + t[None, :], mask=tail_mask, other=0.0)
        tl.store(Y + y_row + t[None, :], x_t.to(Y.dtype.element_ty), mask=tail_mask)


def rotary_embedding_ref(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False
) -> torch.Tensor:
    """Plain-PyTorch RoPE, operation for operation as Hugging Face writes it (the spec of `rotary_embedding`)."""
    r = cos.shape[-1]
    xr = x[..., :r]
    if interleaved:
        rot = torch.stack((-xr[..., 1::2], xr[..., ::2]), dim=-1).flatten(-2)
    else:
        rot = torch.cat((-xr[..., r // 2 :], xr[..., : r // 2]), dim=-1)
    emb = xr * cos + rot * sin
    return torch.cat((emb, x[..., r:]), dim=-1) if r < x.shape[-1] else emb


def _as_3_leading_dims(t: torch.Tensor) -> torch.Tensor:
    # [..., D] -> [size0, size1, size2, D] as a view; more than 3 leading dims never come from HF models and are
    # flattened with a copy (callers only pass inputs here).
    while t.ndim < 4:
        t = t.unsqueeze(0)
    return t.reshape(-1, *t.shape[-3:]) if t.ndim > 4 else t


def _launch(x, cos, sin, out, interleaved):
    lead = x.shape[:-1]
    r = cos.shape[-1]
    cos = cos.expand(*lead, r)
    sin = sin.expand(*lead, r)
    if x.ndim > 4:  # rare: run on contiguous copies, then write back into the caller's buffer
        y = torch.empty(x.shape, dtype=out.dtype, device=out.device)
        rows = (-1, x.shape[-1])
        _launch(x.reshape(rows), cos.reshape(-1, r), sin.reshape(-1, r), y.view(rows), interleaved)
        out.copy_(y)
        return
    x, cos, sin, y = (_as_3_leading_dims(t) for t in (x, cos, sin, out))
    num_rows = x.shape[0] * x.shape[1] * x.shape[2]
    if num_rows == 0:
        return
    half, head_dim = r // 2, x.shape[-1]
    block_half = next_power_of_2(half)
    # More rows per program only once there are enough programs (>= ~2048) to fill the GPU.
    block_rows = min(next_power_of_2(triton.cdiv(num_rows, 2048)), max(1, _MAX_TILE // block_half))
    tail = head_dim - r
    grid = (triton.cdiv(num_rows, block_rows),)
    with device_guard(x):
        _rotary_kernel[grid](
            x, cos, sin, y,
            num_rows, x.shape[1], x.shape[2],
            *x.stride()[:3], *cos.stride()[:3], *sin.stride()[:3], *y.stride()[:3],
            half, head_dim,
            INTERLEAVED=interleaved, HAS_TAIL=tail > 0,
            BLOCK_ROWS=block_rows, BLOCK_HALF=block_half, BLOCK_TAIL=next_power_of_2(tail),
            num_warps=min(8, max(1, block_rows * block_half // 256)), **pdl_options(x),
        )  # fmt: skip


@register_out_op("rotary_embedding", mutates_args=("out",))
def _rotary_embedding_op(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, interleaved: bool
) -> None:
    if use_triton(x):
        _launch(x, cos, sin, out, interleaved)
    else:
        out.copy_(rotary_embedding_ref(x, cos, sin, interleaved=interleaved))


def rotary_embedding(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    interleaved: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply rotary position embedding to `x`; see the module docstring for the math.

    Args:
        x: [..., D] (typically [B, H, S, D]; any strides, e.g. a transposed [B, S, H, D] view, last dim
            contiguous), float32/float16/bfloat16.
        cos, sin: same shape and dtype, broadcastable to [..., R] (typically [B, 1, S, R]), R even and <= D;
            R < D rotates only x[..., :R] and copies the rest.
        interleaved: False for the neox layout (rotate halves), True for the gptj layout (rotate even/odd pairs).
        out: optional buffer of x's shape and dtype torch.result_type(x, cos), last dim contiguous.
    Returns:
        out, a new contiguous tensor unless `out` was given.
    """
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        check_float(name, t)
    check_same_device("cos", cos, "x", x)
    check_same_device("sin", sin, "x", x)
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dtype != sin.dtype:
        raise TypeError(f"cos and sin must have one dtype, got {cos.dtype} and {sin.dtype}")
    r, head_dim = cos.shape[-1], x.shape[-1]
    if r % 2 or not 0 < r <= head_dim:
        raise ValueError(f"the rotary dim cos.shape[-1] must be even and in [2, {head_dim}] (x's last dim), got {r}")
    lead = tuple(x.shape[:-1])
    try:
        fits = cos.ndim <= x.ndim and torch.broadcast_shapes(cos.shape[:-1], lead) == lead
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"cos/sin of shape {tuple(cos.shape)} do not broadcast to x's {lead + (r,)}")
    if out is None and not use_triton(x):  # the CPU path: the reference itself, no buffer nor op dispatch
        return ref_output(rotary_embedding_ref(x, cos, sin, interleaved=interleaved), torch.result_type(x, cos), x)
    out = out_or_new("out", out, x.shape, torch.result_type(x, cos), x.device)
    _rotary_embedding_op(x, cos, sin, out, bool(interleaved))
    return out
