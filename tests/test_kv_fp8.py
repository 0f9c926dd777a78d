"""The FP8 KV cache (`quantization="fp8_kv"`): K and V stored as float8 e4m3, written by the KV-write kernels and read
by both attention kernels (Triton interpreted on the CPU, fp32 q) against the references; a model end to end."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import fastllm
from fastllm import QuantConfig
from fastllm.kernels import (
    paged_attention,
    paged_attention_ref,
    rotary_and_write_kv,
    rotary_and_write_kv_ref,
    triton_on_cpu,
    write_kv_cache,
    write_kv_cache_ref,
)
from fastllm.kernels.kv_cache_write import to_cache_dtype
from fastllm.quant.config import check_device_supports, resolve_quantization

FP8 = torch.float8_e4m3fn


def _fp8_caches(num_blocks=6, block_size=4, hkv=2, head_dim=64, seed=7):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, hkv, head_dim)
    return torch.randn(shape, generator=g).to(FP8), torch.randn(shape, generator=g).to(FP8)


def _bytes(t):
    return t.view(torch.uint8)


# Triton's interpreter (3.9) rounds fp32 -> e4m3 wrongly where rounding up crosses a power of two (-31.5 came out
# -16, not -32), so the CPU tests write values e4m3 holds exactly (or saturate): the kernels' paths are checked here,
# the hardware's rounding by the GPU tests (tests/test_gpu_quantization.py).
def _representable(*shape, scale, generator):
    return (torch.randn(*shape, generator=generator) * scale).to(FP8).float()


def test_fp8_write_is_bit_exact_and_saturates():
    g = torch.Generator().manual_seed(0)
    k, v = _representable(7, 2, 64, scale=100, generator=g), _representable(7, 2, 64, scale=1, generator=g)
    k[0, 0, :4] = torch.tensor([1000.0, -1000.0, 448.0, 449.0])  # past e4m3's range: saturates, never NaN
    slots = torch.tensor([3, -1, 0, 9, 17, -1, 5])
    k_cache, v_cache = _fp8_caches()
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(k, v, k_exp, v_exp, slots)
    with triton_on_cpu():
        write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(_bytes(k_cache), _bytes(k_exp)) and torch.equal(_bytes(v_cache), _bytes(v_exp))
    assert k_exp.view(-1, 2, 64)[3, 0, :4].float().tolist() == [448.0, -448.0, 448.0, 448.0]
    assert torch.isfinite(k_exp.float()).all()
    assert torch.equal(k_exp.view(-1, 2, 64)[17].float(), k[4])  # representable values are stored as they are


def test_fp8_reference_write_rounds_once_from_fp32():
    x = torch.tensor([31.5, -31.5, 17.0, 0.3, 500.0])
    cache = torch.zeros(1, dtype=FP8)
    assert to_cache_dtype(x, cache).float().tolist() == [32.0, -32.0, 16.0, 0.3125, 448.0]


@pytest.mark.parametrize("interleaved", [False, True])
def test_fp8_rotary_write_stores_through_the_same_path(interleaved):
    """The rotary kernel's stores into an fp8 cache, with an identity rotation (cos 1, sin 0) of representable k: the
    cache holds k as it is, v copied, q unchanged."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (_representable(7, h, 64, scale=3, generator=g) for h in (8, 2, 2))
    cos, sin = torch.ones(7, 64), torch.zeros(7, 64)
    slots = torch.tensor([3, -1, 0, 9, 17, -1, 5])
    k_cache, v_cache = _fp8_caches()
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    q_exp = rotary_and_write_kv_ref(q, k, v, cos, sin, k_exp, v_exp, slots, interleaved=interleaved)
    with triton_on_cpu():
        q_rot = rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, interleaved=interleaved)
    torch.testing.assert_close(q_rot, q_exp, rtol=0, atol=0)
    assert torch.equal(_bytes(k_cache), _bytes(k_exp)) and torch.equal(_bytes(v_cache), _bytes(v_exp))
    assert torch.equal(k_exp.view(-1, 2, 64)[9].float(), k[3])


