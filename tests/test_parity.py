"""End-to-end: optimize(model).generate() gives HF eager's greedy tokens and logits, per family."""

import pytest
import torch
from transformers.models.falcon.modeling_falcon import FalconAttention

import fastllm
from tests._models import FAMILIES, VOCAB, build, optimize

# Passes expected to fire per family, as (pass, matches per layer, extra matches). Norms: two per layer
# plus the final one; rope_table: the cos and sin tables every layer reads. GPT-2's fused c_attn (a Conv1D addmm)
# and its written-out GELU are left unfused.
EXPECTED = {
    "llama": {"rms_norm": (2, 1), "rotary": (2, 0), "rope_table": (0, 2), "gated_mlp": (1, 0), "qkv": (1, 0)},
    "mistral": {"rms_norm": (2, 1), "rotary": (2, 0), "rope_table": (0, 2), "gated_mlp": (1, 0), "qkv": (1, 0)},
    "qwen2": {"rms_norm": (2, 1), "rotary": (2, 0), "rope_table": (0, 2), "gated_mlp": (1, 0), "qkv": (1, 0)},
    "gemma": {"rms_norm": (2, 1), "rotary": (2, 0), "rope_table": (0, 2), "gated_mlp": (1, 0), "qkv": (1, 0)},
    # phi3's qkv_proj is already one GEMM
    "phi3": {"rms_norm": (2, 1), "rotary": (2, 0), "rope_table": (0, 2), "gated_mlp": (1, 0)},
    "gpt_neox": {"layer_norm": (2, 1), "rotary": (2, 0), "rope_table": (0, 2)},
    "gpt2": {"layer_norm": (2, 1)},
    "gptj": {"layer_norm": (1, 1), "rotary": (2, 0), "rope_table": (0, 2), "qkv": (1, 0)},
    "qwen3": {"rms_norm": (4, 1), "rotary": (2, 0), "rope_table": (0, 2), "gated_mlp": (1, 0),
              "qkv": (1, 0)},  # + q_norm, k_norm
    "bloom": {"layer_norm": (2, 2)},  # + the embedding LayerNorm; ALiBi attention stays unfused
    "falcon": {"layer_norm": (2, 1), "rotary": (2, 0), "rope_table": (0, 2), "list_index": (2, 0)},
    "falcon_rw": {"layer_norm": (2, 1)},
    "falcon_mq": {"layer_norm": (1, 1), "rotary": (2, 0), "rope_table": (0, 2), "list_index": (2, 0)},
    "mpt": {"layer_norm": (2, 1)},
    "gpt_bigcode": {"layer_norm": (2, 1)},
    "mixtral": {"rms_norm": (2, 1), "rotary": (2, 0), "rope_table": (0, 2), "gated_mlp": (1, 0), "qkv": (1, 0)},
    "glm": {"rms_norm": (2, 1), "rotary": (2, 0), "rope_table": (0, 2), "gated_mlp": (1, 0), "qkv": (1, 0)},
    "glm4": {"rms_norm": (4, 1), "rotary": (2, 0), "rope_table": (0, 2), "gated_mlp": (1, 0), "qkv": (1, 0)},
    "gemma2": {"rms_norm": (4, 1), "rotary": (2, 0), "rope_table": (0, 2), "gated_mlp": (1, 0), "qkv": (1, 0)},
    "phi": {"layer_norm": (1, 1), "rotary": (2, 0), "rope_table": (0, 2), "qkv": (1, 0)},  # parallel attention and MLP
}
# Falcon's own head split (`_split_heads`, transformers < 5.25) takes its multi-query K and V with list indexing
# (`[..., [-2], :]`), which list_index rewrites, twice a layer; transformers 5.25 moved Falcon onto the shared
# attention code, which has no list indexing left to rewrite.
if not hasattr(FalconAttention, "_split_heads"):
    for _family in ("falcon", "falcon_mq"):
        del EXPECTED[_family]["list_index"]


