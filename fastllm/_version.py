"""fastllm's version (a leaf module: the graph cache's key reads it from below the public face)."""

__version__ = "0.1.0"
