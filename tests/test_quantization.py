"""Quantization on the CPU: formats (quantize/dequantize), the quantized linears against the float linear (SQNR),
the quantize pass, and whole models optimized with `quantization=` (tiny random Llama)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from _kernel_tolerances import CPU_DTYPES, assert_close, rounded_once

import fastllm
from fastllm import QuantConfig, kernels
from fastllm.quant import fp8, int_weight
from fastllm.quant.config import check_device_supports, resolve_quantization

ODD_SHAPES = [(1, 48, 64), (3, 80, 128), (7, 16, 256), (5, 112, 384)]  # (M, N, K): K divisible by 128 for int4


def _sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).mean() / (reference - approx).pow(2).mean()))


# -- formats -------------------------------------------------------------------------------------------------------

def test_fp8_rows_map_each_rows_largest_magnitude_to_448_and_round_trip_representable_values_exactly():
    torch.manual_seed(0)
    codes = torch.randn(6, 40).mul(100).clamp(-448, 448).to(fp8.FP8)   # values e4m3 holds exactly
    codes[:, 0] = 448.0                                                 # each row's largest magnitude
    scale = torch.tensor([[0.5], [1.0], [2.0], [0.25], [8.0], [1 / 64]])
    x = codes.float() * scale
    q, s = fp8.quantize_rows(x)
    assert torch.equal(s, scale) and torch.equal(q.view(torch.uint8), codes.view(torch.uint8))  # bit-exact
    assert torch.equal(fp8.dequantize_rows(q, s), x)


def test_fp8_blocks_map_each_blocks_largest_magnitude_to_448_and_dequantize_to_the_weight():
    torch.manual_seed(2)
    w = torch.randn(64, 96)
    w[:32, :48] *= 100  # one block far larger than the rest: its scale alone moves
    q, scale_inv = fp8.quantize_blocks(w, (32, 48))
    assert q.dtype == fp8.FP8 and scale_inv.shape == (2, 2)
    blocks = q.float().reshape(2, 32, 2, 48).abs().amax(dim=(1, 3))
    assert torch.equal(blocks, torch.full((2, 2), fp8.FP8_MAX))
    restored = fp8.dequantize_blocks(q, scale_inv)
    # e4m3 keeps 3 mantissa bits: each element within half a step (2^-4 of its magnitude) or in the subnormal range
    assert ((restored - w).abs() <= w.abs() * 2**-4 + scale_inv.repeat_interleave(32, 0).repeat_interleave(48, 1)
            * 2**-9).all()
    with pytest.raises(ValueError, match="do not tile"):
        fp8.quantize_blocks(w, (128, 128))
    for bad in ((0, 48), (32,), (32.0, 48), (True, 48)):
        with pytest.raises(ValueError, match="block must be two positive ints"):
            fp8.quantize_blocks(w, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((72, 96), (8, 48)), ((100, 130), (32, 64))])
def test_fp8_block_dequantization_is_each_code_times_its_blocks_multiplier_rounded_once(shape, block, dtype):
    """dequantize_blocks: every element is its code times its block's multiplier in fp32, rounded once to `dtype`,
    bit for bit against a scale expanded to the weight's shape, both where the blocks tile the weight (a broadcast
    over a blocked view) and where they do not (100 x 130 in 32 x 64 blocks: the last blocks ragged)."""
    torch.manual_seed(21)
    n, k = shape
    q = (torch.randn(n, k) * 100).clamp(-448, 448).to(fp8.FP8)
    rows, cols = -(-n // block[0]), -(-k // block[1])
    scale_inv = torch.rand(rows, cols) * 1e-2 + 1e-4
    expanded = scale_inv.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    expected = (q.float() * expanded).to(dtype)
    got = fp8.dequantize_blocks(q, scale_inv, dtype, block if n % block[0] or k % block[1] else None)
    assert got.dtype == dtype and torch.equal(got, expected)


def test_fp8_zero_rows_get_scale_one_and_nothing_saturates():
    x = torch.zeros(2, 8)
    x[1] = torch.linspace(-1e4, 1e4, 8)
    q, s = fp8.quantize_rows(x)
    assert s[0, 0] == 1 and torch.equal(q[0].float(), torch.zeros(8))
    assert q.float().abs().max() == fp8.FP8_MAX and torch.isfinite(fp8.dequantize_rows(q, s)).all()


def test_int8_codes_round_to_nearest_within_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(33, 70)
    w[3] = 0
    q, scale = int_weight.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and scale[3] == 1 and not q[3].any()
    error = (int_weight.dequantize_int8(q, scale) - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()


def test_int4_pack_unpack_is_exact_for_every_code():
    codes = torch.arange(-8, 8, dtype=torch.float32).repeat(3, 4)     # [3, 64]: every code, both nibbles
    scales = torch.full((3, 64 // 32), 0.5)
    w = codes * 0.5
    packed, got_scales = int_weight.quantize_int4(w, 32)
    # Each group's largest magnitude is 8 * 0.5 = 4 -> scale 4 / 7; re-quantize with that and compare codes.
    assert packed.dtype == torch.uint8 and packed.shape == (3, 32)
    unpacked = int_weight.unpack_int4(packed)
    assert torch.equal(unpacked, torch.round(w / got_scales.repeat_interleave(32, 1)).clamp(-8, 7).to(torch.int8))
    # Packing itself: known codes in, the same codes out.
    raw = (torch.arange(64) % 16).reshape(1, 64)
    nibbles = (raw[:, 0::2] | (raw[:, 1::2] << 4)).to(torch.uint8)
    assert torch.equal(int_weight.unpack_int4(nibbles), (raw - 8).to(torch.int8))
    assert scales.shape == got_scales.shape


def test_int4_error_within_half_a_step_and_bad_group_refused():
    torch.manual_seed(2)
    w = torch.randn(10, 256)
    packed, scales = int_weight.quantize_int4(w, 64)
    error = (int_weight.dequantize_int4(packed, scales) - w).abs()
    # Codes stop at -8..7: a group's largest magnitude maps to +-7, so no value is clamped past half a step.
    assert (error <= scales.repeat_interleave(64, 1) / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="divisible by group_size 128"):
        int_weight.quantize_int4(torch.randn(4, 192), 128)


# -- linears: against the float linear ---------------------------------------------------------------------------

# Rounding noise of step D has power D^2 / 12. Gaussian weights, K = 4096: int8's step is amax / 127 with amax ~ 4
# sigma per row -> 40.8 dB; int4's groups have amax ~ 2.2 / 2.5 / 2.8 sigma (32 / 64 / 128) -> 20.9 / 19.8 / 18.8 dB;
# e4m3 (3 mantissa bits) rounds each operand with ~ -31 dB relative noise, both operands -> ~28 dB. Thresholds sit
# ~1 dB below.
# With zero points a group's [min, max] spans 16 codes instead of [-amax, amax] 15: measured 21.9 / 20.8 / 20.0 dB.
SQNR_FLOOR = {"fp8": 27.0, "int8": 39.0, "int4-g32": 19.0, "int4-g64": 18.5, "int4-g128": 17.5,
              "int4-g32-zp": 21.0, "int4-g64-zp": 20.0, "int4-g128-zp": 19.0}


def _quantized_linear(scheme: str, x, w, bias=None):
    if scheme == "fp8":
        return kernels.fp8_linear(x, *fp8.quantize_weight(w), bias)
    if scheme == "int8":
        return kernels.int8_linear(x, *int_weight.quantize_int8(w), bias)
    group, zero_point = int(scheme.split("-g")[1].removesuffix("-zp")), scheme.endswith("-zp")
    packed, scales, *zeros = int_weight.quantize_int4(w, group, zero_point=zero_point)
    return kernels.int4_linear(x, packed, scales, bias, *zeros)


@pytest.mark.parametrize("scheme", list(SQNR_FLOOR))
def test_quantized_linear_sqnr_against_the_float_linear(scheme):
    torch.manual_seed(3)
    x, w = torch.randn(64, 4096), torch.randn(1024, 4096) * 0.02  # 64 rows: fp8 quantizes the activations too
    assert _sqnr(F.linear(x, w), _quantized_linear(scheme, x, w)) >= SQNR_FLOOR[scheme]


def test_fp8_up_to_16_rows_quantizes_only_the_weights():
    """Decode-sized steps read FP8 weights and keep x in its dtype: only the weight's rounding (~31 dB)."""
    torch.manual_seed(5)
    x, w = torch.randn(16, 4096), torch.randn(1024, 4096) * 0.02
    q, scale = fp8.quantize_weight(w)
    y = kernels.fp8_linear(x, q, scale)
    assert torch.allclose(y, F.linear(x, fp8.dequantize_rows(q, scale[:, None])), rtol=1e-4, atol=1e-4)
    assert _sqnr(F.linear(x, w), y) >= 30.0
    x17 = torch.randn(17, 4096)  # one row more: the activations are quantized as well
    y17 = kernels.fp8_linear(x17, q, scale)
    xq, x_scale = fp8.quantize_rows(x17)
    assert torch.allclose(y17, (xq.float() @ q.float().t()) * x_scale * scale, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(y17, F.linear(x17, fp8.dequantize_rows(q, scale[:, None])), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16])
