"""Integer weight-only formats: int8 per output channel, int4 in groups of input channels (two a byte).

Both are symmetric (no zero point): a scale maps a channel's (or group's) largest magnitude onto the largest
positive code (127, 7), and codes are rounded to nearest. int4 codes are -8..7 stored offset by 8 as 0..15; input
channel 2j goes in the low nibble of byte j, 2j+1 in the high one.
"""

from __future__ import annotations

import torch


def _scale(amax: torch.Tensor, top: int) -> torch.Tensor:
    return torch.where(amax > 0, amax / top, torch.ones_like(amax))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q [N, K] int8, scale [N] fp32)."""
    w = weight.detach().float()
    scale = _scale(w.abs().amax(dim=1), 127)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (K a multiple of group_size, even) -> (packed [N, K // 2] uint8, scales [N, K // group_size]
    fp32)."""
    n, k = weight.shape
    if k % group_size or k % 2:
        raise ValueError(f"int4 needs in-features divisible by group_size {group_size}, got {k}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    scales = _scale(w.abs().amax(dim=2), 7)
    codes = torch.round(w / scales[:, :, None]).clamp(-8, 7).to(torch.int16).reshape(n, k) + 8
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return packed.contiguous(), scales.contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed [N, K // 2] uint8 -> codes [N, K] int8 in -8..7."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = unpack_int4(packed).float()
    n, k = codes.shape
    group = k // scales.shape[1]
    return (codes.reshape(n, -1, group) * scales[:, :, None]).reshape(n, k).to(dtype)
