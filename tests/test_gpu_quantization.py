"""Quantization on a GPU: FP8 GEMM (FP8 tensor cores) against its reference at decode and prefill shapes, the
weight-only linears on CUDA, whole models quantized (logits against bf16; greedy decode with CUDA graphs)."""

from __future__ import annotations

import gc

import pytest
import torch
import transformers as T

import fastllm
from fastllm import kernels
from fastllm.quant import fp8, int_weight, load_prequantized

pytestmark = pytest.mark.gpu


def _sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    reference, approx = reference.float(), approx.float()
    return float(10 * torch.log10(reference.pow(2).mean() / (reference - approx).pow(2).mean()))


def _has_fp8() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


# (M, N, K): decode (1, 7 rows), prefill (2048 rows) at Llama-3.1-8B's projections, and odd small ones.
SHAPES = [(1, 4096, 4096), (7, 6144, 4096), (1, 28672, 4096), (16, 4096, 14336), (2048, 14336, 4096),
          (3, 48, 64), (33, 80, 128)]


@pytest.mark.skipif(not _has_fp8(), reason="needs FP8 tensor cores (compute capability 8.9+)")
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_gemm_against_its_reference(shape):
    m, n, k = shape
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    qweight, scale = fp8.quantize_weight(w)
    got = kernels.fp8_linear(x, qweight, scale, b)
    expected = kernels.fp8_linear_ref(x, qweight, scale, b)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert _sqnr(expected, got) >= 28.0  # the bar; only accumulation order and bf16 output differ


