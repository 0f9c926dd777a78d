"""The on-disk graph cache (capture/graph_cache.py): a second start of the same model uses the saved graph
instead of dynamo's trace, and gives exactly what the traced graph gives."""

import os
import pickle
from pathlib import Path

import pytest
import torch
import transformers as T

import fastllm
from fastllm.capture import capture, graph_cache
from tests._models import VOCAB, build, optimize

# Plain SDPA models, hand-written attention (bloom: ALiBi and [B*H, S, D] reshapes; gpt2: Conv1D), a soft-capped
# sliding-window model (gemma2), an MoE (mixtral), and Falcon's fused QKV split by list indexing (falcon, falcon_mq:
# their index constants were made on the meta device from the cache, and gave NaN logits).
FAMILIES = ["llama", "qwen2", "bloom", "gpt2", "gemma2", "mixtral", "falcon", "falcon_mq"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "graphs"
    monkeypatch.setenv("FASTLLM_GRAPH_CACHE_DIR", str(directory))
    return directory


def _start(path, **options):
    """optimize() as a new process would: a fresh model object from the saved weights."""
    model = optimize(T.AutoModelForCausalLM.from_pretrained(path).eval(), num_kv_tokens=1024, **options)
    return model, model._fastllm_state.compiled


def _generate(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits)


def _dynamo_traces() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("family", FAMILIES)
def test_second_start_uses_the_saved_graph_and_gives_the_same_output(family, tmp_path, cache_dir, monkeypatch):
    build(family, tmp_path / "model")
    traced, traced_step = _start(tmp_path / "model")
    assert not traced_step.from_graph_cache
    assert len(list(cache_dir.glob("*.pkl"))) == 1
    expected = _generate(traced)
    traces = _dynamo_traces()
    record = graph_cache._record
    runs = []  # whether each metadata run of the loaded graph ran on fake inputs (no forward computed)
    monkeypatch.setattr(graph_cache, "_record", lambda *a, fake_inputs: (runs.append(fake_inputs),
                                                                          record(*a, fake_inputs=fake_inputs)))
    cached, step = _start(tmp_path / "model")
    assert step.from_graph_cache
    assert runs == [True]
    sequences, logits = _generate(cached)
    assert _dynamo_traces() == traces, "the cached start must not trace"
    assert torch.equal(sequences, expected[0])
    assert torch.equal(logits, expected[1])  # the same graph and kernels: bit-identical, not just close
    report, reference = fastllm.explain(cached), fastllm.explain(traced)
    assert report.matches == reference.matches and report.matches["attention"] > 0
    assert report.startup["graph_from_cache"] and not reference.startup["graph_from_cache"]
    assert "graph loaded from the graph cache" in str(report) and "graph traced" in str(reference)


def test_metadata_of_an_op_fake_tensors_cannot_run_comes_from_the_real_inputs():
    """A loaded graph's metadata comes from a run on fake inputs; an op with a data-dependent shape (nonzero) stops
    that run, and the real inputs give the shapes instead."""
    gm = torch.fx.symbolic_trace(lambda x: torch.nonzero(x) * 2)
    graph_cache.record_metadata(gm, [torch.tensor([0, 3, 0, 5, 7])])
    shapes = {node.name: tuple(node.meta["example_value"].shape) for node in gm.graph.nodes if node.op != "output"}
    assert shapes == {"x": (5,), "nonzero": (3, 1), "mul": (3, 1)}
    assert all(isinstance(node.meta["example_value"], torch._subclasses.FakeTensor)
               for node in gm.graph.nodes if node.op != "output")


def test_metadata_holds_no_real_tensor_of_the_model():
    """In the fake run a get_attr constant (a module's buffer) comes back as the real tensor: its metadata is a fake
    copy all the same, so the graph's metadata never keeps a model's tensor alive."""
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.full((4,), 3.0))

        def forward(self, x):
            return x * self.scale

    gm = torch.fx.symbolic_trace(Scaled())
    graph_cache.record_metadata(gm, [torch.ones(2, 4)])
    values = {node.op: node.meta["example_value"] for node in gm.graph.nodes if node.op != "output"}
    assert set(values) == {"placeholder", "get_attr", "call_function"}
    assert all(isinstance(v, torch._subclasses.FakeTensor) for v in values.values())
    assert tuple(values["call_function"].shape) == (2, 4)


def test_a_different_config_is_a_miss(tmp_path, cache_dir):
    build("llama", tmp_path / "a")
    _start(tmp_path / "a")
    config = T.AutoConfig.from_pretrained(tmp_path / "a")
    config.rms_norm_eps = 1e-3  # a constant the graph bakes in
    model = T.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "b")
    _, runner = _start(tmp_path / "b")
    assert not runner.from_graph_cache
    assert len(list(cache_dir.glob("*.pkl"))) == 2


def test_graph_cache_off_writes_nothing(tmp_path, cache_dir):
    build("llama", tmp_path / "model")
    _, runner = _start(tmp_path / "model", graph_cache=False)
    assert not runner.from_graph_cache and not cache_dir.exists()


@pytest.mark.parametrize("content", [b"not a pickle", pickle.dumps({"a": 1})])
def test_an_unreadable_cache_file_is_ignored_with_a_warning(tmp_path, cache_dir, content):
    build("llama", tmp_path / "model")
    traced, _ = _start(tmp_path / "model")
    expected = _generate(traced)
    (file,) = cache_dir.glob("*.pkl")
    file.write_bytes(content)
    with pytest.warns(RuntimeWarning, match="unreadable graph cache file"):
        model, step = _start(tmp_path / "model")
    assert not step.from_graph_cache
    assert torch.equal(_generate(model)[0], expected[0])
    assert pickle.loads(file.read_bytes()).__class__ is graph_cache.CachedGraph  # the trace saved it again


