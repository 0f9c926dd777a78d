"""Triton kernels with pure-PyTorch references, registered as `torch.ops.fastllm.*` custom ops.

CUDA tensors run the Triton kernels; CPU tensors run the references (or the kernels under the Triton
interpreter inside `triton_on_cpu()`). Importing this package does not initialise CUDA.
"""

from fastllm.kernels._registry import triton_on_cpu, use_triton
from fastllm.kernels.gelu_and_mul import gelu_and_mul, gelu_and_mul_ref
from fastllm.kernels.layer_norm import fused_add_layer_norm, fused_add_layer_norm_ref, layer_norm, layer_norm_ref
from fastllm.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from fastllm.kernels.rotary import rotary_embedding, rotary_embedding_ref
from fastllm.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

__all__ = [
    "fused_add_layer_norm",
    "fused_add_layer_norm_ref",
    "fused_add_rms_norm",
    "fused_add_rms_norm_ref",
    "gelu_and_mul",
    "gelu_and_mul_ref",
    "layer_norm",
    "layer_norm_ref",
    "rms_norm",
    "rms_norm_ref",
    "rotary_embedding",
    "rotary_embedding_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
    "triton_on_cpu",
    "use_triton",
]

# Paged KV cache and attention (appended: kv_cache_write.py, paged_attention.py).
from fastllm.kernels.kv_cache_write import (  # noqa: E402
    rotary_and_write_kv,
    rotary_and_write_kv_ref,
    write_kv_cache,
    write_kv_cache_ref,
)
from fastllm.kernels.paged_attention import paged_attention, paged_attention_ref  # noqa: E402

__all__ += [
    "paged_attention",
    "paged_attention_ref",
    "rotary_and_write_kv",
    "rotary_and_write_kv_ref",
    "write_kv_cache",
    "write_kv_cache_ref",
]

# Skinny GEMM for decode (appended: skinny_gemm.py).
from fastllm.kernels.skinny_gemm import skinny_linear, skinny_linear_ref  # noqa: E402

__all__ += ["skinny_linear", "skinny_linear_ref"]

# The runtime step's attention (appended: step_attention.py): the op the attention pass emits.
from fastllm.kernels.step_attention import AttentionMetadata, StepContext, step_attention  # noqa: E402

__all__ += ["AttentionMetadata", "StepContext", "step_attention"]

# Quantized linears (appended: quant_linear.py): FP8 W8A8, int8 / int4 weight-only.
from fastllm.kernels.quant_linear import (  # noqa: E402
    fp8_linear,
    fp8_linear_ref,
    int4_linear,
    int4_linear_ref,
    int8_linear,
    int8_linear_ref,
)

__all__ += ["fp8_linear", "fp8_linear_ref", "int4_linear", "int4_linear_ref", "int8_linear", "int8_linear_ref"]

# Decode linears with their neighbours fused in (appended: fused_linear.py).
from fastllm.kernels.fused_linear import fused_linear, fused_linear_ref  # noqa: E402

__all__ += ["fused_linear", "fused_linear_ref"]

# FP8 linears with the kernel that makes their input quantizing it (appended: fp8_input_linear.py).
from fastllm.kernels.fp8_input_linear import (  # noqa: E402
    act_and_mul_fp8_linear,
    act_and_mul_fp8_linear_ref,
    rms_norm_fp8_linear,
    rms_norm_fp8_linear_ref,
)

__all__ += ["act_and_mul_fp8_linear", "act_and_mul_fp8_linear_ref", "rms_norm_fp8_linear", "rms_norm_fp8_linear_ref"]

# An int4 gate-up projection with its gated activation in the decode kernel's epilogue (appended:
# int4_gated_linear.py).
from fastllm.kernels.int4_gated_linear import int4_linear_and_act, int4_linear_and_act_ref  # noqa: E402

__all__ += ["int4_linear_and_act", "int4_linear_and_act_ref"]

# A decode linear with the residual add and RMSNorm after it in one launch (appended: linear_add_norm.py).
from fastllm.kernels.linear_add_norm import linear_add_rms_norm, linear_add_rms_norm_ref  # noqa: E402

__all__ += ["linear_add_rms_norm", "linear_add_rms_norm_ref"]
