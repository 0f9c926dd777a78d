"""Capture a model's forward as one torch.fx graph per call signature through dynamo.

`torch.compile(fn, backend=..., fullgraph=True)` hands our backend a `GraphModule` of torch-level calls
(`linear`, `scaled_dot_product_attention`, pow/mean/rsqrt, ...) with the parameters as placeholders, and
the real tensors dynamo would pass for them. The backend rewrites the graph and returns its forward: no
inductor, the rewritten graph runs as Python calling our kernels. Dynamo keeps the guards: a call with a
new signature (prefill vs. decode, a new batch size) is captured and rewritten again.
"""

from __future__ import annotations

import inspect
import itertools
import types
from collections.abc import Callable

import torch
from torch import fx
from torch._dynamo import eval_frame

from fastllm.capture import graph_cache
from fastllm.capture.layer_stamp import LayerStamp, StampRefused, stamp_layers

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


def capture(fn: Callable, transform: GraphTransform, dynamic: bool | None = None,
            cache_key: str | None = None, direct: bool = False, layers: LayerStamp | None = None) -> Callable:
    """`fn` compiled so that every captured graph goes through `transform` first.

    transform(gm, tensors) gets the graph and, for each placeholder, the real tensor behind it.
    cache_key: keep the captured graph on disk under this key (capture/graph_cache.py), and use the graph
        saved under it, if any, instead of tracing. Only for a function that is captured once (one graph with
        symbolic sizes serves every call): a second capture removes the saved graph.
    direct: after the first trace, call the fused graph directly (its inputs bound from dynamo's source
        expressions, as a graph loaded from the cache is) and forget dynamo's compiled function: no guard
        evaluation per call, and nothing of it left in dynamo's process-wide state, which would otherwise keep the
        function's closure (a model) alive for the life of the process. Only for a caller whose calls all have
        one structure (the runtime's step: same ranks and dtypes, sizes symbolic); falls back to dynamo's own
        calls if the trace cannot be bound (a placeholder without a source, several outputs).
    layers: trace the model with two of its decoder layers and stamp out the rest (capture/layer_stamp.py); the
        widened graph runs as a graph from the cache does (and is saved under cache_key). Where the stamp is
        refused, the model is traced in full. Only with cache_key or direct (the graph is bound by sources).
    """

    def entry(*args, **kwargs):
        return fn(*args, **kwargs)

    code = entry.__code__.replace(co_name=f"fastllm_entry_{next(_entry_ids)}")
    unique = types.FunctionType(code, entry.__globals__, code.co_name, None, entry.__closure__)
    cached = graph_cache.load(cache_key) if cache_key is not None else None
    if cached is not None:
        return _positional(fn, _from_cache(unique, transform, cached))
    traced = _traced(unique, code, transform, dynamic, cache_key, direct)
    if layers is None:
        return _positional(fn, traced) if cache_key is not None or direct else traced
    chosen: list[Callable] = []

    def call_stamped_or_traced(*args, **kwargs):
        if not chosen:
            stamped = _stamped(unique, code, dynamic, layers, args, kwargs)
            if stamped is None:
                chosen.append(traced)
            else:
                if cache_key is not None:
                    graph_cache.save(cache_key, *stamped)
                chosen.append(_from_cache(unique, transform, graph_cache.CachedGraph.of(*stamped)))
                layers.stamped = True
        return chosen[0](*args, **kwargs)

    return _positional(fn, call_stamped_or_traced)


