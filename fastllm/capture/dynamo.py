"""Capture a model's forward as one torch.fx graph per call signature through dynamo.

`torch.compile(fn, backend=..., fullgraph=True)` hands our backend a `GraphModule` of torch-level calls
(`linear`, `scaled_dot_product_attention`, pow/mean/rsqrt, ...) with the parameters as placeholders, and
the real tensors dynamo would pass for them. The backend rewrites the graph and returns its forward: no
inductor, the rewritten graph runs as Python calling our kernels. Dynamo keeps the guards: a call with a
new signature (prefill vs. decode, a new batch size) is captured and rewritten again.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable

import torch
from torch import fx

# What a failed capture raises: dynamo's own errors (unsupported Python, graph breaks under fullgraph,
# errors in the backend) and the recompile limit.
CAPTURE_ERRORS: tuple[type[BaseException], ...] = (
    torch._dynamo.exc.TorchDynamoException,
    getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", torch._dynamo.exc.TorchDynamoException),
)

# Dynamo keeps its compiled variants (and counts them against `recompile_limit`) per code object. HF
# forwards are wrapped by shared decorators, so without a code object of our own every optimized model
# in a process would add its variants to one list and the ninth would fail to compile.
_entry_ids = itertools.count()

GraphTransform = Callable[[fx.GraphModule, dict[fx.Node, torch.Tensor]], fx.GraphModule]


def capture(fn: Callable, transform: GraphTransform, dynamic: bool | None = None) -> Callable:
    """`fn` compiled so that every captured graph goes through `transform` first.

    transform(gm, tensors) gets the graph and, for each placeholder, the real tensor behind it.
    """

    def backend(gm: fx.GraphModule, example_inputs: list, **_kwargs) -> Callable:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        tensors = {n: t for n, t in zip(placeholders, example_inputs) if isinstance(t, torch.Tensor)}
        return transform(gm, tensors).forward

    def entry(*args, **kwargs):
        return fn(*args, **kwargs)

    code = entry.__code__.replace(co_name=f"fastllm_entry_{next(_entry_ids)}")
    unique = types.FunctionType(code, entry.__globals__, code.co_name, None, entry.__closure__)
    compiled = torch.compile(unique, backend=backend, fullgraph=True, dynamic=dynamic)

    def call(*args, **kwargs):
        # Symbolic sizes, but constant floats: under dynamic=True dynamo would otherwise turn module float
        # attributes (norm eps, scaling) into graph inputs, and the passes match eps as a constant.
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(*args, **kwargs)

    return call
