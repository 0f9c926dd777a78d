"""write_kv_cache and rotary_and_write_kv: Triton kernels (interpreter on CPU, GPU when present) against the refs."""

import pytest
import torch
from _kernel_tolerances import CPU_DTYPES, GPU_DTYPES, assert_close

from fastllm.kernels import (
    rotary_and_write_kv,
    rotary_and_write_kv_ref,
    triton_on_cpu,
    write_kv_cache,
    write_kv_cache_ref,
)

# (Hq, Hkv, D, R): Llama GQA 4:1, MHA with partial rotary (Phi/NeoX), GQA 3:1 at D=80, MQA, odd small head dim.
HEADS = [(8, 2, 64, 64), (4, 4, 128, 64), (6, 2, 80, 80), (4, 1, 128, 128), (3, 1, 40, 24)]
NUM_BLOCKS, BLOCK_SIZE = 6, 4


def _qkv(num_tokens, hq, hkv, head_dim, dtype, device="cpu", seed=0):
    """q, k, v as [T, H, D] views into one fused [T, Hq + 2 Hkv, D] projection output (strided, as QKV makes)."""
    g = torch.Generator().manual_seed(seed + head_dim)
    qkv = torch.randn(num_tokens, hq + 2 * hkv, head_dim, generator=g).to(device, dtype)
    return qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]


def _caches(hkv, head_dim, dtype, device="cpu", num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE):
    g = torch.Generator().manual_seed(7)
    shape = (num_blocks, block_size, hkv, head_dim)
    return torch.randn(shape, generator=g).to(device, dtype), torch.randn(shape, generator=g).to(device, dtype)


def _slots(num_tokens, num_slots, device="cpu", dtype=torch.int64):
    """Distinct slots in a shuffled order, every third token padding (-1)."""
    g = torch.Generator().manual_seed(num_tokens)
    slots = torch.randperm(num_slots, generator=g)[:num_tokens]
    slots[::3] = -1
    return slots.to(device, dtype)


@pytest.mark.parametrize("hq,hkv,head_dim,rotary_dim", HEADS)
@pytest.mark.parametrize("dtype", [*CPU_DTYPES, torch.bfloat16])  # a pure copy: bf16 is exact in the interpreter
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_write_kv_cache_triton_cpu(hq, hkv, head_dim, rotary_dim, dtype, slot_dtype):
    _, k, v = _qkv(7, hq, hkv, head_dim, dtype)
    assert not k.is_contiguous()
    k_cache, v_cache = _caches(hkv, head_dim, dtype)
    slots = _slots(7, NUM_BLOCKS * BLOCK_SIZE, dtype=slot_dtype)
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(k, v, k_exp, v_exp, slots)
    with triton_on_cpu():
        assert write_kv_cache(k, v, k_cache, v_cache, slots) is None
    assert torch.equal(k_cache, k_exp) and torch.equal(v_cache, v_exp)
    # The ref itself: the written rows hold k and v, the rows of padding tokens' would-be slots are untouched.
    valid = slots >= 0
    assert torch.equal(k_cache.view(-1, hkv, head_dim)[slots[valid].long()], k[valid])


def test_write_kv_cache_cpu_dispatch_is_the_reference():
    _, k, v = _qkv(5, 4, 2, 64, torch.float16)
    k_cache, v_cache = _caches(2, 64, torch.float16)
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    slots = _slots(5, NUM_BLOCKS * BLOCK_SIZE)
    write_kv_cache_ref(k, v, k_exp, v_exp, slots)
    write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_exp) and torch.equal(v_cache, v_exp)


def _expected_rotary(q, k, v, cos, sin, k_cache, v_cache, slots, interleaved):
    """The kernel computes in fp32 and rounds once: the ref on fp32 copies, rounded to the stored dtypes."""
    k32, v32 = k_cache.float(), v_cache.float()
    q_rot = rotary_and_write_kv_ref(q.float(), k.float(), v.float(), cos.float(), sin.float(), k32, v32, slots,
                                    interleaved=interleaved)  # fmt: skip
    return q_rot.to(torch.result_type(q, cos)), k32.to(k_cache.dtype), v32.to(v_cache.dtype)


def _angles(num_tokens, rotary_dim, dtype, device="cpu"):
    g = torch.Generator().manual_seed(rotary_dim)
    angles = torch.rand(num_tokens, rotary_dim, generator=g) * 6.3
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


@pytest.mark.parametrize("hq,hkv,head_dim,rotary_dim", HEADS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_and_write_kv_triton_cpu(hq, hkv, head_dim, rotary_dim, dtype, interleaved):
    q, k, v = _qkv(7, hq, hkv, head_dim, dtype)
    cos, sin = _angles(7, rotary_dim, dtype)
    k_cache, v_cache = _caches(hkv, head_dim, dtype)
    slots = _slots(7, NUM_BLOCKS * BLOCK_SIZE)
    q_exp, k_exp, v_exp = _expected_rotary(q, k, v, cos, sin, k_cache, v_cache, slots, interleaved)
    with triton_on_cpu():
        q_rot = rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, interleaved=interleaved)
    assert q_rot.is_contiguous() and q_rot.shape == q.shape
    assert_close(q_rot, q_exp)
    assert_close(k_cache, k_exp)
    assert torch.equal(v_cache, v_exp)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_and_write_kv_q_out_and_mixed_dtype(interleaved):
    # fp16 q/k with fp32 cos/sin: q_rot is fp32 (torch.result_type, as rotary_embedding), k is stored in fp16;
    # q_out is a strided view ([T, Hq, D] inside a [T, Hq, 2D] buffer).
    q, k, v = _qkv(5, 4, 2, 64, torch.float16)
    cos, sin = _angles(5, 32, torch.float32)
    k_cache, v_cache = _caches(2, 64, torch.float16)
    slots = _slots(5, NUM_BLOCKS * BLOCK_SIZE, dtype=torch.int32)
    q_exp, k_exp, v_exp = _expected_rotary(q, k, v, cos, sin, k_cache, v_cache, slots, interleaved)
    q_out = torch.empty(5, 4, 128)[..., :64]
    with triton_on_cpu():
        q_rot = rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, interleaved=interleaved, q_out=q_out)
    assert q_rot is q_out
    assert_close(q_rot, q_exp)
    assert_close(k_cache, k_exp)
    assert torch.equal(v_cache, v_exp)


