"""After the quantize pass: the float weights of quantized layers let go, and their modules run quantized.

The compiled step reads the quantized tensors (constants of its graph), so the float weights it replaced would only
double the memory a quantized model takes (an 8B model in fp8 would hold 16 GB of bf16 weights beside 8 GB of FP8
ones: on an H200 that cost the KV cache 55k tokens). Once the step is compiled, every quantized linear module gets a
forward that calls the scheme's launcher on its rows of the quantized tensors (a merged QKV / gate-up weight's rows
are its parts', in order), and its weight parameter becomes an empty tensor of the same dtype and device. Hugging
Face's own forward (the calls fastllm hands to it: `past_key_values`, `labels`, ...) then runs the same quantized
math as the compiled step, instead of weights the compiled step does not use.

A weight whose storage another module also reads (an LM head tied to the embedding) keeps its float copy; its
module runs quantized all the same.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedRows:
    """Module `name`'s rows [row0, row0 + rows) of a quantized weight: the scheme's launcher and its tensors."""

    launcher: object
    tensors: tuple[torch.Tensor, ...]
    row0: int
    rows: int
    input_order: torch.Tensor | None = None  # act-order GPTQ: x is gathered into the order the tensors hold

    def part(self) -> tuple[torch.Tensor, ...]:
        """The tensors' rows of this module; a block-scaled FP8 weight's scales [N / bn, ...] by block (fastllm keeps
        such a weight quantized only if its blocks tile it, so every part starts and ends on a block boundary)."""
        n = self.tensors[0].shape[0]
        return tuple(t[self.row0 // (n // t.shape[0]):(self.row0 + self.rows) // (n // t.shape[0])]
                     for t in self.tensors)


def _quantized_forward(launcher, tensors: tuple[torch.Tensor, ...], input_order: torch.Tensor | None,
                       module: torch.nn.Linear, x: torch.Tensor):
    # The launchers take (x, weight, scale, bias, *rest): int4's zero points come after the bias.
    if input_order is not None:
        x = x.index_select(-1, input_order)
    return launcher(x, *tensors[:2], module.bias, *tensors[2:])


def quantized_module_names(model: torch.nn.Module) -> list[str]:
    """The modules `release_float_weights` made run quantized (their float weights gone)."""
    return [name for name, module in model.named_modules()
            if isinstance(vars(module).get("forward"), functools.partial)
            and vars(module)["forward"].func is _quantized_forward]


def is_conv1d(module: torch.nn.Module) -> bool:
    """GPT-2's Conv1D: x @ W + bias with W [K, N], the transpose of a Linear's weight."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def _is_linear(module: torch.nn.Module) -> bool:
    """A module whose forward is x @ W^T + bias over its quantized rows: nn.Linear, or GPT-2's Conv1D (quantized as
    its transpose: the quantize pass takes its addmm)."""
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


def release_float_weights(model: torch.nn.Module, quantized: dict[str, QuantizedRows],
                          merged: dict[tuple, torch.Tensor]) -> int:
    """Point each quantized module (by name) at its quantized rows and free its float weight; drop the merged float
    weights whose parts were all freed from `merged` (the WeightMerger's cache). Returns the bytes freed."""
    readers: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.endswith(".weight"):
            readers.setdefault(param.untyped_storage().data_ptr(), set()).add(name.removesuffix(".weight"))
    freed, released = 0, set()
    for name, rows in quantized.items():
        module = model.get_submodule(name)
        weight = module.weight
        if not _is_linear(module) or weight.numel() == 0:
            continue
        sharing = readers.get(weight.untyped_storage().data_ptr(), set())
        module.forward = functools.partial(_quantized_forward, rows.launcher, rows.part(), rows.input_order, module)
        if not all(n in quantized and _is_linear(model.get_submodule(n)) for n in sharing):
            # Tied to a module that reads the float weight (an embedding): the weight stays, but the module runs
            # quantized all the same (it ran its float weight in Hugging Face's forward, so model(ids, labels=...)
            # or with past_key_values gave other logits than the compiled step's)
            continue
        released.add(weight.untyped_storage().data_ptr())
        freed += weight.numel() * weight.element_size()
        weight.data = weight.new_empty(0)
    for key in [k for k, tensor in merged.items() if tensor.untyped_storage().data_ptr() in released]:
        del merged[key]
    return freed