def test_skinny_gemm_reads_fp8_weights_with_their_scales(rows):
    """The skinny GEMM (Triton, interpreted on the CPU) with e4m3 weights and per-column scales, split-K and not,
    equals the reference's weight-only math (fp32 x: the interpreter's tl.dot is exact in fp32)."""
    from fastllm.kernels import skinny_gemm, triton_on_cpu

    torch.manual_seed(6)
    x, w, b = torch.randn(rows, 256), torch.randn(80, 256) * 0.05, torch.randn(80)
    q, scale = fp8.quantize_weight(w)
    expected = kernels.fp8_linear_ref(x, q, scale, b)
    for split_k in (1, 4):
        out = torch.empty(rows, 80)
        cfg = {**skinny_gemm._config(rows, 80, 256, x.dtype, x.device), "split_k": split_k}
        with triton_on_cpu():
            skinny_gemm._launch(x, q, b, out, None, cfg, weight_scale=scale)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("n,k,block", [(256, 512, (128, 128)), (96, 192, (32, 64)), (40, 48, (8, 16))])
def test_skinny_gemm_reads_block_scaled_fp8_weights(rows, n, k, block):
    """A block-wise FP8 checkpoint's weights (a scale per bn x bk block) read by the skinny GEMM (interpreted on the
    CPU) at decode sizes, split-K and not, equal the reference's weight-only math (fp32 x: exact products, fp32 sums
    in another order). Chunks of K shrink to lie in one block column; the broadcast form takes more rows of W."""
    from fastllm.kernels import skinny_gemm, triton_on_cpu

    torch.manual_seed(7)
    x, b = torch.randn(rows, k), torch.randn(n)
    q = (torch.randn(n, k) * 60).clamp(-448, 448).to(fp8.FP8)
    scale_inv = torch.rand(n // block[0], k // block[1]) * 1e-3 + 1e-4
    expected = kernels.fp8_linear_ref(x, q, scale_inv, b)
    cfg = skinny_gemm.block_scaled_config(rows, n, k, x.dtype, x.device, block[1])
    assert block[1] % cfg["BLOCK_K"] == 0
    for split_k in (1, 3):
        out = torch.empty(rows, n)
        with triton_on_cpu():
            skinny_gemm._launch(x, q, b, out, None, {**cfg, "split_k": split_k}, weight_scale=scale_inv)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with triton_on_cpu():  # the launcher: the same kernel at up to 16 rows
        torch.testing.assert_close(kernels.fp8_linear(x, q, scale_inv, b), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("rows,n,k,block", [(17, 256, 512, (128, 128)), (40, 96, 192, (32, 64)),
                                            (33, 72, 96, (8, 48))])
def test_block_scaled_fp8_gemm_past_16_rows_dequantizes_its_tiles(rows, n, k, block, dtype, monkeypatch):
    """BLOCK_FP8_GEMM (on by default): from 17 to BLOCK_FP8_GEMM_MAX_ROWS half-precision rows a Triton GEMM widens
    W's tiles and applies their block's multiplier in its K loop, rounded to x's dtype as the weight cuBLAS read before
    (dequantize_blocks(..., x.dtype)); the reference is F.linear in fp32 over that weight, rounded once. Blocks of 48
    columns take K steps of 16. Past BLOCK_FP8_GEMM_MAX_ROWS rows, and fp32 rows, the weight is dequantized (on the
    CPU: the reference)."""
    from fastllm.kernels import quant_linear, triton_on_cpu

    torch.manual_seed(9)
    x, b = torch.randn(1, rows, k).to(dtype), torch.randn(n).to(dtype)
    q = (torch.randn(n, k) * 60).clamp(-448, 448).to(fp8.FP8)
    scale_inv = torch.rand(n // block[0], k // block[1]) * 1e-3 + 1e-4
    expected = rounded_once(F.linear, x, fp8.dequantize_blocks(q, scale_inv, dtype), b, dtype=dtype)
    launched = []
    kernel = quant_linear._fp8_block_gemm_kernel
    monkeypatch.setattr(quant_linear, "_fp8_block_gemm_kernel", _RecordingLauncher(kernel, launched))
    with triton_on_cpu():
        got = kernels.fp8_linear(x, q, scale_inv, b)
        assert got.shape == (1, rows, n)
        if dtype == torch.float32:  # fp32 keeps the dequantized weight (the CPU's reference here), not the GEMM
            assert not launched
            assert torch.equal(got, kernels.fp8_linear_ref(x, q, scale_inv, b))
            return
        assert len(launched) == 1
        assert_close(got, expected)
        monkeypatch.setattr(quant_linear, "BLOCK_FP8_GEMM_MAX_ROWS", rows - 1)  # past it: not the GEMM
        assert torch.equal(kernels.fp8_linear(x, q, scale_inv, b), kernels.fp8_linear_ref(x, q, scale_inv, b))
    assert len(launched) == 1


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((72, 96), (8, 48)), ((300, 384), (100, 128)),
                                         ((5, 32), (5, 32))])  # fmt: skip
def test_block_fp8_dequantize_kernel_gives_dequantize_blocks_bits(shape, block, dtype):
    """kernels/fp8_block_dequantize.py: one pass over the codes, each times its block's multiplier in fp32, rounded
    once: fp8.dequantize_blocks' bits. 48-column blocks take 16-column programs; 100-row blocks put two multipliers'
    rows in one 64-row program. (bf16 only on the GPU: the interpreter truncates fp32 to bf16 where the GPU rounds to
    nearest even.) Blocks that do not tile the weight, and codes whose columns are not contiguous, are refused."""
    from fastllm.kernels import triton_on_cpu
    from fastllm.kernels.fp8_block_dequantize import dequantize_blocks_kernel

    torch.manual_seed(23)
    n, k = shape
    q = (torch.randn(n, k) * 100).clamp(-448, 448).to(fp8.FP8)
    scale_inv = torch.rand(n // block[0], k // block[1]) * 1e-2 + 1e-4
    with triton_on_cpu():
        got = dequantize_blocks_kernel(q, scale_inv, dtype)
        assert got.dtype == dtype and torch.equal(got, fp8.dequantize_blocks(q, scale_inv, dtype))
        with pytest.raises(ValueError, match="do not tile"):  # n + 1 block rows divide no n rows
            dequantize_blocks_kernel(q, torch.ones(n + 1, scale_inv.shape[1]), dtype)
        with pytest.raises(ValueError, match="contiguous"):
            dequantize_blocks_kernel(q.t().contiguous().t(), scale_inv, dtype)


def test_block_scaled_fp8_the_kernel_cannot_read_runs_the_reference():
    """Blocks narrower than 16 columns (no K chunk fits one) or not tiling the weight: the reference, not a wrong
    answer; and _launch refuses settings whose chunks straddle a block column."""
    from fastllm.kernels import skinny_gemm, triton_on_cpu

    torch.manual_seed(8)
    x = torch.randn(2, 64)
    q = torch.randn(32, 64).clamp(-448, 448).to(fp8.FP8)
    narrow = torch.rand(4, 8) + 0.5  # blocks of 8 x 8
    with triton_on_cpu():
        assert torch.equal(kernels.fp8_linear(x, q, narrow), kernels.fp8_linear_ref(x, q, narrow))
        cfg = {**skinny_gemm.block_scaled_config(2, 32, 64, x.dtype, x.device, 16), "BLOCK_K": 32}
        with pytest.raises(ValueError, match="BLOCK_K \\(32\\) to divide the scale block's 16 columns"):
            skinny_gemm._launch(x, q, None, torch.empty(2, 32), None, cfg, weight_scale=torch.rand(2, 4))


# int4 needs in-features divisible by its group (the pass keeps other layers unquantized): those pairs are left out.
ODD_CASES = [(scheme, shape) for scheme in SQNR_FLOOR for shape in ODD_SHAPES
             if not scheme.startswith("int4") or shape[2] % int(scheme.split("-g")[1].removesuffix("-zp")) == 0]


@pytest.mark.parametrize("scheme,shape", ODD_CASES)
def test_quantized_linear_at_odd_shapes_with_bias_and_leading_dims(scheme, shape):
    m, n, k = shape
    torch.manual_seed(4)
    x, w, b = torch.randn(2, m, k), torch.randn(n, k) * 0.05, torch.randn(n)
    y = _quantized_linear(scheme, x, w, b)
    assert y.shape == (2, m, n) and y.dtype == x.dtype
    # The bias is added exactly, outside the quantized product.
    assert torch.allclose(y - _quantized_linear(scheme, x, w), b.expand_as(y), atol=1e-5)
    assert _sqnr(F.linear(x, w, b), y) >= SQNR_FLOOR[scheme] - 6  # small K averages less rounding noise away


def test_fp8_linear_keeps_half_precision_inputs_dtype():
    x, w = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(32, 64, dtype=torch.bfloat16)
    assert kernels.fp8_linear(x, *fp8.quantize_weight(w)).dtype == torch.bfloat16


# -- configuration -----------------------------------------------------------------------------------------------

def test_config_shortcuts_and_refusals():
    assert resolve_quantization("int4") == QuantConfig("int4")
    assert resolve_quantization(None) is None
    with pytest.raises(ValueError, match=r"quantization must be None, one of \('fp8', 'int8', 'int4', 'fp8_kv'\)"):
        resolve_quantization("fp16")
    with pytest.raises(ValueError, match="group_size must be one of"):
        QuantConfig("int4", group_size=100)
    with pytest.raises(ValueError, match="scheme must be one of"):
        QuantConfig("nf4")
    with pytest.raises(ValueError, match="exclude must be a tuple"):
        QuantConfig(exclude="lm_head")
    assert QuantConfig(exclude=("mlp.down_proj",)).excludes("model.layers.3.mlp.down_proj")
    assert not QuantConfig().excludes("model.layers.3.mlp.down_proj")


def test_fp8_on_a_card_without_fp8_tensor_cores_names_the_card_and_what_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"A100-SXM4-80GB has 8\.0\. Schemes that run on it: \['int8', 'int4'\]"):
        check_device_supports(QuantConfig("fp8"), "cuda")
    check_device_supports(QuantConfig("int4"), "cuda")  # weight-only runs anywhere


# -- the pass and whole models -----------------------------------------------------------------------------------

def _tiny_llama(path, **overrides):
    """A random Llama whose linears all take int4's largest group (in-features 256 and 512)."""
    torch.manual_seed(0)
    options = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=320, max_position_embeddings=256)
    config = T.LlamaConfig(**{**options, **overrides})
    T.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return lambda: T.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("llama_q"))


IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 17, 19]])


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4"])
def test_quantized_model_logits_and_explain(tiny, scheme):
    reference = tiny()
    with torch.no_grad():
        expected = reference(IDS).logits
    model = fastllm.optimize(tiny(), quantization=scheme)
    with torch.no_grad():
        logits = model(IDS).logits
    report = fastllm.explain(model)
    layers = report.graph.quantized_layers
    # 2 layers x (qkv, o_proj, gate_up, down_proj); the LM head is excluded by default
    assert len(layers) == 8 and set(layers.values()) == {QuantConfig(scheme).label}
    assert not any("lm_head" in name for name in layers) and report.matches["quantize"] == 8
    assert f"{QuantConfig(scheme).label} ×8" in str(report)
    floor = {"fp8": 20.0, "int8": 30.0, "int4": 12.0}[scheme]  # logits of 2 layers: a few linears' noise added
    assert _sqnr(expected, logits) >= floor
    assert report.hf_path_reason is None  # a quantized model runs fastllm's runtime on the CPU too


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4"])
def test_the_gated_activation_goes_into_the_quantized_down_projection_only_when_asked(tiny, scheme, monkeypatch):
    """By default quantized linears keep their activation kernels (decode_fusion.FUSE_QUANTIZED says what it measured).
    With FUSE_QUANTIZED, decode_act_fusion takes SiLU * up into each FP8 / int8 down projection as into a float one
    (fused_linear with the weight's scales); int4 keeps its own launcher either way. On the CPU the references run:
    the logits and generate's tokens equal the unfused step's, bit for bit."""
    from fastllm.passes import decode_fusion

    results = []
    for fuse in (False, True):
        monkeypatch.setattr(decode_fusion, "FUSE_QUANTIZED", fuse)
        model = fastllm.optimize(tiny(), quantization=scheme)
        with torch.no_grad():
            logits = model(IDS).logits
        results.append((logits, model.generate(IDS, max_new_tokens=5, do_sample=False), fastllm.explain(model)))
    (unfused_logits, unfused_tokens, default), (logits, tokens, report) = results
    layers = model.config.num_hidden_layers
    assert default.matches["decode_act_fusion"] == 0 and "fused_linear" not in default.graph.fused_ops
    fused = scheme != "int4"
    assert report.matches["decode_act_fusion"] == (layers if fused else 0)
    assert report.graph.fused_ops.get("fused_linear", 0) == (layers if fused else 0)
    assert ("silu_and_mul" in report.graph.fused_ops) != fused
    assert report.matches["quantize"] == default.matches["quantize"] == 4 * layers  # all but the LM head quantized
    assert torch.equal(logits, unfused_logits) and torch.equal(tokens, unfused_tokens)