def _prompts():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # the second row is left-padded
    return ids, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_and_logits_match_hf_eager(family, tmp_path):
    model = build(family, tmp_path)
    ids, mask = _prompts()
    gen = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected_tokens = model.generate(ids, **gen)
        expected_logits = model(ids, attention_mask=mask).logits

    optimize(model)
    tokens = model.generate(ids, **gen)
    logits = model(ids, attention_mask=mask).logits  # teacher-forced, on the compiled step (paged attention)

    assert torch.equal(tokens, expected_tokens)
    # fp32 on the CPU: the fused path runs the reference ops, the same math in the same order (paged attention's
    # reference sums in another order than SDPA: 1e-5). Padding positions are 0 by design (HF's attend to nothing
    # real), so only the real tokens are compared.
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected_logits[real], rtol=1e-5, atol=1e-5)
    assert logits[~real].eq(0).all()

    report = fastllm.explain(model)
    assert report.status == "optimized"
    layers = model.config.num_hidden_layers
    expected = {name: per_layer * layers + extra for name, (per_layer, extra) in EXPECTED[family].items()}
    matched = {k: v for k, v in report.matches.items()
               if v and k not in ("dropout", "attention", "skinny_linear", "reference_ops")}
    assert matched == expected
    assert report.matches["attention"] == layers  # the one compiled step pages every layer's attention
    assert report.forward_calls == {"compiled": 1}


def test_llama_report_shows_every_site_fused(tmp_path):
    model = build("llama", tmp_path)
    optimize(model)
    report = fastllm.explain(model)
    layers = model.config.num_hidden_layers
    assert report.matches["rms_norm"] == 2 * layers + 1
    assert report.matches["rotary"] == 2 * layers
    assert report.matches["gated_mlp"] == layers
    assert report.matches["qkv"] == layers
    # Nothing of the norm, rotary or gated-activation chains is left in the graph.
    for op in ("rsqrt", "silu"):
        assert op not in report.unfused_ops
    assert report.matches["attention"] == layers  # paged attention, in the runtime's graph
    assert "scaled_dot_product_attention" not in report.unfused_ops
    text = str(report)
    assert "rms_norm" in text and "still unfused" in text and "linear" in text
    assert report.to_dict()["matches"] == report.matches


def test_weight_merge_does_not_copy_the_model(tmp_path):
    model = build("llama", tmp_path)

    def storage_bytes():
        seen = {}
        for p in model.parameters():
            seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
        return sum(seen.values())

    before = storage_bytes()
    optimize(model)
    assert storage_bytes() == before
    attn = model.model.layers[0].self_attn
    q, k = attn.q_proj.weight, attn.k_proj.weight
    # q and k are now adjacent rows of one merged [q; k; v] weight.
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()


def test_a_forward_longer_than_a_step_runs_in_chunked_steps_with_hfs_logits(tmp_path):
    """model(ids) over more tokens than max_num_batched_tokens is prefilled in steps of that size, each attending to
    the earlier ones through the KV cache (the runner is sized for steps that large, not for the whole call): every
    position's logits still equal HF eager's, for two sequences of different lengths (one shorter than a step)."""
    model = build("llama", tmp_path)
    ids = torch.randint(3, VOCAB, (2, 45), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :33] = 0  # left padding: the second sequence has 12 tokens
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    optimize(model, max_num_batched_tokens=16, max_num_seqs=4)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    assert fastllm.explain(model).forward_calls.get("compiled") == 1
    # fp32 on the CPU: as in the test above (paged attention's reference sums in another order than SDPA)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 33:], expected[1, 33:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_context_shorter_than_the_capture_forward(family, tmp_path):
    """The capturing forward runs 256 tokens; its positions once went past a 64-position model's learned position
    embeddings (GPT-2: an IndexError, so the model fell back) and rope_table's tables. Greedy output to near the end
    of the context equals HF eager's."""
    import transformers as T

    config = FAMILIES[family]()
    config.max_position_embeddings = 64  # GPT-2: n_positions (its attribute map)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, _ = _prompts()
    gen = dict(max_new_tokens=50, do_sample=False, pad_token_id=0)  # to position 60 of 64
    expected = model.generate(ids, **gen)
    optimize(model, on_capture_failure="raise")
    assert torch.equal(model.generate(ids, **gen), expected)
    assert fastllm.explain(model).status == "optimized"
