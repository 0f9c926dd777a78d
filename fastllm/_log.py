"""fastllm's logger: one line of INFO for what the user should know (e.g. how much KV cache an LLM reserved).

Like vLLM's, it prints INFO to stderr unless the application configures the "fastllm" logger itself
(`logging.getLogger("fastllm").setLevel(logging.WARNING)` silences it).
"""

import logging

logger = logging.getLogger("fastllm")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
