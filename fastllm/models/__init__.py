"""Model-specific data (name maps, quirks) and the embedded demo model (`fastllm.models.demo`)."""