def test_excluded_layers_keep_the_models_dtype_and_exact_results(tiny):
    reference = tiny()
    model = fastllm.optimize(tiny(), quantization=QuantConfig("int8", exclude=("lm_head", "self_attn.o_proj",
                                                                             "mlp.down_proj")))
    layers = fastllm.explain(model).graph.quantized_layers
    assert len(layers) == 4 and not any("o_proj" in n or "down_proj" in n for n in layers)
    excluded = fastllm.optimize(tiny(), quantization=QuantConfig(
        "int8", exclude=("lm_head", "q_proj", "gate_proj", "o_proj", "down_proj")))
    assert fastllm.explain(excluded).graph.quantized_layers == {}  # a merged weight with an excluded part stays float
    with torch.no_grad():
        assert torch.allclose(excluded(IDS).logits, reference(IDS).logits, atol=1e-4)


def test_int4_layers_the_group_does_not_divide_stay_float_and_are_reported(tmp_path):
    model = fastllm.optimize(_tiny_llama(tmp_path, intermediate_size=320)(), quantization="int4")
    layers = fastllm.explain(model).graph.quantized_layers
    assert layers["model.layers.0.mlp.down_proj"] == "not quantized: in-features 320 not a multiple of group size 128"
    assert layers["model.layers.0.self_attn.o_proj"] == "int4-g128"


