"""Tiny random-weight models built from transformers config classes, saved and loaded back through
`save_pretrained` / `from_pretrained` (the real loading path), for parity tests."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 128

# Odd sizes on purpose: head_dim 80 (Llama), 3:1 grouped-query attention (Llama, Qwen2, Mistral),
# tied embeddings (Qwen2, Gemma), partial rotary (Phi-3, GPT-NeoX), gelu-tanh gating (Gemma).
FAMILIES = {
    "llama": lambda: T.LlamaConfig(hidden_size=480, intermediate_size=200, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=80, vocab_size=VOCAB),
    "mistral": lambda: T.MistralConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=6, num_key_value_heads=2, vocab_size=VOCAB),
    "qwen2": lambda: T.Qwen2Config(hidden_size=96, intermediate_size=136, num_hidden_layers=2, num_attention_heads=6,
                                   num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True),
    "gemma": lambda: T.GemmaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=16, vocab_size=VOCAB),
    "phi3": lambda: T.Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, partial_rotary_factor=0.5, vocab_size=VOCAB,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, rotary_pct=0.25, vocab_size=VOCAB),
    "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
    "gptj": lambda: T.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=VOCAB,
                                 bos_token_id=1, eos_token_id=2),
    "bloom": lambda: T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB),  # ALiBi
    "falcon": lambda: T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                                     new_decoder_architecture=True, num_kv_heads=2),
    # Falcon-RW: ALiBi folded into the SDPA mask; 6 heads exercise the slopes past the largest power of two.
    "falcon_rw": lambda: T.FalconConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=6, vocab_size=VOCAB,
                                        alibi=True, new_decoder_architecture=False, multi_query=False,
                                        parallel_attn=False, bias=True),
    # Falcon-7B's layout: one KV head split off a fused QKV by list indexing (`x[..., [-2], :]`), parallel attention.
    "falcon_mq": lambda: T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                                        multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                        alibi=False),
    "mpt": lambda: T.MptConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=VOCAB),  # ALiBi
    "gpt_bigcode": lambda: T.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, multi_query=True),
    "mixtral": lambda: T.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                       vocab_size=VOCAB),
    "glm": lambda: T.GlmConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, pad_token_id=0,
                               eos_token_id=[1], bos_token_id=2),
    "glm4": lambda: T.Glm4Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, pad_token_id=0,
                                 eos_token_id=[1], bos_token_id=2),
    "gemma2": lambda: T.Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, vocab_size=VOCAB),
    "phi": lambda: T.PhiConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=VOCAB, partial_rotary_factor=0.5),
    "qwen3": lambda: T.Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=VOCAB),
}


def optimize(model, *args, **options):
    """`fastllm.optimize` on fastllm's runtime also on the CPU (`cpu_runtime=True`), where its default is Hugging
    Face's own path: what the CPU tests check is the runtime."""
    import fastllm

    options.setdefault("cpu_runtime", True)
    return fastllm.optimize(model, *args, **options)


def build(family: str, path, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-weight model of `family`, saved to `path` and loaded back. Its 1-D parameters (norm weights, biases),
    which from_config makes constant (ones, zeros), get noise of 0.1 too: with them constant, a whole-model test
    against Hugging Face could not see a norm's weight or a bias dropped, misplaced or merged wrongly."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(FAMILIES[family]())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.is_floating_point():
                p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype))
    model.save_pretrained(path)
    return T.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def with_random_norms(model, seed: int = 1):
    """`model` with its RMSNorm weights drawn from [0.5, 1.5) (from_config makes them ones, or zeros for Gemma's offset
    form: a fold of those would multiply by exactly 1 and a test of it could not fail); the same draws for the same
    family and seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=g))
    return model


def build_over_demo_tokenizer(path):
    """(tokenizer, path): a tiny random Llama saved at `path` whose vocabulary is the demo model's real
    tokenizer (SmolLM2), for tests that need text: stop strings, streamers, string prompts."""
    from fastllm.models.demo import load_demo_tokenizer

    tokenizer = load_demo_tokenizer()
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=len(tokenizer))
    T.LlamaForCausalLM(config).save_pretrained(path)
    return tokenizer, path


def chain_model(path, chain: dict[int, int]):
    """The model saved at `path` with every layer's output projections zeroed (the residual stream is the token's
    embedding) and embeddings / LM head set so that greedy decoding after token s picks `chain[s]`."""
    model = T.AutoModelForCausalLM.from_pretrained(path).eval()
    sources = sorted(chain)
    assert len(sources) <= model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        embed.zero_()
        head.zero_()
        for i, source in enumerate(sources):
            embed[source, i] = 1.0
            head[chain[source], i] += 10.0
    return model


def break_capture(model):
    """Make the first decoder layer do something dynamo cannot put in one graph (a capture that fails)."""
    layer = model.model.layers[0]
    inner = layer.forward

    def forward(*args, **kwargs):
        torch._dynamo.graph_break()
        return inner(*args, **kwargs)

    layer.forward = forward