def test_rotary_and_write_kv_cpu_dispatch_is_the_reference():
    q, k, v = _qkv(5, 4, 2, 64, torch.float16)
    cos, sin = _angles(5, 64, torch.float16)
    k_cache, v_cache = _caches(2, 64, torch.float16)
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    slots = _slots(5, NUM_BLOCKS * BLOCK_SIZE)
    q_exp = rotary_and_write_kv_ref(q, k, v, cos, sin, k_exp, v_exp, slots)
    assert torch.equal(rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots), q_exp)
    assert torch.equal(k_cache, k_exp) and torch.equal(v_cache, v_exp)


def test_opcheck():
    q, k, v = _qkv(3, 2, 1, 16, torch.float32)
    k_cache, v_cache = _caches(1, 16, torch.float32, num_blocks=2)
    slots = torch.tensor([5, -1, 0])
    cos, sin = _angles(3, 8, torch.float32)
    torch.library.opcheck(torch.ops.fastllm.write_kv_cache.default, (k, v, k_cache, v_cache, slots, 1.0, 1.0))
    for interleaved in (False, True):
        q_out = torch.empty(q.shape)
        torch.library.opcheck(torch.ops.fastllm.rotary_and_write_kv.default,
                              (q, k, v, cos, sin, k_cache, v_cache, slots, q_out, interleaved, 1.0, 1.0))  # fmt: skip


def test_bad_inputs():
    q, k, v = _qkv(4, 4, 2, 64, torch.float32)
    k_cache, v_cache = _caches(2, 64, torch.float32)
    slots = _slots(4, NUM_BLOCKS * BLOCK_SIZE)
    cos, sin = _angles(4, 64, torch.float32)
    with pytest.raises(ValueError, match="the cache holds 2 heads of dim 64 but k has 2 heads of dim 32"):
        write_kv_cache(k[..., :32], v[..., :32], k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="the cache holds 2 heads"):
        write_kv_cache(k[:, :1], v[:, :1], k_cache, v_cache, slots)
    with pytest.raises(TypeError, match="k_cache has dtype torch.float16"):
        write_kv_cache(k, v, k_cache.half(), v_cache, slots)
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        write_kv_cache(k, v, k_cache.transpose(0, 1), v_cache.transpose(0, 1), slots)
    with pytest.raises(TypeError, match="slot_mapping must be an int32 or int64 tensor"):
        write_kv_cache(k, v, k_cache, v_cache, slots.float())
    with pytest.raises(ValueError, match="slot_mapping must have shape"):
        write_kv_cache(k, v, k_cache, v_cache, slots[:3])
    with pytest.raises(ValueError, match="v has shape"):
        write_kv_cache(k, v[:3], k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="must be even"):
        rotary_and_write_kv(q, k, v, cos[:, :31], sin[:, :31], k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="cos and sin must be \\[num_tokens, rotary_dim\\]"):
        rotary_and_write_kv(q, k, v, cos[:3], sin[:3], k_cache, v_cache, slots)
    with pytest.raises(TypeError, match="cos and sin must have one dtype"):
        rotary_and_write_kv(q, k, v, cos, sin.half(), k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="q must be"):
        rotary_and_write_kv(q[..., :32], k, v, cos, sin, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="q_out has shape"):
        rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, q_out=torch.empty(4, 4, 32))


# --- GPU: bf16/fp16 at decode and prefill shapes ---------------------------------------------------------------

# (tokens, Hq, Hkv, D, R): Llama-3.1-8B decode batch and 2048-token prefill, Phi-2-like partial rotary, MQA.
GPU_SHAPES = [(1, 32, 8, 128, 128), (128, 32, 8, 128, 128), (2048, 32, 8, 128, 128), (64, 32, 32, 80, 32),
              (64, 16, 1, 256, 256)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens,hq,hkv,head_dim,rotary_dim", GPU_SHAPES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_and_write_kv_gpu(num_tokens, hq, hkv, head_dim, rotary_dim, dtype, interleaved):
    q, k, v = _qkv(num_tokens, hq, hkv, head_dim, dtype, device="cuda")
    cos, sin = _angles(num_tokens, rotary_dim, dtype, device="cuda")
    num_blocks = num_tokens // 16 + 4
    k_cache, v_cache = _caches(hkv, head_dim, dtype, device="cuda", num_blocks=num_blocks, block_size=16)
    slots = _slots(num_tokens, num_blocks * 16, device="cuda")
    q_exp, k_exp, v_exp = _expected_rotary(q, k, v, cos, sin, k_cache, v_cache, slots, interleaved)
    q_rot = rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, interleaved=interleaved)
    assert_close(q_rot, q_exp)
    assert_close(k_cache, k_exp)
    assert torch.equal(v_cache, v_exp)
    k2, v2 = _caches(hkv, head_dim, dtype, device="cuda", num_blocks=num_blocks, block_size=16)
    k2_exp, v2_exp = k2.clone(), v2.clone()
    write_kv_cache_ref(k, v, k2_exp, v2_exp, slots)
    write_kv_cache(k, v, k2, v2, slots)
    assert torch.equal(k2, k2_exp) and torch.equal(v2, v2_exp)