def test_llm_and_generate_run_quantized_and_agree(tiny):
    model = fastllm.optimize(tiny(), quantization="int8")
    generated = model.generate(IDS, max_new_tokens=6, do_sample=False)[0, IDS.shape[1]:].tolist()
    with fastllm.LLM(tiny(), quantization="int8") as llm:
        out = llm.generate([IDS[0].tolist()], fastllm.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                           use_tqdm=False)
    assert out[0].outputs[0].token_ids == generated


def test_bad_quantization_option_is_refused_before_anything_runs(tiny):
    model = tiny()
    with pytest.raises(ValueError, match="quantization must be"):
        fastllm.optimize(model, quantization="fp4")
    assert not hasattr(model, "_fastllm_state")


def test_weight_only_on_cuda_warns_that_it_is_the_slow_path():
    from fastllm.quant.config import slow_path_warning

    assert "slower than the model's own dtype there" in slow_path_warning(QuantConfig("int8"), "cuda")
    assert "dequantizes them as it goes" in slow_path_warning(QuantConfig("int4"), "cuda")
    assert slow_path_warning(QuantConfig("fp8"), "cuda") is None
    assert slow_path_warning(QuantConfig("int8"), "cpu") is None


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4-g32", "int4-g64", "int4-g128", "int4-g64-zp"])
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_decode_kernels_read_quantized_weights_like_the_reference(scheme, rows):
    """Up to 16 rows the quantized linears run Triton kernels that read the quantized weights (here interpreted on the
    CPU, fp32 x): the skinny GEMM with 1-byte weights and column scales (fp8, int8), the int4 GEMV over nibbles."""
    from fastllm.kernels import triton_on_cpu

    torch.manual_seed(7)
    x, w, b = torch.randn(rows, 384), torch.randn(80, 384) * 0.05, torch.randn(80)
    expected = _quantized_linear(scheme, x, w, b)  # outside triton_on_cpu(): the reference
    with triton_on_cpu():
        got = _quantized_linear(scheme, x, w, b)
        unbiased = _quantized_linear(scheme, x[None], w)  # leading dims, no bias
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unbiased[0] + b, expected, rtol=1e-5, atol=1e-5)


# -- int4 kernels at odd shapes (Triton interpreted on the CPU) ----------------------------------------------------
# Tolerances (tests/_kernel_tolerances.py). fp32 x: the kernels multiply x by code - zero (the one- and two-row form
# by (code - zero) / 16, a zero point rounded once in 1 + zero / 16: ~1e-7 of a weight) and the group's sum by its
# scale in fp32, summing in another order than the reference (by group, split, tile): the last few bits, rtol/atol
# 1e-5. fp16 x: the reference's fp32 math on the same fp16 inputs, rounded once to fp16 as the kernels round their
# fp32 sums: one fp16 ulp. (bf16 only on the GPU: the interpreter truncates fp32 -> bf16.)

# (M, N, K, group, zero points, bias, split_k). N = 72 and 300 end in a partial block of outputs (BLOCK_N = 8192 //
# group: 256, 128, 64; twice that at one row). split_k None: the heuristic's (one split at these N); 3 splits 8 groups
# 3 + 3 + 2 and 5 groups 2 + 2 + 1, 2 splits 3 groups 2 + 1. M = 1, 2: the broadcast form; 3 to 16: tl.dot, x's rows
# padded to 16.
INT4_DECODE_CASES = [
    (1, 72, 256, 32, False, True, None),
    (1, 300, 384, 128, True, False, 2),
    (2, 300, 320, 64, True, True, 3),
    (2, 72, 256, 128, False, False, None),
    (3, 72, 256, 32, True, False, 3),
    (5, 300, 384, 128, False, True, 2),
    (16, 72, 256, 64, True, True, None),
    (16, 300, 256, 32, False, True, 3),
]


