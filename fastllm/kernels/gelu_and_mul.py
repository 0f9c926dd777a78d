"""GeGLU's gate: y = gelu(x[..., :I]) * x[..., I:] (Gemma MLPs); kernel in `_act_and_mul.py`."""

import torch

from fastllm.kernels._act_and_mul import act_and_mul_out, launch_act_and_mul
from fastllm.kernels._registry import ref_output, register_out_op, use_triton

_KERNEL_ACTIVATION = {"none": "gelu", "tanh": "gelu_tanh"}


def gelu_and_mul_ref(x: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    """Plain-PyTorch spec of `gelu_and_mul`, as Hugging Face's `act_fn(gate) * up`."""
    inter = x.shape[-1] // 2
    return torch.nn.functional.gelu(x[..., :inter], approximate=approximate) * x[..., inter:]


@register_out_op("gelu_and_mul", mutates_args=("out",))
def _gelu_and_mul_op(x: torch.Tensor, out: torch.Tensor, approximate: str) -> None:
    if use_triton(x):
        launch_act_and_mul(x, out, _KERNEL_ACTIVATION[approximate])
    else:
        out.copy_(gelu_and_mul_ref(x, approximate=approximate))


def gelu_and_mul(x: torch.Tensor, *, approximate: str = "none", out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu(gate) * up for x = [gate | up].

    Args:
        x: [..., 2I], float32/float16/bfloat16, last dim contiguous.
        approximate: "none" (erf, exact) or "tanh" (Gemma's gelu_pytorch_tanh), as in torch.nn.functional.gelu.
        out: optional [..., I] buffer of x's dtype.
    Returns:
        out, [..., I].
    """
    if approximate not in _KERNEL_ACTIVATION:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if out is None and not use_triton(x):  # the CPU path: the reference itself, no buffer nor op dispatch
        act_and_mul_out(x, None, allocate=False)  # the checks only
        return ref_output(gelu_and_mul_ref(x, approximate=approximate), x.dtype, x)
    out = act_and_mul_out(x, out)
    _gelu_and_mul_op(x, out, approximate)
    return out