def _stamped(unique: Callable, code: types.CodeType, dynamic: bool | None, layers: LayerStamp, args: tuple,
             kwargs: dict) -> tuple[fx.GraphModule, list[str]] | None:
    """The whole model's graph and placeholder sources, traced with two layers and stamped out; None (the reason
    in `layers.why_not`) where that is refused."""
    graphs: list[tuple[fx.GraphModule, list[str] | None]] = []

    def backend(gm: fx.GraphModule, example_inputs: list, **_kwargs) -> Callable:
        graphs.append((gm, graph_cache.placeholder_sources(gm)))
        return gm.forward  # dynamo runs it once on the two-layer model: cheap, and the result is dropped

    registered = set(eval_frame.cached_backends)
    try:
        with layers.two_layers(), torch._dynamo.config.patch(specialize_float=True):
            torch.compile(unique, backend=backend, fullgraph=True, dynamic=dynamic)(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - any failure here (a forward indexing layers by the config's count) is retried in full
        layers.why_not = f"the two-layer trace failed ({type(error).__name__}: {str(error)[:200]})"
        return None
    finally:  # forget the two-layer trace: the full trace (if refused) must not meet its guards or cache entry
        eval_frame.reset_code(code)
        for key in set(eval_frame.cached_backends) - registered:
            eval_frame.cached_backends.pop(key, None)
    if len(graphs) != 1 or graphs[0][1] is None:
        layers.why_not = "the two-layer trace gave no single graph with sources"
        return None
    try:
        return stamp_layers(*graphs[0], layers.stack)
    except StampRefused as error:
        layers.why_not = str(error)
        return None


def _traced(unique: Callable, code: types.CodeType, transform: GraphTransform, dynamic: bool | None,
            cache_key: str | None, direct: bool) -> Callable:
    """The call that traces `unique` with dynamo on its first call (and, with direct, then calls the graph)."""
    traces: list[tuple[fx.GraphModule, list[str] | None]] = []  # (fused graph, placeholder sources) per trace

    def backend(gm: fx.GraphModule, example_inputs: list, **_kwargs) -> Callable:
        sources = graph_cache.placeholder_sources(gm)  # read before the passes change the graph
        if cache_key is not None:
            if not traces:
                graph_cache.save(cache_key, gm, sources)
            else:
                graph_cache.discard(cache_key)
        fused = transform(gm, graph_cache.placeholder_tensors(gm, example_inputs))
        traces.append((fused, sources))
        return fused.forward

    compiled: Callable | None = None
    ours: set = set()  # dynamo keeps backends for its reset(); they hold `fn`
    switched: list[Callable] = []

    def call(*args, **kwargs):
        nonlocal compiled, ours
        if switched:
            return switched[0](*args, **kwargs)
        if compiled is None:  # made at the first call: a capture that stamps its layers never registers it
            registered = set(eval_frame.cached_backends)
            compiled = torch.compile(unique, backend=backend, fullgraph=True, dynamic=dynamic)
            ours = set(eval_frame.cached_backends) - registered
        # Symbolic sizes, but constant floats: under dynamic=True dynamo would otherwise turn module float
        # attributes (norm eps, scaling) into graph inputs, and the passes match eps as a constant.
        with torch._dynamo.config.patch(specialize_float=True):
            result = compiled(*args, **kwargs)
        if direct and len(traces) == 1 and traces[0][1] is not None:
            gm, sources = traces.pop()
            switched.append(_bound_call(graph_cache.Binder(unique, sources), gm))
            # Dynamo's cache entry on the entry's code object holds the guards and the compiled graph (and through
            # them the model); the code object outlives this function in dynamo's trackers, so clear it here.
            compiled = None
            eval_frame.reset_code(code)
            for key in ours:
                eval_frame.cached_backends.pop(key, None)
        return result

    return call


def _bound_call(binder: graph_cache.Binder, gm: fx.GraphModule) -> Callable:
    """Call `gm` (one output) with its placeholders bound from each call of the captured entry."""
    forward = gm.forward

    def call(*args, **kwargs):
        return forward(*binder(*args, **kwargs))[0]

    return call


def _positional(fn: Callable, call: Callable) -> Callable:
    """`call` with `fn`'s arguments passed positionally where they can be: a saved graph reads its inputs at
    the places the traced call had them (`L['args'][1]`), so every call must have one layout."""
    bind = inspect.signature(fn).bind

    def positional(*args, **kwargs):
        bound = bind(*args, **kwargs)
        return call(*bound.args, **bound.kwargs)

    positional.from_graph_cache = getattr(call, "from_graph_cache", False)
    return positional


def _from_cache(entry: Callable, transform: GraphTransform, cached: graph_cache.CachedGraph) -> Callable:
    """The call of a graph loaded from the cache: its placeholders bound from each call, the passes run on the
    first (after one run of the graph has recorded the shapes they read)."""
    gm, binder = cached.graph_module(), graph_cache.Binder(entry, cached.sources)
    fused: list[Callable] = []

    def call(*args, **kwargs):
        if not fused:
            inputs = binder(*args, **kwargs)
            graph_cache.record_metadata(gm, inputs)
            fused.append(_bound_call(binder, transform(gm, graph_cache.placeholder_tensors(gm, inputs))))
        return fused[0](*args, **kwargs)

    call.from_graph_cache = True
    return call
