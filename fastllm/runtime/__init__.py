"""The runtime: paged KV cache, scheduler, model runner, sampler, engine (see DESIGN.md, "Runtime").

Importing this package imports nothing: `scheduler` and the block accounting of `kv_cache` stay free of torch.
"""