@pytest.mark.skipif(not _has_fp8(), reason="needs the float8 type in Triton (compute capability 8.9+)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 4096), (7, 14336), (33, 80), (5, 1), (3, 6145)])
def test_fp8_row_quantization_kernel_is_bit_exact_against_the_reference(shape, dtype):
    torch.manual_seed(3)
    x = torch.randn(*shape, device="cuda", dtype=dtype) * 3
    x[0] = 0  # an all-zero row: scale 1
    q, scale = kernels.quant_linear.quantize_rows_fp8(x)
    q_ref, scale_ref = fp8.quantize_rows(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("rows", [1, 5, 16, 64])  # up to 16: the Triton kernels reading quantized weights
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_weight_only_linears_on_cuda_against_their_references(scheme, rows):
    torch.manual_seed(1)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    if scheme == "int8":
        tensors, linear, ref = int_weight.quantize_int8(w), kernels.int8_linear, kernels.int8_linear_ref
    else:
        tensors, linear, ref = int_weight.quantize_int4(w, 128), kernels.int4_linear, kernels.int4_linear_ref
    assert _sqnr(ref(x, *tensors), linear(x, *tensors)) >= 40.0  # only bf16 rounding (weight or output) differs


# int4 at Llama-3.1-8B's projections (N x K): qkv, gate_up (no split-K), down (split-K, 112 groups of 128).
INT4_SHAPES = [(6144, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("group", [128, 32])
@pytest.mark.parametrize("rows", [1, 8, 300])  # the decode kernel's broadcast and dot forms, and the GEMM
@pytest.mark.parametrize("shape", INT4_SHAPES)
def test_int4_kernels_at_llama_shapes_against_the_reference(shape, rows, group, zero_point):
    """bf16 x against the reference's exact dequantization in fp32, each rounded once to bf16. The decode kernel's dot
    form multiplies x by the exact codes (the offset taken off again in fp32) and applies each group's scale in
    fp32; its one- and two-row form multiplies x by (code - zero) / 16 (exact for the symmetric zero, a zero point
    rounded once in 1 + zero / 16) and the group's sum by 16 scale. Their fp32 sums differ from the reference's in
    the last bits, their bf16 roundings rarely (seen 78-91 dB at M = 8 on an H200, more at M = 1). The GEMM rounds
    each dequantized weight to bf16 (relative error <= 2^-9, independent across K) before tl.dot: seen 52 dB. 40 dB
    leaves 12 dB of margin below that and still fails a wrong group, zero point or scale (< 20 dB)."""
    n, k = shape
    torch.manual_seed(2)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * k**-0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    packed, scales, *zeros = int_weight.quantize_int4(w, group, zero_point=zero_point)
    zeros = zeros[0] if zeros else None
    got = kernels.int4_linear(x, packed, scales, b, zeros)
    expected = kernels.int4_linear_ref(x, packed, scales, b, zeros)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert _sqnr(expected, got) >= 40.0


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_int4_decode_kernel_reading_bytes_gives_the_bits_of_reading_words(rows):
    """A packed weight at an odd byte offset is read byte by byte (no int32 view of it exists). The same nibbles as
    the words of an aligned copy, though in another register layout, so summed in another order (the interpreter's
    test finds the same bits): both against the reference at this file's 40 dB."""
    from fastllm.kernels import quant_linear

    torch.manual_seed(3)
    packed, scales = int_weight.quantize_int4(torch.randn(4096, 4096, device="cuda") * 0.02, 128)
    shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")[1:].view(packed.shape)
    shifted.copy_(packed)
    assert quant_linear._int4_words(shifted) is None
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    expected = kernels.int4_linear_ref(x, packed, scales)
    assert _sqnr(expected, kernels.int4_linear(x, shifted, scales)) >= 40.0
    assert _sqnr(expected, kernels.int4_linear(x, packed, scales)) >= 40.0


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("shape", [(300, 1024), (4096, 4096), (4096, 14336)])
def test_int4_packed_bf16_loop_against_the_reference_and_the_fp32_loop(shape, rows, group, zero_point, monkeypatch):
    """INT4_PACKED_BF16 (one and two bf16 rows): each product (nibble - zero) * x, and the sum of a word's eight, is
    rounded to bf16 (relative error <= 2^-9 each, independent across K) before the fp32 sums: like the GEMM's bf16
    weights, ~50 dB against the reference, so this file's 40 dB; the fp32 loop on the same inputs (40 dB apart at
    most by the same argument). N = 300 leaves a partial block; x scaled by 1e4 checks that nothing overflows (bf16
    has fp32's range; fp16 products would not)."""
    from fastllm.kernels import quant_linear

    n, k = shape
    torch.manual_seed(11)
    packed, scales, *zeros = int_weight.quantize_int4(torch.randn(n, k, device="cuda") * 0.02, group,
                                                      zero_point=zero_point)  # fmt: skip
    zeros = zeros[0] if zeros else None
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for magnitude in (1.0, 1e4):
        x = (torch.randn(rows, k, device="cuda") * magnitude).to(torch.bfloat16)
        expected = kernels.int4_linear_ref(x, packed, scales, b * magnitude, zeros)
        monkeypatch.setattr(quant_linear, "INT4_PACKED_BF16", True)
        got = kernels.int4_linear(x, packed, scales, b * magnitude, zeros)
        monkeypatch.setattr(quant_linear, "INT4_PACKED_BF16", False)
        fp32_loop = kernels.int4_linear(x, packed, scales, b * magnitude, zeros)
        assert torch.isfinite(got).all()
        assert _sqnr(expected, got) >= 40.0
        assert _sqnr(fp32_loop, got) >= 40.0
        assert not torch.equal(got, fp32_loop)  # the packed loop ran (its roundings differ from fp32's)


@pytest.mark.parametrize("chunk_groups", [2, 4, 8])
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("shape,group", [((300, 1024), 64), ((4096, 4096), 128), ((4096, 14336), 128),
                                         ((256, 1152), 128)])  # fmt: skip
def test_int4_packed_loop_in_chunks_of_several_groups(shape, group, rows, zero_point, chunk_groups, monkeypatch):
    """INT4_CHUNK_GROUPS: a chunk of the packed loop holds several groups of each row, each word scaled by its own
    group's scale and offset by its own zero. The same products as one group a chunk, summed in another order: against
    the reference and the one-group loop at this file's 40 dB (the packed loop's own bound), with its K splits summed
    by the kernel (split counters, as the quantize pass gives them), the counters left zero. One row takes
    INT4_CHUNK_GROUPS, two rows INT4_TWO_ROW_CHUNK_GROUPS (both set here). 1152 columns are 9 groups of 128, which no
    chunk of 2, 4 or 8 divides: the kernel then takes one group a chunk (the same bits as one group a chunk)."""
    from fastllm.kernels import quant_linear

    n, k = shape
    torch.manual_seed(15)
    monkeypatch.setattr(quant_linear, "INT4_CHUNK_GROUPS", 1)
    monkeypatch.setattr(quant_linear, "INT4_TWO_ROW_CHUNK_GROUPS", 1)
    packed, scales, *zeros = int_weight.quantize_int4(torch.randn(n, k, device="cuda") * 0.02, group,
                                                      zero_point=zero_point)  # fmt: skip
    zeros = zeros[0] if zeros else None
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    counters = torch.zeros(-(-n // 16), dtype=torch.int32, device="cuda")
    one_group = kernels.int4_linear(x, packed, scales, b, zeros, split_counters=counters)
    monkeypatch.setattr(quant_linear, "INT4_CHUNK_GROUPS", chunk_groups)
    monkeypatch.setattr(quant_linear, "INT4_TWO_ROW_CHUNK_GROUPS", chunk_groups)
    cfg = quant_linear._int4_config(rows, n, k, group, x.device, packed_bf16=True)
    assert cfg["CHUNK_GROUPS"] == (chunk_groups if (k // group) % chunk_groups == 0 else 1)
    got = kernels.int4_linear(x, packed, scales, b, zeros, split_counters=counters)
    assert torch.isfinite(got).all()
    assert _sqnr(kernels.int4_linear_ref(x, packed, scales, b, zeros), got) >= 40.0
    assert _sqnr(one_group, got) >= 40.0
    if cfg["CHUNK_GROUPS"] == 1:
        assert torch.equal(got, one_group)
    for split_k in (1, 3):  # no split; splits of whole chunks (possibly fewer than asked)
        split = quant_linear._int4_gemv(x, packed, scales, b, zeros, split_k=split_k, split_counters=counters)
        assert _sqnr(one_group, split) >= 40.0
    assert torch.count_nonzero(counters).item() == 0
    if rows == 2 and (k // group) % chunk_groups == 0:
        # Two rows in chunks of several groups at 16 rows a block (narrower than the default's)
        key = (rows, n, k, group, x.device, True, chunk_groups)
        monkeypatch.setitem(quant_linear._INT4_CONFIGS, key, {**cfg, "BLOCK_N": 16, "CHUNK_GROUPS": chunk_groups})
        two_rows = kernels.int4_linear(x, packed, scales, b, zeros, split_counters=counters)
        assert _sqnr(one_group, two_rows) >= 40.0
        assert torch.count_nonzero(counters).item() == 0


@pytest.mark.parametrize("rows", [1, 2])
def test_int4_packed_bf16_loop_takes_gptq_zero_points_up_to_16(rows, monkeypatch):
    """A GPTQ checkpoint stores zero - 1 in a nibble, so its zero points reach 16 (quant/checkpoints.py): 128 + 16 and
    every nibble - zero in -16..15 are still exact in bf16. Random codes with zeros 0, 1, 8, 15 and 16: against the
    reference at this file's 40 dB, and against the fp32 loop."""
    from fastllm.kernels import quant_linear

    torch.manual_seed(14)
    n, k, group = 512, 4096, 128
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    scales = torch.rand(n, k // group, device="cuda") * 0.01 + 1e-3
    zeros = torch.tensor([0.0, 1.0, 8.0, 15.0, 16.0], device="cuda")[torch.randint(0, 5, (n, k // group))]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    expected = kernels.int4_linear_ref(x, packed, scales, None, zeros)
    got = kernels.int4_linear(x, packed, scales, None, zeros)
    monkeypatch.setattr(quant_linear, "INT4_PACKED_BF16", False)
    assert _sqnr(expected, got) >= 40.0
    assert _sqnr(kernels.int4_linear(x, packed, scales, None, zeros), got) >= 40.0


def test_int4_packed_bf16_loop_leaves_rows_at_an_odd_address_to_the_fp32_loop(monkeypatch):
    """The packed loop reads x as int32 words: a row starting at an odd bf16 element (a contiguous view, so no copy is
    made) is not 4-byte aligned and must take the fp32 loop: its bits, not a misaligned-address fault."""
    from fastllm.kernels import quant_linear

    torch.manual_seed(12)
    packed, scales = int_weight.quantize_int4(torch.randn(4096, 4096, device="cuda") * 0.02, 128)
    x = torch.randn(4097, device="cuda", dtype=torch.bfloat16)[1:].view(1, 4096)
    assert x.is_contiguous() and x.data_ptr() % 4 == 2
    got = kernels.int4_linear(x, packed, scales)
    monkeypatch.setattr(quant_linear, "INT4_PACKED_BF16", False)
    assert torch.equal(got, kernels.int4_linear(x, packed, scales))
    monkeypatch.setattr(quant_linear, "INT4_PACKED_BF16", True)
    assert not torch.equal(kernels.int4_linear(x.clone(), packed, scales), got)  # aligned: the packed loop


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("shape", [(300, 1024), (28672, 4096)])
def test_int4_dequantize_kernel_gives_dequantize_int4s_bits_in_bf16(shape, zero_point):
    """int4 prefill from INT4_DEQUANT_MIN_ROWS rows: the kernel's weight is dequantize_int4's, bit for bit (the same
    fp32 operations, one rounding to bf16), so the product is cuBLAS's over the weight the reference dequantizes."""
    from fastllm.kernels import quant_linear

    torch.manual_seed(13)
    packed, scales, *zeros = int_weight.quantize_int4(torch.randn(*shape, device="cuda") * 0.02, 128,
                                                      zero_point=zero_point)  # fmt: skip
    zeros = zeros[0] if zeros else None
    got = quant_linear._int4_dequantize(packed, scales, zeros, torch.bfloat16)
    assert torch.equal(got, int_weight.dequantize_int4(packed, scales, torch.bfloat16, zeros))
    x = torch.randn(quant_linear.INT4_DEQUANT_MIN_ROWS, shape[1], device="cuda", dtype=torch.bfloat16)
    assert torch.equal(kernels.int4_linear(x, packed, scales, None, zeros), torch.nn.functional.linear(x, got))


def test_int4_decode_kernel_with_split_k_replays_in_a_cuda_graph():
    """4096 x 4096 at M = 1 splits K (64 blocks of 64 outputs for 132 SMs): the workspace is allocated inside the
    capture, from the graph's pool, and each replay reads the inputs' current values."""
    torch.manual_seed(3)
    packed, scales = int_weight.quantize_int4(torch.randn(4096, 4096, device="cuda") * 0.02, 128)
    assert kernels.quant_linear._int4_config(1, 4096, 4096, 128, torch.device("cuda"))["split_k"] > 1
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    kernels.int4_linear(x, packed, scales)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernels.int4_linear(x, packed, scales)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(y, kernels.int4_linear(x, packed, scales))  # deterministic: same splits, same order


@pytest.mark.skipif(not _has_fp8(), reason="needs the float8 type in Triton (compute capability 8.9+)")
@pytest.mark.parametrize("rows", [17, 300, 2048])
@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 14336)])
def test_block_scaled_fp8_gemm_past_16_rows_on_cuda(shape, rows, monkeypatch):
    """BLOCK_FP8_GEMM: the tiles dequantized in the K loop into bf16, as the weight cuBLAS read before: the same
    products, summed in another order (SQNR against the reference's fp32 math as the int4 GEMM's test argues)."""
    from fastllm.kernels import quant_linear

    n, k = shape
    torch.manual_seed(10)
    q, scale_inv = fp8.quantize_blocks(torch.randn(n, k, device="cuda") * k**-0.5)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(quant_linear, "BLOCK_FP8_GEMM", True)
    monkeypatch.setattr(quant_linear, "BLOCK_FP8_GEMM_MAX_ROWS", 2048)  # the GEMM at every size here, not the default's
    got = kernels.fp8_linear(x, q, scale_inv, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert _sqnr(kernels.fp8_linear_ref(x, q, scale_inv, b), got) >= 40.0


@pytest.mark.skipif(not _has_fp8(), reason="needs the float8 type in Triton (compute capability 8.9+)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,block", [((6144, 4096), (128, 128)), ((300, 384), (100, 128)), ((72, 96), (8, 48))])
def test_block_fp8_dequantize_kernel_on_cuda(shape, block, dtype, monkeypatch):
    """kernels/fp8_block_dequantize.py on the GPU: fp8.dequantize_blocks' bits in bf16 too (the GPU rounds fp32 to
    bf16 to nearest even, as PyTorch; the interpreter truncates); and fp8_linear past BLOCK_FP8_GEMM_MAX_ROWS with
    BLOCK_FP8_DEQUANT_KERNEL on hands cuBLAS that weight: the unfused path's result bit for bit."""
    from fastllm.kernels import quant_linear
    from fastllm.kernels.fp8_block_dequantize import dequantize_blocks_kernel

    torch.manual_seed(24)
    n, k = shape
    q = (torch.randn(n, k, device="cuda") * 100).clamp(-448, 448).to(fp8.FP8)
    scale_inv = torch.rand(n // block[0], k // block[1], device="cuda") * 1e-2 + 1e-4
    assert torch.equal(dequantize_blocks_kernel(q, scale_inv, dtype), fp8.dequantize_blocks(q, scale_inv, dtype))
    x = torch.randn(40, k, device="cuda", dtype=dtype)
    monkeypatch.setattr(quant_linear, "BLOCK_FP8_GEMM_MAX_ROWS", 16)
    monkeypatch.setattr(quant_linear, "BLOCK_FP8_DEQUANT_KERNEL", False)  # PyTorch's dequantization
    unfused = kernels.fp8_linear(x, q, scale_inv)
    monkeypatch.setattr(quant_linear, "BLOCK_FP8_DEQUANT_KERNEL", True)
    assert torch.equal(kernels.fp8_linear(x, q, scale_inv), unfused)


@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("shape", [(4096, 4096), (6144, 4096), (4096, 14336), (300, 1024)])
def test_int4_decode_kernel_summing_its_own_splits_on_cuda(shape, rows, monkeypatch):
    """REDUCE_SPLITS_IN_KERNEL: the last program of each output block sums the other programs' partials (written on
    other SMs). The same sums in the same order as the reduce kernel: bit for bit, on every one of 200 launches (a
    partial read before its writer's arrival was ordered would show as a difference), counters left zero."""
    from fastllm.kernels import quant_linear

    n, k = shape
    torch.manual_seed(7)
    packed, scales, zeros = int_weight.quantize_int4(torch.randn(n, k, device="cuda") * 0.02, 128, zero_point=True)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    counters = torch.zeros(-(-n // 16), dtype=torch.int32, device="cuda")
    expected = quant_linear._int4_gemv(x, packed, scales, b, zeros, split_k=4)
    monkeypatch.setattr(quant_linear, "REDUCE_SPLITS_IN_KERNEL", True)
    got = torch.stack([quant_linear._int4_gemv(x, packed, scales, b, zeros, split_k=4, split_counters=counters)
                       for _ in range(200)])  # fmt: skip
    assert torch.equal(got, expected.expand_as(got))
    assert torch.count_nonzero(counters).item() == 0


def test_int4_model_with_splits_summed_in_the_kernel_decodes_the_same_tokens(monkeypatch):
    """The quantize pass hands each int4 linear the graph's split counters; with REDUCE_SPLITS_IN_KERNEL on, greedy
    decode through CUDA graphs gives the same tokens as with the reduce kernel (the same sums)."""
    from fastllm.kernels import quant_linear

    ids = torch.tensor([[1, 17, 29, 400, 5, 77]], device="cuda")
    tokens = []
    for in_kernel in (False, True):
        monkeypatch.setattr(quant_linear, "REDUCE_SPLITS_IN_KERNEL", in_kernel)
        model = fastllm.optimize(_llama(), quantization="int4", max_num_seqs=4)
        tokens.append(model.generate(ids, max_new_tokens=24, do_sample=False))
        del model
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.skipif(not _has_fp8(), reason="needs the float8 type in Triton (compute capability 8.9+)")
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_fp8_decode_path_reads_fp8_weights_like_the_reference(rows):
    torch.manual_seed(4)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    q, scale = fp8.quantize_weight(torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
    assert _sqnr(kernels.fp8_linear_ref(x, q, scale), kernels.fp8_linear(x, q, scale)) >= 40.0


def _llama(dtype=torch.bfloat16):
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    return T.AutoModelForCausalLM.from_config(config).to("cuda", dtype).eval()


@pytest.mark.skipif(not _has_fp8(), reason="needs FP8 tensor cores (compute capability 8.9+)")
@pytest.mark.xfail(strict=True, reason="the >= 25 dB gate is not met: 15.2 dB on an H200 (2026-11-30), 15.7 dB with "
                   "the references on the CPU. Each FP8 linear sits at e4m3's ~28.5 dB (checked layer by layer); this "
                   "random model amplifies linear noise by ~13 dB (int8 weight-only: 41 dB a linear, 28.4 dB logits). "
                   "Strict: the test reports when a better activation scaling passes the gate.")
def test_fp8_model_logits_against_bf16():
    """Whole-model FP8 (W8A8, every linear but the LM head) against the same model in bf16: SQNR >= 25 dB."""
    torch.manual_seed(2)
    ids = torch.randint(0, 32000, (1, 256), device="cuda")
    reference = _llama()
    with torch.no_grad():
        expected = reference(ids).logits
    del reference
    model = fastllm.optimize(_llama(), quantization="fp8", max_num_seqs=8)
    with torch.no_grad():
        logits = model(ids).logits
    layers = fastllm.explain(model).graph.quantized_layers
    assert len(layers) == 16 and set(layers.values()) == {"fp8"}
    sqnr = _sqnr(expected, logits)
    print(f"fp8 whole-model logits SQNR {sqnr:.1f} dB")
    assert sqnr >= 25.0


@pytest.mark.parametrize("scheme", [pytest.param("fp8", marks=pytest.mark.skipif(not _has_fp8(),
                                                                                  reason="needs FP8 tensor cores")),
                                    "int8", "int4"])
def test_quantized_greedy_decode_with_cuda_graphs_equals_the_compiled_steps_own_argmax(scheme):
    """Decode steps replay CUDA graphs; each greedy token must be the argmax of the same quantized model's logits
    for the sequence so far (teacher-forced through model(...), which runs the same compiled step)."""
    # fp32 activations for every scheme: the steps compared differ in batch shape, so they sum in different orders;
    # in fp32 that moves logits by ~1e-6, far inside the 1e-3 margin below (in bf16 it does not: one near-tie flipped
    # on an H200). fp8 runs its weight-only path here, as bf16 decode does (<= 16 rows).
    model = fastllm.optimize(_llama(torch.float32), quantization=scheme, max_num_seqs=8)
    # 4 + 10 tokens: teacher forcing runs 13 rows, like decode within fp8's weight-only size (<= 16 rows)
    ids = torch.tensor([[1, 17, 29, 400]], device="cuda")
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        logits = model(out).logits[0, ids.shape[1] - 1:-1]
    top2 = logits.float().topk(2, dim=-1)
    clear = (top2.values[:, 0] - top2.values[:, 1]) > 1e-3 * top2.values[:, 0].abs().clamp_min(1)
    new = out[0, ids.shape[1]:]
    # Where the top two logits are not tied (batch shapes differ between decode and teacher forcing)
    assert torch.equal(new[clear], top2.indices[clear, 0]) and clear.sum() >= 5


@pytest.mark.parametrize("scheme", [pytest.param("fp8", marks=pytest.mark.skipif(not _has_fp8(),
                                                                                  reason="needs FP8 tensor cores")),
                                    "int8"])
def test_quantized_down_projection_takes_the_activation_in_with_cuda_graphs(scheme, monkeypatch):
    """decode_fusion.FUSE_QUANTIZED (off by default: slower where measured) on FP8 / int8 weights (bf16): batch-1
    decode replays the 1-row graph whose down projections read SiLU * up inside the GEMM. At one row the fused GEMM
    runs the unfused one's launch settings, so greedy tokens equal the default graph's, token for token."""
    from fastllm.passes import decode_fusion

    ids = torch.tensor([[1, 17, 29, 400, 5, 77]], device="cuda")
    tokens = []
    for fuse in (False, True):
        monkeypatch.setattr(decode_fusion, "FUSE_QUANTIZED", fuse)
        model = fastllm.optimize(_llama(), quantization=scheme, max_num_seqs=4)
        tokens.append(model.generate(ids, max_new_tokens=24, do_sample=False))
        assert ("fused_linear" in fastllm.explain(model).graph.fused_ops) == fuse
        del model
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.skipif(not _has_fp8(), reason="the float8 type in Triton needs compute capability 8.9+")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.37, 0.011)])  # unscaled, and a checkpoint's k_scale / v_scale
def test_fp8_kv_write_kernels_round_like_the_reference(dtype, scales):
    """The hardware's fp32/bf16 -> e4m3 rounding (saturating) against the reference's, on values that need rounding
    (the CPU tests can only use representable ones: the interpreter rounds some wrongly)."""
    from fastllm.kernels import write_kv_cache, write_kv_cache_ref

    torch.manual_seed(5)
    k = torch.randn(300, 8, 128, device="cuda", dtype=dtype) * 60
    v = torch.randn(300, 8, 128, device="cuda", dtype=dtype)
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    caches = [torch.zeros(64, 16, 8, 128, device="cuda", dtype=torch.float8_e4m3fn) for _ in range(4)]
    write_kv_cache(k, v, caches[0], caches[1], slots, k_scale=scales[0], v_scale=scales[1])
    write_kv_cache_ref(k, v, caches[2], caches[3], slots, k_scale=scales[0], v_scale=scales[1])
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))


@pytest.mark.skipif(not _has_fp8(), reason="needs compute capability 8.9+")
@pytest.mark.xfail(strict=True, reason="on this random-weight model 91.6% (H200, 2026-11-30): its next-token "
                   "distributions are nearly flat, so e4m3's 3-bit mantissa flips near-ties. The gate holds on the "
                   "real demo model: 99.8% at 8192 tokens (tests/test_quant_quality.py, the same kernels' "
                   "references). Strict: it reports if this model ever passes.")
def test_fp8_kv_cache_at_8k_context_keeps_the_next_token():
    """Teacher-forced over an 8k-token sequence, prefilled in chunks of 2048 (each chunk attends to the earlier ones
    through the cache): the FP8 KV cache's next-token choice equals the bf16 cache's at >= 99% of positions (FP8
    caches elsewhere have garbled long outputs: this guards against it)."""
    torch.manual_seed(6)
    config = T.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=32000, max_position_embeddings=8192 + 64)
    ids = torch.randint(0, 32000, (1, 8192), device="cuda")
    choices = []
    for quantization in (None, "fp8_kv"):
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16).eval()
        fastllm.optimize(model, quantization=quantization, max_num_seqs=8, max_num_batched_tokens=2048)
        with torch.no_grad():
            choices.append(model(ids).logits[0].argmax(-1))
        del model
        torch.cuda.empty_cache()
    agreement = (choices[0] == choices[1]).float().mean().item()
    print(f"fp8 KV cache top-1 agreement at 8k: {agreement:.4f}")
    assert agreement >= 0.99


def test_a_quantized_model_lets_its_float_weights_go_on_the_gpu():
    """Compiling the quantized step frees the bf16 weights it replaced: the memory it takes is the 1-byte weights
    less the bf16 ones (here -180 MB for 4 layers), where keeping both would add the 1-byte ones (+180 MB)."""
    model = _llama(torch.bfloat16)
    fastllm.optimize(model, quantization=_weight_scheme(), max_num_seqs=8, warmup=False)
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model._fastllm_state.compile()
    gc.collect()
    after = torch.cuda.memory_allocated()
    released = model._fastllm_state.float_bytes_released
    assert released == 4 * 2 * (2048 * (2048 + 2 * 512) + 2048 * 2048 + 3 * 2048 * 5632)  # every projection, bf16
    # Releasing: -released / 2 (1-byte weights in, bf16 out); keeping both: +released / 2. The midway bound leaves
    # room for what a first compile in a process also allocates (cuBLAS workspaces: -142 MB measured then, on an
    # H200 2026-11-30, against -180 MB after other tests).
    assert after - before < -released // 4, (after - before, released)
    assert model.model.layers[0].mlp.down_proj.weight.numel() == 0


def test_hf_forward_on_a_quantized_model_gives_the_compiled_steps_logits_on_the_gpu():
    """Once the float weights are gone, HF's own forward (the calls fastllm hands to it) runs the quantized modules:
    its logits are the compiled step's, and not the float model's. 12 tokens (FP8's weight-only decode path) in fp32:
    with activations quantized to e4m3, the two paths' different roundings (merged vs separate GEMMs, Triton's TF32
    attention vs HF's) flip activation roundings downstream: 20 dB in bf16 and 27.7 dB in fp32 over 40 tokens on an
    H200 (2026-11-30), about the distance to the float model, so such a check could not tell the paths apart."""
    model = _llama(torch.float32)
    ids = torch.randint(0, 32000, (1, 12), device="cuda")
    with torch.no_grad():
        float_logits = model(ids).logits
    fastllm.optimize(model, quantization=_weight_scheme(), max_num_seqs=8)
    with torch.no_grad():
        compiled = model(ids).logits
        eager = model(ids, use_cache=True).logits  # HF's forward on the quantized modules
    assert model.model.layers[0].mlp.down_proj.weight.numel() == 0
    print(f"compiled vs HF forward {_sqnr(compiled, eager):.1f} dB, "
          f"vs the float model {_sqnr(compiled, float_logits):.1f}")
    # The same quantized weights and launchers; merged vs separate GEMMs and the attention kernels differ in their
    # fp32 roundings only
    assert _sqnr(compiled, eager) >= 35.0
    assert _sqnr(compiled, float_logits) < _sqnr(compiled, eager) - 10


def _weight_scheme() -> str:
    return "fp8" if _has_fp8() else "int8"


@pytest.mark.skipif(not _has_fp8(), reason="the float8 type in Triton needs compute capability 8.9+")
@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n,k,block", [(4096, 14336, (128, 128)), (6144, 4096, (128, 128)), (96, 192, (32, 64))])
def test_block_scaled_fp8_decode_gemm_against_its_reference(rows, n, k, block):
    """Block-wise FP8 weights read by the skinny GEMM (bf16 x, decode sizes) against fp8_block_linear_ref: the
    output's bf16 rounding (and, in the tl.dot form past 4 rows, each dequantized weight's) leaves >= 40 dB; a
    wrong block scale is ~0 dB."""
    torch.manual_seed(9)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    q = (torch.randn(n, k, device="cuda") * 60).clamp(-448, 448).to(fp8.FP8)
    scale_inv = torch.rand(n // block[0], k // block[1], device="cuda") * 1e-3 + 1e-4
    y = kernels.fp8_linear(x, q, scale_inv)
    assert _sqnr(kernels.fp8_linear_ref(x, q, scale_inv), y) >= 40.0


@pytest.mark.skipif(not _has_fp8(), reason="needs compute capability 8.9+")
def test_block_wise_fp8_and_kv_cache_scales_from_checkpoints_on_the_gpu(tmp_path):
    """transformers' block-wise FP8 checkpoint on CUDA (8 rows: the skinny GEMM reads its blocks) gives the
    dequantized float model's logits; compressed-tensors' KV cache scales run the scaled kernels: a power-of-two
    scale keeps the unscaled FP8 cache's logits, a wild one costs precision (CPU references:
    tests/test_quant_checkpoints.py). Its 8 tokens and fp32 activations, as there: over 40 random tokens the
    subnormals a power-of-two scale moves put the two caches ~30 dB apart on the CPU and on an H200 alike
    (2026-11-30)."""
    from tests.test_quant_checkpoints import (
        IDS,
        _float_model,
        _with_kv_scales,
        _write_block_fp8_checkpoint,
        _write_fp8_checkpoint,
    )

    written = _write_block_fp8_checkpoint(_float_model(tmp_path / "block"), tmp_path / "block")
    reference = _float_model(tmp_path / "reference")
    reference.load_state_dict({**reference.state_dict(), **{f"{n}.weight": w for n, w in written.items()}})
    reference = reference.to("cuda", torch.float32)
    ids = IDS.to("cuda")
    with pytest.warns(RuntimeWarning, match="block-wise FP8"):
        block = fastllm.optimize(load_prequantized(str(tmp_path / "block"), dtype=torch.float32, device="cuda"))
    with torch.no_grad():
        assert _sqnr(reference(ids).logits, block(ids).logits) >= 30.0
    logits = {}
    for name, scales in (("unscaled", None), ("half", (0.5, 0.5)), ("wild", (300.0, 300.0))):
        path = tmp_path / name
        _write_fp8_checkpoint(_float_model(path), path)
        if scales is None:
            model = fastllm.optimize(load_prequantized(str(path), dtype=torch.float32, device="cuda"),
                                     quantization=fastllm.QuantConfig(weights=None, kv_cache="fp8"))
        else:
            _with_kv_scales(path, *scales)
            model = fastllm.optimize(load_prequantized(str(path), dtype=torch.float32, device="cuda"))
        with torch.no_grad():
            logits[name] = model(ids).logits
    assert _sqnr(logits["unscaled"], logits["half"]) >= 35.0
    assert _sqnr(logits["unscaled"], logits["wild"]) < _sqnr(logits["unscaled"], logits["half"]) - 10


def test_act_order_gptq_checkpoint_on_the_gpu(tmp_path):
    """An act-order GPTQ checkpoint on CUDA: the quantized step gathers x into each layer's channel order (inside the
    decode CUDA graphs too) and gives the logits of Hugging Face's forward on the checkpoint's dequantized weights
    (CPU twin: tests/test_quant_checkpoints.py; a wrong order measured -2.6 dB there). fp32 activations: the int4
    kernels and HF's matmul then differ by fp32 (or TF32) rounding alone, far above a wrong order and far below 40 dB
    of agreement."""
    from tests.test_quant_checkpoints import _float_model, _write_gptq_checkpoint

    _write_gptq_checkpoint(_float_model(tmp_path), tmp_path, group_size=32, act_order=True)
    reference = load_prequantized(str(tmp_path), dtype=torch.float32, device="cuda")
    model = fastllm.optimize(load_prequantized(str(tmp_path), dtype=torch.float32, device="cuda"), max_num_seqs=4)
    assert set(fastllm.explain(model).graph.quantized_layers.values()) == {"int4-g32"}
    ids = torch.tensor([[1, 17, 29, 40]], device="cuda")
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        expected = reference(out).logits
        assert _sqnr(expected, model(out).logits) >= 40.0
    logits = expected[0, ids.shape[1] - 1:-1]
    top2 = logits.topk(2, dim=-1)
    clear = (top2.values[:, 0] - top2.values[:, 1]) > 1e-3 * top2.values[:, 0].abs().clamp_min(1)
    assert torch.equal(out[0, ids.shape[1]:][clear], top2.indices[clear, 0]) and clear.sum() >= 5


@pytest.mark.skipif(not _has_fp8(), reason="the float8 type in Triton needs compute capability 8.9+")
def test_auto_kv_scales_on_the_gpu(tmp_path):
    """kv_scales="auto" on CUDA: the calibration prefill runs eagerly before any graph is captured, and the decode
    graphs then replay the scaled kernels. On a model whose keys run past 448 and whose values sit in e4m3's
    subnormals (CPU twin: tests/test_kv_fp8.py), the scaled cache keeps the fp32 cache's greedy choices where the
    unscaled one does not. fp32 activations: the caches differ, the arithmetic around them does not."""
    from tests.test_kv_fp8 import _scaled_tiny

    tiny = _scaled_tiny(tmp_path, k_gain=600.0, v_gain=0.003)
    ids = torch.randint(3, 320, (1, 64), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        reference = fastllm.optimize(tiny().cuda())(ids).logits
    agreement = {}
    for name, kv_scales in (("unscaled", None), ("auto", "auto")):
        quantization = fastllm.QuantConfig(weights=None, kv_cache="fp8", kv_scales=kv_scales)
        model = fastllm.optimize(tiny().cuda(), quantization=quantization, max_num_seqs=4)
        out = model.generate(ids, max_new_tokens=8, do_sample=False)  # decode in CUDA graphs
        assert out.shape[1] == ids.shape[1] + 8
        with torch.no_grad():
            logits = model(ids).logits
        agreement[name] = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        if kv_scales == "auto":
            assert model._fastllm_state.core.runner.compiled.context.kv_scales[0][0] >= 8.0
            assert model._fastllm_state.core.runner._graphs  # decode replayed graphs captured after calibration
    assert agreement["unscaled"] < 0.6 and agreement["auto"] >= 0.9, agreement
