"""`model.train()` after optimize(): a model with dropout runs Hugging Face's forward and generate (which apply the
dropout) until `model.eval()`; the compiled step is inference-only. A model without dropout stays on the step."""

import warnings

import pytest
import torch

import fastllm
from tests._models import VOCAB, build, optimize


def _ids():
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))


def test_training_mode_with_dropout_runs_hf_forward_and_generate(tmp_path):
    model = build("gpt2", tmp_path)  # resid/embd/attn dropout 0.1 by default
    assert model.config.resid_pdrop > 0
    ids = _ids()
    optimize(model)
    state = model._fastllm_state
    with torch.no_grad():
        eval_logits = model(ids).logits
    assert state.forward_routes["compiled"] == 1

    model.train()
    with torch.no_grad():
        torch.manual_seed(7)
        train_logits = model(ids).logits
        torch.manual_seed(7)
        expected = state.original_forward(ids).logits  # Hugging Face's forward, dropout on, same random draws
    assert torch.equal(train_logits, expected)
    assert not torch.allclose(train_logits, eval_logits)  # the dropout did act: the test can tell the paths apart
    assert state.forward_routes["eager"] == 1 and "training mode" in state.eager_forward_reason

    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.manual_seed(3)
    expected_tokens = state.original_generate(ids, **gen)
    torch.manual_seed(3)
    with pytest.warns(RuntimeWarning, match=r"training mode .* model\.eval\(\)"):
        tokens = model.generate(ids, **gen)
    assert torch.equal(tokens, expected_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        model.generate(ids, **gen)

    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, eval_logits)
    assert state.forward_routes["compiled"] == 2
    fastllm.release(model)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_training_mode_without_dropout_stays_on_the_compiled_step(family, tmp_path):
    """Llama: attention_dropout 0.0, no dropout modules. GPT-NeoX: its dropouts 0.0, but classifier_dropout 0.1 (the
    rate of a classification head, which a causal LM does not have)."""
    model = build(family, tmp_path)
    optimize(model)
    model.train()
    with torch.no_grad():
        model(_ids())
    assert model._fastllm_state.forward_routes == {"compiled": 1}
    fastllm.release(model)


def test_training_mode_on_hugging_faces_cpu_path_says_nothing(tmp_path):
    """On the CPU without cpu_runtime generate() runs Hugging Face's path anyway: no warning for training mode."""
    model = fastllm.optimize(build("gpt2", tmp_path))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(_ids(), max_new_tokens=2, do_sample=False, pad_token_id=0)
    fastllm.release(model)