def test_a_function_captured_twice_is_not_cached(cache_dir):
    """Static sizes make dynamo capture again for a new shape: no single saved graph serves every call."""
    key = "twice"

    def double(x):
        return x * 2

    compiled = capture(double, lambda gm, tensors: gm, dynamic=False, cache_key=key)
    compiled(torch.ones(3))
    assert (cache_dir / f"{key}.pkl").exists()
    compiled(torch.ones(5))
    assert not (cache_dir / f"{key}.pkl").exists()


def test_loaded_graph_binds_inputs_on_every_call(cache_dir):
    """Sizes and inputs are read per call; the function's own state (here a closed-over weight) once."""
    weight = torch.randn(4, 4)

    def project(x, y):
        return (x @ weight + y).sum(-1)

    key = "project"
    first = capture(project, lambda gm, tensors: gm, dynamic=True, cache_key=key)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(first(a, b), project(a, b))
    loaded = capture(project, lambda gm, tensors: gm, dynamic=True, cache_key=key)
    assert loaded.from_graph_cache
    for rows in (2, 7):
        x, y = torch.randn(rows, 4), torch.randn(rows, 4)
        assert torch.equal(loaded(x, y), project(x, y))
        assert torch.equal(loaded(x, y=y), project(x, y))


def test_cache_writes_are_atomic(tmp_path):
    from fastllm._cache import write_atomically

    target = tmp_path / "sub" / "file.bin"
    write_atomically(target, b"abc")
    write_atomically(target, b"defg")
    assert target.read_bytes() == b"defg"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]  # no temporary file left behind


def test_default_directory_follows_fastllm_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTLLM_GRAPH_CACHE_DIR", raising=False)
    monkeypatch.setenv("FASTLLM_CACHE_DIR", str(tmp_path))
    assert graph_cache.graph_cache_dir() == Path(tmp_path) / "graphs"
    assert os.environ["FASTLLM_CACHE_DIR"] == str(tmp_path)


def test_a_model_patched_at_run_time_is_not_cached(tmp_path, cache_dir):
    """A module forward replaced on the instance (or a hook) is invisible to the key: such a model is traced."""
    build("llama", tmp_path / "model")
    _start(tmp_path / "model")
    patched = T.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    layer = patched.model.layers[0]
    inner = layer.forward
    layer.forward = lambda *args, **kwargs: inner(*args, **kwargs)
    model = optimize(patched, num_kv_tokens=1024)
    assert not model._fastllm_state.compiled.from_graph_cache
    hooked = T.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    hooked.model.norm.register_forward_hook(lambda module, args, out: out)
    model = optimize(hooked, num_kv_tokens=1024)
    assert not model._fastllm_state.compiled.from_graph_cache
    assert len(list(cache_dir.glob("*.pkl"))) == 1  # neither was saved either


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_cached_graph_on_gpu_with_cuda_graphs(family, tmp_path, cache_dir):
    """bf16 on CUDA, every step a CUDA graph or eager: the cached start equals the traced one bit for bit."""
    build(family, tmp_path / "model", dtype=torch.bfloat16)

    def start():
        model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.bfloat16).cuda().eval()
        return optimize(model, num_kv_tokens=4096, max_num_seqs=8)

    def run(model):
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(3, VOCAB, (3, 40), generator=g).cuda()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        return out.sequences, torch.stack(out.logits)

    traced = start()
    assert traced._fastllm_state.core.runner.use_cuda_graph
    expected = run(traced)
    cached = start()
    assert cached._fastllm_state.compiled.from_graph_cache
    sequences, logits = run(cached)
    assert torch.equal(sequences, expected[0]) and torch.equal(logits, expected[1])


def test_an_unwritable_cache_directory_only_warns(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("FASTLLM_GRAPH_CACHE_DIR", str(blocker / "graphs"))
    build("llama", tmp_path / "model")
    with pytest.warns(RuntimeWarning, match="could not write its graph cache"):
        model, step = _start(tmp_path / "model")
    assert not step.from_graph_cache
    assert _generate(model)[0].shape == (2, 17)


def test_a_cache_file_others_could_have_written_is_not_loaded(tmp_path, cache_dir):
    """Loading a cache file runs code from it: a file (or folder) writable by other users is refused."""
    build("llama", tmp_path / "model")
    traced, _ = _start(tmp_path / "model")
    (file,) = cache_dir.glob("*.pkl")
    assert oct(cache_dir.stat().st_mode & 0o777) == "0o700" and oct(file.stat().st_mode & 0o777) == "0o600"
    for target in (file, cache_dir):
        mode = target.stat().st_mode
        target.chmod(mode | 0o002)
        with pytest.warns(RuntimeWarning, match="can be written by other users"):
            _, step = _start(tmp_path / "model")
        assert not step.from_graph_cache
        target.chmod(mode)
    _, step = _start(tmp_path / "model")
    assert step.from_graph_cache


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_cache_file_of_another_user_is_not_loaded(tmp_path, cache_dir):
    build("llama", tmp_path / "model")
    _start(tmp_path / "model")
    (file,) = cache_dir.glob("*.pkl")
    os.chown(file, 12345, -1)
    with pytest.warns(RuntimeWarning, match="belongs to user id 12345"):
        _, step = _start(tmp_path / "model")
    assert not step.from_graph_cache
