"""Quantization: schemes (`config.py`), their weight and activation formats (`fp8.py`, `int_weight.py`), quantized
checkpoints loaded as they are (`checkpoints.py`). The
quantized linears are kernels (`kernels/quant_linear.py`); the pass that swaps them in is `passes/quantize.py`."""

from fastllm.quant.checkpoints import load_prequantized
from fastllm.quant.config import QuantConfig, resolve_quantization

__all__ = ["QuantConfig", "load_prequantized", "resolve_quantization"]