@pytest.mark.parametrize("k_scale,v_scale", [(4.0, 0.25), (3.0, 0.1)])
def test_scaled_fp8_writes_store_values_divided_by_the_scale(k_scale, v_scale):
    """A scaled FP8 cache (a checkpoint's k_scale / v_scale) stores x / scale, saturated: both write kernels against
    the reference, bit for bit. x is representable times the scale, so x / scale is representable: the interpreter's
    e4m3 rounding is not what is checked (see _representable)."""
    g = torch.Generator().manual_seed(3)
    k = _representable(7, 2, 64, scale=50, generator=g) * k_scale
    v = _representable(7, 2, 64, scale=1, generator=g) * v_scale
    k[0, 0, 0] = 1e6  # far past 448 x k_scale: saturates at 448 (stored), never NaN
    slots = torch.tensor([3, -1, 0, 9, 17, -1, 5])
    caches = {}
    for name, write in (("ref", write_kv_cache_ref), ("kernel", write_kv_cache)):
        k_cache, v_cache = _fp8_caches()
        with triton_on_cpu():
            write(k, v, k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
        caches[name] = (k_cache, v_cache)
    assert all(torch.equal(_bytes(a), _bytes(b)) for a, b in zip(caches["ref"], caches["kernel"]))
    k_cache, v_cache = caches["ref"]
    torch.testing.assert_close(k_cache.view(-1, 2, 64)[9].float() * k_scale, k[3], rtol=1e-6, atol=0)
    torch.testing.assert_close(v_cache.view(-1, 2, 64)[5].float() * v_scale, v[6], rtol=1e-6, atol=0)
    assert k_cache.view(-1, 2, 64)[3, 0, 0].float() == 448.0
    cos, sin = torch.ones(7, 64), torch.zeros(7, 64)  # the rotary kernel's stores, through an identity rotation
    q = _representable(7, 8, 64, scale=3, generator=g)
    rotated = {}
    for name, write in (("ref", rotary_and_write_kv_ref), ("kernel", rotary_and_write_kv)):
        k_cache, v_cache = _fp8_caches()
        with triton_on_cpu():
            q_rot = write(q, k, v, cos, sin, k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
        rotated[name] = (q_rot, k_cache, v_cache)
    assert torch.equal(rotated["ref"][0], rotated["kernel"][0])  # q is never scaled
    assert all(torch.equal(_bytes(a), _bytes(b)) for a, b in zip(rotated["ref"][1:], rotated["kernel"][1:]))
    assert torch.equal(_bytes(rotated["ref"][1]), _bytes(caches["ref"][0]))


def test_kv_scales_are_checked():
    k = v = torch.zeros(1, 2, 64)
    slots = torch.tensor([0])
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="k_scale must be a finite positive number"):
            write_kv_cache(k, v, *_fp8_caches(), slots, k_scale=bad)
    plain = torch.zeros(6, 4, 2, 64)  # a cache of k's dtype holds values as they are
    with pytest.raises(ValueError, match="v_scale 2.0 scales an FP8 KV cache"):
        write_kv_cache(k, v, plain, plain.clone(), slots, v_scale=2.0)


MIXED, DECODE = [(13, 18), (1, 41), (7, 7)], [(1, 1), (1, 17), (1, 300)]


@pytest.mark.parametrize("seqs,num_splits", [(MIXED, None), (DECODE, None), (DECODE, 3)],
                         ids=["mixed", "decode", "decode-3-splits"])  # splits are a decode option
def test_attention_over_an_fp8_cache_matches_the_reference(seqs, num_splits):
    block_size, hkv, hq, head_dim = 16, 2, 8, 64
    g = torch.Generator().manual_seed(2)
    num_blocks = [-(-ctx // block_size) for _, ctx in seqs]
    total = sum(num_blocks) + 2
    ids = torch.randperm(total, generator=g)
    block_tables = torch.zeros(len(seqs), max(num_blocks), dtype=torch.int32)
    start = 0
    for i, n in enumerate(num_blocks):
        block_tables[i, :n] = ids[start:start + n].int()
        start += n
    k_cache = (torch.randn(total, block_size, hkv, head_dim, generator=g) * 4).to(FP8)
    v_cache = (torch.randn(total, block_size, hkv, head_dim, generator=g) * 4).to(FP8)
    q = torch.randn(sum(n for n, _ in seqs), hq, head_dim, generator=g)
    cu = torch.tensor([0] + [n for n, _ in seqs], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq_lens = torch.tensor([ctx for _, ctx in seqs], dtype=torch.int32)
    max_q = max(n for n, _ in seqs)
    expected = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, cu, max_q, scale=0.125)
    # The reference over the cache widened to fp32 first: the same numbers (e4m3 values are exact in fp32).
    widened = paged_attention_ref(q, k_cache.float(), v_cache.float(), block_tables, seq_lens, cu, max_q, scale=0.125)
    assert torch.equal(expected, widened)
    kwargs = {"num_splits": num_splits} if num_splits else {}
    with triton_on_cpu():
        got = paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu, max_q, scale=0.125, **kwargs)
        # A scaled cache: V's multiplier scales the output (each kernel applies it once, the decode kernel to its
        # split partials), K's is the caller's, folded into `scale`.
        scaled = paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu, max_q, scale=0.125, v_scale=0.375,
                                 **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    scaled_ref = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, cu, max_q, scale=0.125,
                                     v_scale=0.375)
    torch.testing.assert_close(scaled_ref, expected * 0.375, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scaled, scaled_ref, rtol=1e-5, atol=1e-5)


def test_config_shortcut_and_card_check(monkeypatch):
    config = resolve_quantization("fp8_kv")
    assert config.weights is None and config.kv_cache == "fp8"
    assert QuantConfig("int8", kv_cache="fp8").label == "int8"
    with pytest.raises(ValueError, match="quantizes nothing"):
        QuantConfig(weights=None)
    with pytest.raises(ValueError, match="kv_cache must be None or one of"):
        QuantConfig(kv_cache="int8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    with pytest.raises(ValueError, match="'fp8_kv' needs FP8 tensor cores"):
        check_device_supports(config, "cuda")


def _tiny(path):
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=320, max_position_embeddings=512)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return lambda: T.AutoModelForCausalLM.from_pretrained(path).eval()


def test_model_with_an_fp8_kv_cache(tmp_path):
    """The cache holds float8 (a quarter of an fp32 cache's bytes); decode reads it: greedy tokens from generate()
    and LLM agree, and teacher-forced next-token choices match the fp32 cache's on nearly every position."""
    tiny = _tiny(tmp_path)
    plain = fastllm.optimize(tiny(), cpu_runtime=True)
    fp8 = fastllm.optimize(tiny(), quantization="fp8_kv")
    assert fastllm.explain(fp8).graph.quantized_layers == {}  # the weights keep their dtype
    runner, plain_runner = fp8._fastllm_state.core.runner, plain._fastllm_state.core.runner
    assert runner.kv_caches[0][0].dtype == FP8 and "KV cache (float8_e4m3fn)" in str(fastllm.explain(fp8))
    assert 4 * runner.bytes_per_block == plain_runner.bytes_per_block
    ids = torch.randint(3, 320, (1, 24), generator=torch.Generator().manual_seed(3))
    generated = fp8.generate(ids, max_new_tokens=16, do_sample=False)
    with torch.no_grad():  # decode steps read the cache; prefill attends to the fp8 keys it just wrote as well
        a = plain(generated).logits.argmax(-1)
        b = fp8(generated).logits.argmax(-1)
    assert (a == b).float().mean() >= 0.9
    with fastllm.LLM(tiny(), quantization=QuantConfig("int8", kv_cache="fp8")) as llm:
        out = llm.generate([ids[0].tolist()], fastllm.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                           use_tqdm=False)
        assert llm.runner.kv_caches[0][0].dtype == FP8 and len(out[0].outputs[0].token_ids) == 4


def test_fp8_kv_cache_with_preemption_and_prefix_caching(tmp_path):
    """The FP8 cache changes how K/V are stored, nothing about which blocks hold them: a cache small enough to
    preempt, and prefix caching on a second pass, give the same greedy tokens as each request alone (all fp8)."""
    tiny = _tiny(tmp_path)
    rng = torch.Generator().manual_seed(4)
    prefix = torch.randint(3, 320, (32,), generator=rng).tolist()  # two full 16-token blocks shared
    prompts = [prefix + torch.randint(3, 320, (3 + i % 5,), generator=rng).tolist() for i in range(12)]
    params = fastllm.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with fastllm.LLM(tiny(), quantization="fp8_kv") as llm:
        alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    with fastllm.LLM(tiny(), quantization="fp8_kv", num_kv_tokens=160) as small:
        outs = small.generate(prompts, params, use_tqdm=False)
        assert small.num_preemptions > 0
        assert [o.outputs[0].token_ids for o in outs] == alone
    with fastllm.LLM(tiny(), quantization="fp8_kv", enable_prefix_caching=True) as cached:
        for _ in range(2):
            outs = cached.generate(prompts, params, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == alone
        assert cached.metrics()["prefix_cache_hits"] > 0


# --- kv_scales="auto": scales fastllm computes at start-up (fastllm/quant/kv_scales.py) ---------------------------

def test_power_of_two_scales_leave_two_binades_of_headroom():
    from fastllm.quant.kv_scales import calibration_ids, power_of_two_scale

    # amax / scale lands in (56, 112]: 448 / 4 at most, and the smallest power of two that does it
    assert power_of_two_scale(112.0) == 1.0 and power_of_two_scale(113.0) == 2.0
    assert power_of_two_scale(16.0) == 0.25 and power_of_two_scale(3000.0) == 32.0
    assert power_of_two_scale(0.01) == 2.0**-13 and power_of_two_scale(0.0) == 1.0
    for amax in (0.01, 16.0, 57.0, 3000.0, 1e6):
        assert 56.0 < amax / power_of_two_scale(amax) <= 112.0
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="non-finite or negative"):
            power_of_two_scale(bad)
    assert calibration_ids(320) == calibration_ids(320) and max(calibration_ids(320)) < 320


def test_kv_scales_settings_are_checked(tmp_path):
    assert QuantConfig(weights=None, kv_cache="fp8", kv_scales="auto", kv_calibration_ids=[5, 6]).kv_calibration_ids \
        == (5, 6)
    for kwargs, message in (({"weights": "int8", "kv_scales": "auto"}, "set kv_cache='fp8' too"),
                            ({"kv_cache": "fp8", "kv_scales": "max"}, "kv_scales must be one of"),
                            ({"kv_cache": "fp8", "kv_calibration_ids": (1, 2)}, "set that too"),
                            ({"kv_cache": "fp8", "kv_scales": "auto", "kv_calibration_ids": ()}, "non-empty"),
                            ({"kv_cache": "fp8", "kv_scales": "auto", "kv_calibration_ids": (1, -2)}, "ints >= 0"),
                            ({"kv_cache": "fp8", "kv_scales": "auto", "kv_calibration_ids": "hello"}, "non-empty")):
        with pytest.raises(ValueError, match=message):
            QuantConfig(**{"weights": None, **kwargs})
    config = QuantConfig(weights=None, kv_cache="fp8", kv_scales="auto", kv_calibration_ids=(3, 999))
    with pytest.raises(ValueError, match="token id 999, outside the model's vocabulary"):
        fastllm.optimize(_tiny(tmp_path)(), quantization=config)


def _scaled_tiny(path, k_gain: float, v_gain: float):
    """The tiny Llama with K x k_gain and V x v_gain, its outputs unchanged (q and o_proj divided to match): a model
    whose keys run past e4m3's 448 and whose values sit in its subnormals, unscaled."""
    config = T.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=320, max_position_embeddings=512)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.k_proj.weight.mul_(k_gain), attn.q_proj.weight.div_(k_gain)
            attn.v_proj.weight.mul_(v_gain), attn.o_proj.weight.div_(v_gain)
    model.save_pretrained(path)
    return lambda: T.AutoModelForCausalLM.from_pretrained(path).eval()


