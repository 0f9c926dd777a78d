"""FP8 (float8 e4m3) formats: weights scaled per output channel, activations per token (row).

A row's scale maps its largest magnitude onto e4m3's largest finite value (448), so nothing saturates; an all-zero
row gets scale 1 (any scale gives zeros, and 1 keeps the division finite).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] in e4m3, scale [..., 1] fp32) with x ≈ q * scale, one scale per row."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear's weight [N, K] -> (q [N, K] e4m3, scale [N] fp32): one scale per output channel."""
    q, scale = quantize_rows(weight)
    return q.contiguous(), scale.squeeze(-1).contiguous()


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [N, K] whose shape the bn x bk blocks tile -> (q [N, K] e4m3, scale_inv [N / bn, K / bk] fp32), each
    block's largest magnitude mapped onto 448 (the layout `dequantize_blocks` reads; benchmarks and tests write it)."""
    if len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block):
        raise ValueError(f"block must be two positive ints (rows, columns), got {block!r}")
    (n, k), (bn, bk) = weight.shape, block
    if n % bn or k % bk:
        raise ValueError(f"blocks of {block} do not tile a weight of {(n, k)}")
    blocks = weight.detach().float().reshape(n // bn, bn, k // bk, bk)
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(n, k)
    return q, scale.reshape(n // bn, k // bk).contiguous()


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                      block: tuple[int, int] | None = None) -> torch.Tensor:
    """Block-wise FP8 (transformers' "fp8" method, DeepSeek-V3's layout): q [N, K] e4m3 with one multiplier per
    block of bn x bk, scale_inv [ceil(N / bn), ceil(K / bk)] -> q * scale_inv of its block, in `dtype`. Without
    `block` the blocks must tile q exactly (the shapes then say the block: what fastllm keeps quantized)."""
    n, k = q.shape
    rows, cols = scale_inv.shape
    if block is None:
        if n % rows or k % cols:
            raise ValueError(f"scales {tuple(scale_inv.shape)} do not tile a weight of {(n, k)} exactly: give block")
        block = (n // rows, k // cols)
    bn, bk = block
    if rows * bn == n and cols * bk == k:
        # Blocks that tile q: each block's multiplier broadcast over a [rows, bn, cols, bk] view. The same fp32
        # products as the expanded scale below (bit for bit) without that [N, K] fp32 scale, written and read again:
        # long prefills of a block-wise checkpoint call this for every weight on every step (quant_linear.fp8_linear),
        # where it was 8 of the ~27 bytes a weight moved, and 0.47 GB allocated for Llama-3.1-8B's gate-up. (Not
        # timed on a GPU.)
        blocks = q.float().reshape(rows, bn, cols, bk) * scale_inv.float()[:, None, :, None]
        return blocks.reshape(n, k).to(dtype)
    scale = scale_inv.float().repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    return (q.float() * scale).to(dtype)
