"""The runtime: the engine core and what it owns — paged KV cache, scheduler, model runner, sampler (see
docs/architecture.md).

Importing this package imports nothing: `scheduler` and the block accounting of `kv_cache` stay free of torch.
"""