def _hf_kv_scales(model, ids):
    """Per layer (k_scale, v_scale) from Hugging Face's own forward: |V| from v_proj's output, |K| from k_proj's
    after HF's rotary (what the cache holds), through the same power-of-two rule."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from fastllm.quant.kv_scales import power_of_two_scale

    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o))
             for n, m in model.named_modules() if n.endswith(("k_proj", "v_proj"))]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    cos, sin = model.model.rotary_emb(outputs["model.layers.0.self_attn.k_proj"], torch.arange(ids.shape[1])[None])
    scales = []
    for i in range(config.num_hidden_layers):
        k = outputs[f"model.layers.{i}.self_attn.k_proj"].view(1, ids.shape[1], -1, head_dim).transpose(1, 2)
        k = apply_rotary_pos_emb(k, k, cos, sin)[1]
        v = outputs[f"model.layers.{i}.self_attn.v_proj"]
        scales.append((power_of_two_scale(float(k.abs().max())), power_of_two_scale(float(v.abs().max()))))
    return scales


def test_auto_kv_scales_are_the_powers_of_two_of_the_calibration_activations(tmp_path):
    """The calibration prefill observes K after rotary and V as the cache receives them: its scales equal those of
    Hugging Face's own activations on the same prompt; explain() reports them."""
    tiny = _scaled_tiny(tmp_path, k_gain=600.0, v_gain=0.003)
    ids = torch.randint(3, 320, (1, 96), generator=torch.Generator().manual_seed(5))
    expected = _hf_kv_scales(tiny(), ids)
    config = QuantConfig(weights=None, kv_cache="fp8", kv_scales="auto", kv_calibration_ids=ids[0].tolist())
    model = fastllm.optimize(tiny(), quantization=config)
    runner = model._fastllm_state.core.runner
    assert runner.compiled.context.kv_scales == expected
    assert all(k >= 8.0 and v <= 2.0**-10 for k, v in expected)  # the gains moved them well off 1.0
    assert "KV cache scales per layer: k 8..8" in str(fastllm.explain(model))
    assert runner.pool.num_free_blocks == runner.pool.num_blocks  # the calibration's blocks went back


