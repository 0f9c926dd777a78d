"""Captured graphs kept on disk, so a second process starting the same model skips dynamo's trace.

Tracing a 32-layer Llama with dynamo takes seconds of Python (most of a warm start, W3); the graph it yields
depends only on the model's code, its config and the call's structure. So the first capture saves the graph
as dynamo handed it to the backend (before the fusion passes: those run again on load, cheap, and merge the
weights of this process's model), with, for each placeholder, the expression dynamo read it from
(`L['input_ids']`, `L['hf_forward'].__self__._modules['model']..._parameters['weight']`,
`L['input_ids'].size()[1]`). A later process with the same key loads the graph, evaluates those expressions
against its own call, rebuilds the shape and dtype metadata the passes read by running the graph once, and
runs the passes: no dynamo.

What dynamo's guards would check is in the key instead: fastllm's, torch's and transformers' versions, the
model's module classes and the source files defining them, its config, its parameters' names, shapes and
dtypes, and the traced function's code. A model patched at run time where the key cannot see it (a module's
forward replaced on the instance, hooks) is not cached; one patched elsewhere (a function of its modeling file
replaced from outside) is beyond the key: use `optimize(model, graph_cache=False)` for such a model. The saved
graph must also accept every call the runner makes, which holds because the runner captures one graph with
symbolic sizes for every step shape (tests/test_step_inputs.py checks one trace); a function that dynamo
captures a second time is not kept. A file that cannot be read is ignored with a warning and the model traced.

The files are pickles written by fastllm in the user's own cache directory (`$FASTLLM_CACHE_DIR/graphs`, created
readable by its owner only); loading one runs code from it, like loading any pickle, so a file (or its folder) that
another user owns or could write is refused with a warning and the model traced instead.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pickle
import stat
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from fastllm._cache import cache_dir, write_atomically

# Bump when what is saved, or how the capture is configured (capture/dynamo.py), changes.
FORMAT = 1


@dataclass(frozen=True)
class _Ref:
    """A reference to an earlier node, by name, in a saved node's arguments."""

    name: str


@dataclass(frozen=True)
class _Op:
    """A torch.library operator (`torch.ops.ns.name`, or `.overload`), by name: they do not pickle."""

    namespace: str
    name: str
    overload: str | None

    @staticmethod
    def wrap(target):
        if isinstance(target, torch._ops.OpOverload):
            return _Op(target.namespace, target._opname, target._overloadname)
        if isinstance(target, torch._ops.OpOverloadPacket):
            namespace, name = target._qualified_op_name.split("::")
            return _Op(namespace, name, None)
        return target

    def resolve(self):
        packet = getattr(getattr(torch.ops, self.namespace), self.name)
        return packet if self.overload is None else getattr(packet, self.overload)


