"""Entry points over a model's engine core: `model(...)` (forward.py), `model.generate()` (hf_generate.py), `LLM`
(llm.py), `AsyncLLM` (async_llm.py), and what fastllm attaches to a model (model_state.py)."""