def _int4_inputs(m, n, k, group, zero_point, bias, dtype, lead=()):
    torch.manual_seed(m * 1000 + n + k + group)
    x, w, b = torch.randn(*lead, m, k).to(dtype), torch.randn(n, k) * 0.05, torch.randn(n).to(dtype)
    packed, scales, *zeros = int_weight.quantize_int4(w, group, zero_point=zero_point)
    return x, packed, scales, b if bias else None, zeros[0] if zeros else None


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,n,k,group,zero_point,bias,split_k", INT4_DECODE_CASES)
def test_int4_decode_kernel_at_odd_shapes_against_the_reference(m, n, k, group, zero_point, bias, split_k, dtype):
    from fastllm.kernels import quant_linear, skinny_gemm, triton_on_cpu

    x, packed, scales, b, zeros = _int4_inputs(m, n, k, group, zero_point, bias, dtype)
    expected = kernels.int4_linear_ref(x, packed, scales, b, zeros)  # fp32 math, rounded once to x's dtype
    if split_k is not None:
        assert skinny_gemm._split(k // group, 1, split_k)[0] == split_k  # the splits asked for, last one short
    with triton_on_cpu():
        got = quant_linear._int4_gemv(x, packed, scales, b, zeros, split_k=split_k)
    assert_close(got, expected)


@pytest.mark.parametrize("chunk_groups", [2, 4])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,n,k,group,zero_point,bias,split_k", [c for c in INT4_DECODE_CASES if c[0] > 2])
def test_int4_dot_form_in_chunks_of_several_groups_gives_the_same_bits(m, n, k, group, zero_point, bias, split_k,
                                                                         dtype, chunk_groups, monkeypatch):
    """INT4_DOT_CHUNK_GROUPS (3 to 16 rows): an iteration loads several groups, then runs each group's dot in order:
    the sums of one group an iteration, the same bits where K is split at the same groups (splits are whole chunks:
    8 groups in 3 splits are 3 + 3 + 2 groups, in chunks of 2 or 4 two splits of 4; then within the kernels'
    tolerance), groups the chunk does not divide one group an iteration, the splits summed by the kernel."""
    from fastllm.kernels import quant_linear, skinny_gemm, triton_on_cpu

    x, packed, scales, b, zeros = _int4_inputs(m, n, k, group, zero_point, bias, dtype)
    counters = torch.zeros(-(-n // 16), dtype=torch.int32)
    with triton_on_cpu():
        one_group = quant_linear._int4_gemv(x, packed, scales, b, zeros, split_k=split_k, split_counters=counters)
        monkeypatch.setattr(quant_linear, "INT4_DOT_CHUNK_GROUPS", chunk_groups)
        cfg = quant_linear._int4_config(m, n, k, group, x.device)
        assert cfg["USE_DOT"] and cfg["CHUNK_GROUPS"] == (1 if (k // group) % chunk_groups else chunk_groups)
        got = quant_linear._int4_gemv(x, packed, scales, b, zeros, split_k=split_k, split_counters=counters)
    same_splits = skinny_gemm._split(k // group, 1, split_k or cfg["split_k"]) == skinny_gemm._split(
        k // group, cfg["CHUNK_GROUPS"], split_k or cfg["split_k"])
    if same_splits:
        assert torch.equal(got, one_group)
    assert torch.count_nonzero(counters) == 0
    assert_close(got, kernels.int4_linear_ref(x, packed, scales, b, zeros))
    assert_close(got, one_group)


@pytest.mark.parametrize("m,n,k,group,zero_point,bias,split_k", INT4_DECODE_CASES[:4])
def test_int4_decode_kernel_reads_bytes_where_words_do_not_fit_with_the_same_result(m, n, k, group, zero_point, bias,
                                                                                    split_k):
    """The kernel reads the packed weight as int32 words (8 nibbles a load) where its layout allows; a weight at an
    odd byte offset is read byte by byte, the same nibbles in the same order: the same bits out."""
    from fastllm.kernels import quant_linear, triton_on_cpu

    x, packed, scales, b, zeros = _int4_inputs(m, n, k, group, zero_point, bias, torch.float32)
    shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8)[1:].view(packed.shape)
    shifted.copy_(packed)
    assert quant_linear._int4_words(packed) is not None and quant_linear._int4_words(shifted) is None
    with triton_on_cpu():
        words = quant_linear._int4_gemv(x, packed, scales, b, zeros, split_k=split_k)
        bytes_ = quant_linear._int4_gemv(x, shifted, scales, b, zeros, split_k=split_k)
    assert torch.equal(words, bytes_)
    assert_close(words, kernels.int4_linear_ref(x, packed, scales, b, zeros))


@pytest.mark.parametrize("m,n,k,group,zero_point,bias,split_k", [c for c in INT4_DECODE_CASES if c[-1]])
def test_int4_decode_kernel_summing_its_own_splits_gives_the_reduce_kernels_result(m, n, k, group, zero_point, bias,
                                                                                  split_k, monkeypatch):
    """REDUCE_SPLITS_IN_KERNEL with counters: the last program of each block of outputs sums the partials (the same
    sums in the same order as _split_k_reduce_kernel: bit for bit), and leaves the counters zero; with the setting off,
    or without counters, the reduce kernel runs."""
    from fastllm.kernels import quant_linear, triton_on_cpu

    x, packed, scales, b, zeros = _int4_inputs(m, n, k, group, zero_point, bias, torch.float32)
    counters = torch.zeros(-(-n // 16), dtype=torch.int32)
    launched = []
    reduce_kernel = quant_linear.skinny_gemm._split_k_reduce_kernel
    monkeypatch.setattr(quant_linear.skinny_gemm, "_split_k_reduce_kernel",
                        _RecordingLauncher(reduce_kernel, launched))  # fmt: skip
    assert quant_linear.REDUCE_SPLITS_IN_KERNEL  # the default
    with triton_on_cpu():
        got = quant_linear._int4_gemv(x, packed, scales, b, zeros, split_k=split_k, split_counters=counters)
        assert launched == []  # summed in the kernel
        without_counters = quant_linear._int4_gemv(x, packed, scales, b, zeros, split_k=split_k)
        assert len(launched) == 1
        monkeypatch.setattr(quant_linear, "REDUCE_SPLITS_IN_KERNEL", False)
        expected = quant_linear._int4_gemv(x, packed, scales, b, zeros, split_k=split_k, split_counters=counters)
        assert len(launched) == 2
    assert torch.equal(got, expected) and torch.equal(without_counters, expected)
    assert torch.count_nonzero(counters) == 0
    with pytest.raises(ValueError, match="split_counters must be int32"):
        kernels.int4_linear(x, packed, scales, b, zeros, split_counters=torch.zeros(4))


class _RecordingLauncher:
    """A Triton kernel's `kernel[grid](...)` that records each launch, then launches."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(grid)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("tiles", ["64x64", "128x128"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,n,k,group,zero_point,bias", [(17, 72, 256, 32, True, True),
                                                         (70, 300, 384, 128, False, True),
                                                         (33, 136, 256, 64, True, False)])
def test_int4_gemm_past_16_rows_against_the_dequantized_weight(m, n, k, group, zero_point, bias, dtype, tiles,
                                                               monkeypatch):
    """More than 16 rows run the GEMM that dequantizes W's tiles in its K loop into x's dtype, as the weight cuBLAS
    read before (dequantize_int4(..., x.dtype)): the reference is F.linear in fp32 over that weight, rounded once.
    Both tile shapes: 128 x 128 where the tiles fill the GPU (here: a GPU of one SM), 64 x 64 otherwise."""
    from fastllm.kernels import quant_linear, triton_on_cpu

    if tiles == "128x128":
        monkeypatch.setattr(quant_linear, "sm_count", lambda device: 1)
    assert quant_linear._int4_gemm_config(m, n, group, torch.device("cpu"))["BLOCK_M"] == int(tiles.split("x")[0])
    x, packed, scales, b, zeros = _int4_inputs(m, n, k, group, zero_point, bias, dtype, lead=(1,))
    weight = int_weight.dequantize_int4(packed, scales, dtype, zeros)
    expected = rounded_once(F.linear, x, weight, *([b] if bias else []), dtype=dtype)
    with triton_on_cpu():
        got = kernels.int4_linear(x, packed, scales, b, zeros)
    assert got.shape == (1, m, n)
    assert_close(got, expected)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("n,k,group,zero_point", [(72, 256, 32, True), (300, 384, 128, False), (5, 128, 64, True)])
def test_int4_dequantize_kernel_gives_dequantize_int4s_bits(n, k, group, zero_point, dtype):
    """The same fp32 operations in the same order, rounded once to dtype: the same bits (N = 300 and 5: partial
    blocks of rows). bf16 on the GPU only (the interpreter truncates fp32 -> bf16): test_gpu_quantization."""
    from fastllm.kernels import quant_linear, triton_on_cpu

    _, packed, scales, _, zeros = _int4_inputs(1, n, k, group, zero_point, False, torch.float32)
    with triton_on_cpu():
        got = quant_linear._int4_dequantize(packed, scales, zeros, dtype)
    assert torch.equal(got, int_weight.dequantize_int4(packed, scales, dtype, zeros))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_int4_prefill_from_the_threshold_multiplies_the_dequantized_weight(dtype, monkeypatch):
    """From INT4_DEQUANT_MIN_ROWS rows int4_linear dequantizes the weight and calls F.linear (cuBLAS on a GPU): the
    reference's dequantized weight in dtype times x, rounded once, as the GEMM test's reference; one row fewer takes
    the GEMM (the same reference)."""
    from fastllm.kernels import quant_linear, triton_on_cpu

    monkeypatch.setattr(quant_linear, "INT4_DEQUANT_MIN_ROWS", 40)
    calls = []
    dequantize = quant_linear._int4_dequantize
    monkeypatch.setattr(quant_linear, "_int4_dequantize", lambda *a: calls.append(a) or dequantize(*a))
    for m in (39, 40):
        x, packed, scales, b, zeros = _int4_inputs(m, 136, 256, 64, True, True, dtype, lead=(1,))
        weight = int_weight.dequantize_int4(packed, scales, dtype, zeros)
        expected = rounded_once(F.linear, x, weight, b, dtype=dtype)
        with triton_on_cpu():
            got = kernels.int4_linear(x, packed, scales, b, zeros)
        assert got.shape == (1, m, 136)
        assert_close(got, expected)
        assert len(calls) == (m >= 40)


def test_int4_decode_heuristic_reads_4kb_chunks_and_splits_k_to_fill_the_gpu(monkeypatch):
    """The CPU sizes grids for 132 SMs (an H100 / H200). One row: 8 KB chunks, 8 warps and ~1056 programs wanted (the
    packed bf16x2 loop with one group a chunk: 4 warps, up to 2112), splits of >= 512 columns, at most 8. More rows:
    4 KB chunks, 4 warps, 264 programs, at most 16 splits (the dot form at least 2). INT4_CHUNK_GROUPS (the one-row
    packed loop, where it divides the groups): 16 KB chunks of that many groups a row, 4 warps, ~528 programs, up to 8
    splits; INT4_TWO_ROW_CHUNK_GROUPS (the two-row packed loop): 8 KB chunks, 4 warps, ~264 programs, 2 to 8 splits."""
    from fastllm.kernels import quant_linear
    from fastllm.kernels.quant_linear import _int4_config

    cpu = torch.device("cpu")
    fp32_loop = {"USE_DOT": False, "BLOCK_M": 1, "BLOCK_N": 128, "NUM_STAGES": 3, "num_warps": 8, "CHUNK_GROUPS": 1}
    assert _int4_config(1, 4096, 4096, 128, cpu) == {**fp32_loop, "split_k": 8}  # 32 blocks of 128 outputs
    assert _int4_config(1, 28672, 4096, 128, cpu) == {**fp32_loop, "split_k": 4}  # 224 blocks
    assert _int4_config(2, 4096, 4096, 128, cpu) == {"USE_DOT": False, "BLOCK_M": 2, "BLOCK_N": 64, "NUM_STAGES": 3,
                                                     "num_warps": 4, "split_k": 4, "CHUNK_GROUPS": 1}  # 64 blocks
    assert _int4_config(2, 28672, 4096, 128, cpu)["split_k"] == 1  # the two-row fp32 loop: 448 blocks, no minimum
    assert _int4_config(8, 28672, 4096, 128, cpu)["split_k"] == 2  # the dot form: 448 blocks, at least 2 splits
    assert _int4_config(8, 28672, 512, 128, cpu)["split_k"] == 1  # ... where K holds two 512-column splits
    two_rows = {"USE_DOT": False, "BLOCK_M": 2, "BLOCK_N": 64, "NUM_STAGES": 3, "num_warps": 4, "CHUNK_GROUPS": 2}
    assert _int4_config(2, 28672, 4096, 128, cpu, packed_bf16=True) == {**two_rows, "split_k": 2}  # 448 blocks
    assert _int4_config(2, 6144, 4096, 128, cpu, packed_bf16=True) == {**two_rows, "split_k": 2}  # 96 blocks
    assert _int4_config(2, 4096, 14336, 128, cpu, packed_bf16=True) == {**two_rows, "split_k": 4}  # 64 blocks
    assert _int4_config(2, 4096, 4096, 64, cpu, packed_bf16=True) == {**two_rows, "BLOCK_N": 128, "split_k": 8}
    assert _int4_config(2, 256, 1152, 128, cpu, packed_bf16=True)["CHUNK_GROUPS"] == 1  # 9 groups: 2 divides not
    assert _int4_config(8, 4096, 14336, 32, cpu) == {"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": 256, "NUM_STAGES": 3,
                                                     "num_warps": 4, "split_k": 16,
                                                     "CHUNK_GROUPS": 1}  # 16 blocks, 28 x 512 columns  # fmt: skip
    chunked = {"USE_DOT": False, "BLOCK_M": 1, "BLOCK_N": 64, "NUM_STAGES": 3, "num_warps": 4, "CHUNK_GROUPS": 4}
    monkeypatch.setattr(quant_linear, "INT4_CHUNK_GROUPS", 4)
    assert _int4_config(1, 28672, 4096, 128, cpu, packed_bf16=True) == {**chunked, "split_k": 1}  # 448 blocks
    assert _int4_config(1, 6144, 4096, 128, cpu, packed_bf16=True) == {**chunked, "split_k": 5}  # 96 blocks
    assert _int4_config(1, 4096, 14336, 128, cpu, packed_bf16=True) == {**chunked, "split_k": 8}  # 64 blocks
    assert _int4_config(1, 256, 1024, 128, cpu, packed_bf16=True) == {**chunked, "split_k": 2}  # 4 blocks, 2 splits
    assert _int4_config(1, 256, 1152, 128, cpu, packed_bf16=True)["CHUNK_GROUPS"] == 1  # 9 groups: 4 divides not
    assert _int4_config(1, 4096, 4096, 128, cpu)["CHUNK_GROUPS"] == 1  # the fp32 loop
    monkeypatch.setattr(quant_linear, "INT4_CHUNK_GROUPS", 1)
    packed = {"USE_DOT": False, "BLOCK_M": 1, "BLOCK_N": 128, "NUM_STAGES": 3, "num_warps": 4,
              "CHUNK_GROUPS": 1}  # <= 2112 programs  # fmt: skip
    assert _int4_config(1, 6144, 4096, 128, cpu, packed_bf16=True) == {**packed, "split_k": 8}  # 48 blocks
    assert _int4_config(1, 28672, 4096, 128, cpu, packed_bf16=True) == {**packed, "split_k": 8}  # 224 blocks


def test_int4_zero_points_span_each_groups_range_within_half_a_step():
    torch.manual_seed(8)
    w = torch.randn(12, 256) + 0.7  # off-centre groups, where a zero point pays
    w[2, :64] = 0.0  # an all-zero group
    packed, scales, zeros = int_weight.quantize_int4(w, 64, zero_point=True)
    nibbles = int_weight.unpack_int4(packed).long() + 8
    assert nibbles.min() >= 0 and nibbles.max() <= 15 and ((zeros >= 0) & (zeros <= 15)).all()
    assert torch.equal(zeros, zeros.round())
    error = (int_weight.dequantize_int4(packed, scales, zeros=zeros) - w).abs()
    assert (error <= scales.repeat_interleave(64, 1) / 2 + 1e-6).all()
    assert (int_weight.dequantize_int4(packed, scales, zeros=zeros)[2, :64] == 0).all()
    symmetric = int_weight.quantize_int4(w, 64)
    sym_error = (int_weight.dequantize_int4(*symmetric) - w).pow(2).mean()
    assert error.pow(2).mean() < sym_error  # off-centre groups: the zero point is the better fit


def test_zero_point_config_and_model(tmp_path):
    with pytest.raises(ValueError, match="zero_point .* applies to int4 only"):
        QuantConfig("int8", zero_point=True)
    tiny = _tiny_llama(tmp_path)
    model = fastllm.optimize(tiny(), quantization=QuantConfig("int4", group_size=64, zero_point=True))
    assert set(fastllm.explain(model).graph.quantized_layers.values()) == {"int4-g64-zp"}
    with torch.no_grad():
        expected, got = tiny()(IDS).logits, model(IDS).logits
    assert _sqnr(expected, got) >= 12.0


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_layers_float_weights_are_released_and_hfs_forward_runs_them_quantized(tiny, scheme):
    """Once the step is compiled the float weights of quantized layers are gone (a quantized model must not hold
    them beside the quantized ones) and Hugging Face's own forward, which fastllm hands some calls to, runs the same
    quantized modules: its logits equal the compiled step's."""
    model = tiny()
    float_bytes = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    fastllm.optimize(model, quantization=scheme)
    layers = [n for n in fastllm.explain(model).graph.quantized_layers]  # "…q_proj+…k_proj+…v_proj", ...
    modules = [part for layer in layers for part in layer.split("+")]
    assert len(modules) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for name in modules:
        assert model.get_submodule(name).weight.numel() == 0
    assert model.lm_head.weight.numel() > 0 and model.model.embed_tokens.weight.numel() > 0
    released = sum(float_bytes[name + ".weight"] for name in modules)
    assert model._fastllm_state.float_bytes_released == released
    with torch.no_grad():
        compiled = model(IDS).logits
        eager = model(IDS, use_cache=True).logits  # use_cache: HF's forward (the runtime keeps no HF cache)
    assert fastllm.explain(model).forward_calls == {"compiled": 1, "eager": 1}
    # The same quantized weights and reference math; the compiled step's merged QKV/gate-up GEMMs give the same
    # sums (one output column at a time), its attention another summation order (a few ulps in fp32).
    torch.testing.assert_close(eager, compiled, rtol=1e-5, atol=1e-5)
    assert _sqnr(tiny()(IDS).logits.detach(), eager) >= 12.0  # and it is the quantized model, not something else
    assert f"their float weights let go: {released / 2**20:,.0f} MiB" in str(fastllm.explain(model))
    with pytest.warns(RuntimeWarning, match="stays quantized"):
        fastllm.release(model)
    with torch.no_grad():  # Hugging Face's forward again, on the quantized modules
        torch.testing.assert_close(model(IDS).logits, eager, rtol=0, atol=0)


def test_a_weight_tied_to_the_embedding_keeps_its_float_copy(tmp_path):
    model = _tiny_llama(tmp_path, tie_word_embeddings=True)()
    fastllm.optimize(model, quantization=QuantConfig("int8", exclude=()))
    assert fastllm.explain(model).graph.quantized_layers["model.embed_tokens+lm_head"] == "int8"
    assert model.lm_head.weight.numel() > 0  # the embedding reads it
    with torch.no_grad():
        model(IDS, use_cache=True)  # HF's forward: the embedding still has its weight
    assert model.model.layers[0].mlp.down_proj.weight.numel() == 0
