"""Engine builders that `EngineClient` runs in its child process (module-level, so they pickle by name)."""

from __future__ import annotations

FAULT_PROMPT = [11, 12, 13, 14, 15]


def tiny_llm(path: str, **options):
    """The tiny random model saved at `path`, as an LLM."""
    import transformers as T

    import fastllm

    return fastllm.LLM(T.AutoModelForCausalLM.from_pretrained(path).eval(), **options)


def faulty_llm(path: str):
    """`tiny_llm`, whose model step raises once, the first time it runs a request whose prompt is FAULT_PROMPT."""
    from fastllm.runtime.model_runner import ModelRunner

    execute = ModelRunner.execute
    armed = [True]

    def faulty_execute(self, chunks, feed_rows=None):
        if armed[0] and any(list(chunk.request.prompt_token_ids) == FAULT_PROMPT for chunk in chunks):
            armed[0] = False
            raise RuntimeError("injected fault in the model step")
        return execute(self, chunks, feed_rows)

    ModelRunner.execute = faulty_execute
    return tiny_llm(path)


def refusing_build():
    raise ValueError("no such model: the builder refused")


def tiny_llm_cuda(path: str):
    """`tiny_llm` on the GPU with CUDA graphs (the runtime's default there), in fp32: requests that reach the engine
    at different times share different batches, and in bf16 random weights' near-tied logits can flip with that."""
    import torch
    import transformers as T

    import fastllm

    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to("cuda")
    return fastllm.LLM(model)