@dataclass
class CachedGraph:
    """A captured graph as dynamo produced it, and where each placeholder's value comes from.

    Saved node by node (op, name, target, arguments), not as a pickled GraphModule: unpickling one re-traces its
    generated code, which fails on code that builds a `torch.Size` from traced sizes (GPT-2)."""

    nodes: list[tuple]  # (op, name, target, args, kwargs) with _Ref for node arguments
    attributes: dict[str, torch.Tensor]  # the GraphModule's constants that get_attr nodes read
    sources: list[str]  # one Python expression over L (the call's locals) and G (the function's globals)

    @classmethod
    def of(cls, gm: fx.GraphModule, sources: list[str]) -> CachedGraph:
        def ref(arg):
            return fx.node.map_arg(arg, lambda n: _Ref(n.name))

        nodes = [(n.op, n.name, _Op.wrap(n.target), ref(n.args), ref(n.kwargs)) for n in gm.graph.nodes]
        attributes = {n.target: _attribute(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        return cls(nodes, attributes, sources)

    def graph_module(self) -> fx.GraphModule:
        graph, by_name = fx.Graph(), {}

        def resolve(arg):
            if isinstance(arg, _Ref):
                return by_name[arg.name]
            if isinstance(arg, (tuple, list)):
                return type(arg)(resolve(a) for a in arg)
            if isinstance(arg, dict):
                return {k: resolve(v) for k, v in arg.items()}
            if isinstance(arg, slice):
                return slice(resolve(arg.start), resolve(arg.stop), resolve(arg.step))
            return arg

        for op, name, target, args, kwargs in self.nodes:
            target = target.resolve() if isinstance(target, _Op) else target
            node = graph.create_node(op, target, resolve(args), resolve(kwargs), name=name)
            by_name[name] = node
        return fx.GraphModule(dict(self.attributes), graph)


def _attribute(gm: fx.GraphModule, target: str) -> torch.Tensor:
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def graph_cache_dir() -> Path:
    """`$FASTLLM_GRAPH_CACHE_DIR` if set, else `graphs/` in fastllm's cache directory."""
    override = os.environ.get("FASTLLM_GRAPH_CACHE_DIR")
    return Path(override).expanduser() if override else cache_dir() / "graphs"


def cache_key(fn: Callable, model: torch.nn.Module, hf_forward: Callable) -> str | None:
    """A hash of everything the captured graph of `fn` (which calls `hf_forward`, `model`'s forward) depends on;
    None for a model changed at run time in ways a key cannot see (traced every time, as without the cache): a
    module whose forward was replaced on the instance (patched layers, accelerate's device-map hooks), forward
    hooks, or a top-level forward that is not the model class's own."""
    import transformers

    from fastllm._version import __version__

    if getattr(hf_forward, "__func__", None) is not type(model).forward:
        return None
    modules = list(model.modules())
    for i, module in enumerate(modules):
        if (i > 0 and "forward" in vars(module)) or module._forward_hooks or module._forward_pre_hooks:
            return None
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return None
    classes = sorted({type(m) for m in modules}, key=lambda c: f"{c.__module__}.{c.__qualname__}")
    code = fn.__code__
    parts = [
        f"format {FORMAT}", __version__, torch.__version__, transformers.__version__,
        sys.version.split()[0], *(f"{c.__module__}.{c.__qualname__}" for c in classes),
        *sorted({_source_hash(c) for c in classes}), _config_json(model.config),
        str(getattr(model.config, "_attn_implementation", None)),
        repr([(name, tuple(t.shape), str(t.dtype), t.device.type) for name, t in model.state_dict().items()]),
        code.co_code.hex(), repr(code.co_consts), repr(code.co_names), repr(code.co_varnames),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _config_json(config) -> str:
    """The model's config as JSON, less where it was loaded from (`_name_or_path`): the same model saved in another
    folder (a copy, a hub snapshot, each test's tmp_path) traces the same graph, and re-tracing it cost ~2.5 s of a
    tiny model's start on a CPU."""
    values = json.loads(config.to_json_string(use_diff=False))
    values.pop("_name_or_path", None)
    return json.dumps(values, sort_keys=True)


def _source_hash(cls: type) -> str:
    """The content of the file defining `cls`: an edited model (an editable transformers install, remote code)
    is a miss."""
    try:
        return hashlib.sha256(Path(inspect.getfile(cls)).read_bytes()).hexdigest()
    except (OSError, TypeError):
        return f"no source for {cls.__module__}.{cls.__qualname__}"


def untrusted(path: Path) -> str | None:
    """Why the cache file `path` must not be loaded, or None: loading a pickle runs code from it, so only a file
    that this user owns and only this user can write, in a folder likewise, is loaded (another user's file, or one
    anybody could have planted or replaced, is not)."""
    if not hasattr(os, "getuid"):  # no POSIX owners and modes to check (Windows): the cache folder is the user's
        return None
    for p in (path, path.parent):
        info = p.stat()
        if info.st_uid != os.getuid():
            return f"{p} belongs to user id {info.st_uid}, not to this user ({os.getuid()})"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{p} can be written by other users (mode {stat.filemode(info.st_mode)})"
    return None


def load(key: str) -> CachedGraph | None:
    path = graph_cache_dir() / f"{key}.pkl"
    if not path.exists():
        return None
    reason = untrusted(path)
    if reason is not None:
        warnings.warn(f"fastllm does not load the graph cache file {path}: {reason}; the model is traced instead "
                      f"(loading a cache file runs code from it)", RuntimeWarning, stacklevel=2)
        return None
    try:
        with path.open("rb") as f:
            entry = pickle.load(f)
        if not isinstance(entry, CachedGraph):
            raise TypeError(f"holds a {type(entry).__name__}")
    except Exception as error:  # noqa: BLE001 - a bad cache file must never stop a model from starting
        warnings.warn(f"fastllm ignores the unreadable graph cache file {path} ({type(error).__name__}: {error}); "
                      "the model is traced instead", RuntimeWarning, stacklevel=2)
        return None
    return entry


def placeholder_sources(gm: fx.GraphModule) -> list[str] | None:
    """Dynamo's source expression of each placeholder of its graph `gm` (`L['args'][0]`, ...), or None if one has
    none or the graph has more than one output (then it cannot be bound from a call, nor cached)."""
    sources = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        grapharg = node.meta.get("grapharg")
        if grapharg is None or getattr(grapharg, "source", None) is None:
            return None
        sources.append(grapharg.source.name)
    outputs = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    if not isinstance(outputs, (tuple, list)) or len(outputs) != 1:
        return None
    return sources


def save(key: str, gm: fx.GraphModule, sources: list[str] | None) -> bool:
    """Save dynamo's graph `gm` (before any pass changed it) under `key`, with its `placeholder_sources`; False if
    it cannot be cached (no sources, or a graph that does not pickle)."""
    if sources is None:
        return False
    try:
        data = pickle.dumps(CachedGraph.of(gm, sources))
    except Exception:  # noqa: BLE001 - an unpicklable graph is traced every time, as without the cache
        return False
    try:
        directory = graph_cache_dir()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # only its owner may plant files in it
        write_atomically(directory / f"{key}.pkl", data)
    except OSError as error:
        warnings.warn(f"fastllm could not write its graph cache ({error}); later starts trace the model again",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def discard(key: str) -> None:
    (graph_cache_dir() / f"{key}.pkl").unlink(missing_ok=True)


class Binder:
    """Evaluates a cached graph's placeholder expressions for a call of capture()'s `entry(*args, **kwargs)`.
    Expressions that read only its closure and globals (parameters, buffers) are evaluated once; the others (the
    call's arguments, their sizes) on every call, through one compiled function."""

    def __init__(self, entry: Callable, sources: list[str]):
        self.closure = dict(zip(entry.__code__.co_freevars, (c.cell_contents for c in entry.__closure__ or ())))
        self.globals = entry.__globals__
        per_call = [i for i, source in enumerate(sources) if "L['args']" in source or "L['kwargs']" in source]
        self.values = [None if i in per_call else eval(source, {"L": self.closure, "G": self.globals})  # noqa: S307
                       for i, source in enumerate(sources)]  # dynamo's own source expressions
        self.per_call = per_call
        self._read = eval(f"lambda L, G: ({', '.join(sources[i] for i in per_call)},)", {})  # noqa: S307

    def __call__(self, *args, **kwargs) -> list[object]:
        values = list(self.values)
        local = {**self.closure, "args": args, "kwargs": kwargs}
        for i, value in zip(self.per_call, self._read(local, self.globals)):
            values[i] = value
        return values


def record_metadata(gm: fx.GraphModule, inputs: list[object]) -> None:
    """Store each node's result shape, dtype and device as `meta["example_value"]` (a fake tensor, as dynamo's trace
    leaves there: the passes read shapes, dtypes and devices, never data), running `gm` on fake copies of `inputs`.

    Fake, not meta-device, tensors: passes make their constants on an example value's device (list_index's index
    tensors, ...), and a constant on the meta device indexed a Falcon's fused QKV into garbage, so every start of
    a Falcon from the graph cache gave NaN logits.

    Fake inputs: the graph's ops only propagate shapes (no forward computed to be thrown away: the demo model's
    256-token profile forward and a fake copy of each of its 2,159 results took 11.8 s of a CPU start from the
    cache). A graph with an op fake tensors cannot run (no fake implementation, a data-dependent shape) runs on the
    real inputs instead, each result then copied as a fake tensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        _record(gm, inputs, FakeTensorMode(allow_non_fake_inputs=True), fake_inputs=True)
    except Exception:  # noqa: BLE001 - whatever stops the fake run, the real one gives the metadata or the error
        _record(gm, inputs, FakeTensorMode(allow_non_fake_inputs=True), fake_inputs=False)


def _record(gm: fx.GraphModule, inputs: list[object], mode, *, fake_inputs: bool) -> None:
    from torch._subclasses.fake_tensor import FakeTensor

    def as_fake(value: object) -> object:
        # A real tensor even in the fake run (a get_attr constant) is copied too: the metadata must not keep a
        # model's tensor alive (quantization frees float weights after compiling)
        if isinstance(value, torch.Tensor):
            return value if isinstance(value, FakeTensor) else mode.from_tensor(value)
        if isinstance(value, (tuple, list)):
            return type(value)(as_fake(v) for v in value)
        return value

    class _Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            node.meta["example_value"] = as_fake(result)
            return result

    with torch.no_grad():
        if not fake_inputs:
            _Recorder(gm).run(*inputs)
            return
        fake = [as_fake(value) for value in inputs]
        with mode:
            _Recorder(gm).run(*fake)


def placeholder_tensors(gm: fx.GraphModule, values: list[object]) -> dict[fx.Node, torch.Tensor]:
    """The tensors among a call's placeholder values, by placeholder node (what the passes get)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n: v for n, v in zip(placeholders, values) if isinstance(v, torch.Tensor)}
