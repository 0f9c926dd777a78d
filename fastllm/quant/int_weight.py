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


def quantize_int4(weight: torch.Tensor, group_size: int, *, zero_point: bool = False) -> tuple[torch.Tensor, ...]:
    """weight [N, K] (K a multiple of group_size, even) -> (packed [N, K // 2] uint8, scales [N, K // group_size]
    fp32), and with `zero_point` also zeros [N, K // group_size] fp32 (whole numbers in 0..15).

    Symmetric: codes -8..7 (stored + 8), a group's largest magnitude maps to 7. With a zero point (AWQ's and most
    GPTQ checkpoints' form): a group's [min, max] spans the 16 codes, w = (code - zero) * scale, codes 0..15 stored
    as they are.
    """
    n, k = weight.shape
    if k % group_size or k % 2:
        raise ValueError(f"int4 needs in-features divisible by group_size {group_size}, got {k}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    if zero_point:
        low, high = w.amin(dim=2).clamp(max=0), w.amax(dim=2).clamp(min=0)  # the span includes 0: zero is a code
        scales = _scale(high - low, 15)
        zeros = torch.round(-low / scales).clamp(0, 15)
        codes = (torch.round(w / scales[:, :, None]) + zeros[:, :, None]).clamp(0, 15).to(torch.int16).reshape(n, k)
    else:
        scales = _scale(w.abs().amax(dim=2), 7)
        codes = torch.round(w / scales[:, :, None]).clamp(-8, 7).to(torch.int16).reshape(n, k) + 8
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).contiguous()
    return (packed, scales.contiguous(), zeros.contiguous()) if zero_point else (packed, scales.contiguous())


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed [N, K // 2] uint8 -> codes [N, K] int8 in -8..7 (the stored nibbles less 8)."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                    zeros: torch.Tensor | None = None) -> torch.Tensor:
    """(nibble - zero) * scale per group; without zeros the zero is 8 (symmetric)."""
    nibbles = unpack_int4(packed).float() + 8
    n, k = nibbles.shape
    group = k // scales.shape[1]
    zero = zeros[:, :, None] if zeros is not None else 8.0
    return ((nibbles.reshape(n, -1, group) - zero) * scales[:, :, None]).reshape(n, k).to(dtype)