def test_auto_kv_scales_keep_a_model_whose_keys_saturate_unscaled(tmp_path):
    """Keys past 448 and values in the subnormals garble an unscaled FP8 cache (teacher-forced: 38% of the next
    tokens agree with the fp32 cache's, 5.3 dB when written); with kv_scales="auto" (default calibration prompt)
    the cache keeps them (97%, 30.9 dB, as an unscaled cache does on the unscaled model: 96.5%, 30.5 dB)."""
    tiny = _scaled_tiny(tmp_path, k_gain=600.0, v_gain=0.003)
    ids = torch.randint(3, 320, (1, 200), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = fastllm.optimize(tiny(), cpu_runtime=True)(ids).logits
    results = {}
    for name, quantization in (("unscaled", "fp8_kv"),
                               ("auto", QuantConfig(weights=None, kv_cache="fp8", kv_scales="auto"))):
        with torch.no_grad():
            logits = fastllm.optimize(tiny(), quantization=quantization)(ids).logits
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        sqnr = (10 * torch.log10(reference.pow(2).mean() / (reference - logits).pow(2).mean())).item()
        results[name] = agree, sqnr
    assert results["unscaled"][0] < 0.6 and results["unscaled"][1] < 10
    assert results["auto"][0] >= 0.9 and results["auto"][1] >= 25
    with fastllm.LLM(tiny(), quantization=QuantConfig("int8", kv_cache="fp8", kv_scales="auto")) as llm:
        out = llm.generate([ids[0, :24].tolist()], fastllm.SamplingParams(max_tokens=4, temperature=0,
                                                                          ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4 and llm.runner.compiled.context.kv_scales[0][0] >= 8.0
