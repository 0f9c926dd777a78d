"""SwiGLU's gate: y = silu(x[..., :I]) * x[..., I:] (Llama, Mistral, Qwen MLPs); kernel in `_act_and_mul.py`."""

import torch

from fastllm.kernels._act_and_mul import act_and_mul_out, launch_act_and_mul
from fastllm.kernels._registry import ref_output, register_out_op, use_triton


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch spec of `silu_and_mul`, as Hugging Face's `act_fn(gate) * up`."""
    inter = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :inter]) * x[..., inter:]


@register_out_op("silu_and_mul", mutates_args=("out",))
def _silu_and_mul_op(x: torch.Tensor, out: torch.Tensor) -> None:
    if use_triton(x):
        launch_act_and_mul(x, out, "silu")
    else:
        out.copy_(silu_and_mul_ref(x))


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up].

    Args:
        x: [..., 2I], float32/float16/bfloat16, last dim contiguous.
        out: optional [..., I] buffer of x's dtype.
    Returns:
        out, [..., I].
    """
    if out is None and not use_triton(x):  # the CPU path: the reference itself, no buffer nor op dispatch
        act_and_mul_out(x, None, allocate=False)  # the checks only
        return ref_output(silu_and_mul_ref(x), x.dtype, x)
    out = act_and_mul_out(x, out)
    _silu_and_mul_op(x, out)
    return out
