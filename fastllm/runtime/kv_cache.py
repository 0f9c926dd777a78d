"""The paged KV cache: block accounting (pure Python) and the cache tensors (torch).

The cache is `num_blocks` blocks of `block_size` token slots each. A sequence owns a list of blocks (its
`BlockTable`); the K/V of its token at position `pos` live in slot `blocks[pos // block_size] * block_size +
pos % block_size`. Blocks are ref-counted so that sequences can share a prefix: full, computed blocks can be
registered under a hash of their content chained over the prefix, and outlive their sequence until evicted.

The scheduler imports this module and must not need torch, so torch is imported only inside the tensor
helpers at the bottom.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Without a CUDA device there is no free-memory figure to size the cache from: the CPU path (tests, laptops)
# reserves this many tokens unless `KVCacheConfig.num_kv_tokens` says otherwise. The CPU cache is zero-filled
# (see `allocate_kv_cache`), so its memory is committed: 16,384 tokens of SmolLM2-135M in fp32 (30 layers,
# 3 KV heads of 64) are 755 MB.
CPU_DEFAULT_NUM_KV_TOKENS = 16384


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for. Nothing was allocated; the scheduler preempts or waits."""


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` token slots: ceil(num_tokens / block_size)."""
    _check_int("num_tokens", num_tokens, 0)
    _check_int("block_size", block_size, 1)
    return -(-num_tokens // block_size)


class BlockPool:
    """`num_blocks` blocks of `block_size` slots: a free list, a reference count per block, and a prefix cache.

    A block is in one of three states:
    - free: refcount 0, on the free list, content meaningless;
    - held: refcount >= 1, owned by one or more block tables;
    - cached: refcount 0 but registered under a content hash (`cache()`), so a later request with the same
      prefix can take it back (`lookup()` + `incref()`) instead of recomputing it. Cached blocks sit in an LRU
      set and are evicted, oldest first, when the free list is empty. They count as free in `num_free_blocks`.
    A held block may be registered too (its hash stays with it while held, shared or not).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        _check_int("num_blocks", num_blocks, 1)
        _check_int("block_size", block_size, 1)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        # FIFO: a freed block is reused last, which lets a cached prefix survive longest.
        self._free_ids: deque[int] = deque(range(num_blocks))
        self.block_hashes: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, refcount 0; first = least recently used
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_ids) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, held or evictable."""
        return len(self._hash_to_block)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks (refcount 1 each), free ones first, then evicting cached ones LRU.

        All or nothing: raises OutOfBlocks.
        """
        _check_int("num_blocks", num_blocks, 0)
        if num_blocks > self.num_free_blocks:
            raise OutOfBlocks(f"need {num_blocks} KV-cache blocks, {self.num_free_blocks} of {self.num_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            if self._free_ids:
                b = self._free_ids.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._hash_to_block[self.block_hashes[b]]
                self.block_hashes[b] = None
                self.num_evictions += 1
            self.ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def incref(self, blocks: Iterable[int]) -> None:
        """Add a holder to each of `blocks`: held ones, or cached ones (which leave the evictable set)."""
        blocks = list(blocks)
        self._check_held(dict.fromkeys(blocks, 1), "share")
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self._evictable[b]
            self.ref_counts[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one holder from each of `blocks`. At refcount 0 a cached block becomes evictable (most recently
        used), any other goes back to the free list.

        Raises ValueError, and changes nothing, if a block would be freed more often than it is held.
        """
        blocks = list(blocks)
        self._check_held(Counter(blocks), "free")
        for b in blocks:
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self.block_hashes[b] is None:
                    self._free_ids.append(b)
                else:
                    self._evictable[b] = None

    def lookup(self, block_hash: int) -> int | None:
        """The cached block with this content hash, or None. Does not take it: `incref()` does."""
        return self._hash_to_block.get(block_hash)

    def cache(self, block: int, block_hash: int) -> bool:
        """Register a held, full, computed block under `block_hash`. Returns whether it is now the cached block
        for that hash: if another block already is (two requests computed the same prefix at once), the first
        stays and this one is freed normally later. Re-registering a block under its own hash is a no-op.
        """
        if self.ref_counts[block] < 1:
            raise ValueError(f"cannot cache block {block}: it is not held")
        if self.block_hashes[block] is not None:
            if self.block_hashes[block] != block_hash:
                raise ValueError(f"block {block} is already cached under another hash (rewritten while cached?)")
            return True
        if block_hash in self._hash_to_block:
            return False
        self._hash_to_block[block_hash] = block
        self.block_hashes[block] = block_hash
        return True

    def _check_held(self, counts: dict[int, int], action: str) -> None:
        for b, n in counts.items():
            if not (isinstance(b, int) and 0 <= b < self.num_blocks):
                raise ValueError(f"no block {b!r} in a pool of {self.num_blocks}")
            if action == "share" and b in self._evictable:
                continue
            if self.ref_counts[b] < n:
                raise ValueError(f"cannot {action} block {b} {n} time(s): its refcount is {self.ref_counts[b]}"
                                 + (" (double free?)" if action == "free" else ""))


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Content hash of a full block, chained over its prefix: equal hashes mean equal whole prefixes, up to
    collisions of Python's 64-bit tuple hash (fine for one process's cache; not collision-resistant against
    an adversary choosing prompts, where a cryptographic hash would be needed)."""
    return hash((parent_hash, tuple(token_ids)))


class BlockTable:
    """The blocks of one sequence, and how many of its positions have a reserved slot."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []
        self.num_tokens = 0  # positions [0, num_tokens) have slots

    def ensure_capacity(self, num_tokens: int) -> None:
        """Reserve slots for positions [0, num_tokens). On OutOfBlocks the table is unchanged."""
        missing = blocks_needed(num_tokens, self.pool.block_size) - len(self.blocks)
        if missing > 0:
            self.blocks += self.pool.allocate(missing)
        self.num_tokens = max(self.num_tokens, num_tokens)

    def slot(self, pos: int) -> int:
        if not 0 <= pos < self.num_tokens:
            raise IndexError(f"position {pos} has no slot (table holds {self.num_tokens} tokens)")
        bs = self.pool.block_size
        return self.blocks[pos // bs] * bs + pos % bs

    def slots(self, start: int, end: int) -> list[int]:
        """Slots of positions [start, end)."""
        if not 0 <= start <= end <= self.num_tokens:
            raise IndexError(f"positions [{start}, {end}) out of range (table holds {self.num_tokens} tokens)")
        bs, blocks = self.pool.block_size, self.blocks
        return [blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def free(self) -> None:
        """Give every block back to the pool; the table is empty afterwards."""
        # Tail first: cached blocks then become evictable tail first, so eviction takes a prefix's last blocks
        # before its first ones (a later block is useless for a hit once an earlier one is gone).
        self.pool.free(reversed(self.blocks))
        self.blocks = []
        self.num_tokens = 0


# ---- tensors ----------------------------------------------------------------------------------------------


@dataclass
class KVCacheConfig:
    """How big the paged KV cache is.

    Args:
        block_size: token slots per block.
        kv_cache_memory_fraction: on CUDA, the fraction of the memory still free after the weights are loaded
            and a warm-up forward ran (so activations are counted) that the cache takes. In (0, 1].
        num_kv_tokens: an explicit cache size in tokens (rounded up to whole blocks); overrides the fraction.
            Without it, a CPU cache holds `CPU_DEFAULT_NUM_KV_TOKENS` tokens; other devices require it.
    """

    block_size: int = 16
    kv_cache_memory_fraction: float = 0.9
    num_kv_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        fraction = self.kv_cache_memory_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {fraction!r}")
        tokens = self.num_kv_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"num_kv_tokens must be None or an integer >= 1, got {tokens!r}")


def kv_cache_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                             dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, K and V: 2 * layers * block_size * kv_heads * head_dim * itemsize."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def num_blocks_from_memory(free_bytes: int, fraction: float, bytes_per_block: int) -> int:
    """How many blocks of `bytes_per_block` fit in `fraction` of `free_bytes` (rounded down)."""
    if free_bytes < 0 or not 0 < fraction <= 1 or bytes_per_block < 1:
        raise ValueError(f"need free_bytes >= 0, 0 < fraction <= 1, bytes_per_block >= 1; got {free_bytes}, "
                         f"{fraction}, {bytes_per_block}")
    return int(free_bytes * fraction) // bytes_per_block


def plan_num_blocks(config: KVCacheConfig, *, device: torch.device | str, num_layers: int, num_kv_heads: int,
                    head_dim: int, dtype: torch.dtype) -> int:
    """Number of cache blocks to allocate.

    With `config.num_kv_tokens`: ceil(num_kv_tokens / block_size). Otherwise, on CUDA, `kv_cache_memory_fraction`
    of the free memory `torch.cuda.mem_get_info` reports. Call it after the weights are loaded and a warm-up
    forward at the largest batch has run, so that the memory activations need is already taken (the caching
    allocator keeps it reserved) and is not handed to the cache. On the CPU, `CPU_DEFAULT_NUM_KV_TOKENS`.

    Raises ValueError for a device without a default size, RuntimeError if not even one block fits.
    """
    import torch

    device = torch.device(device)
    if config.num_kv_tokens is not None:
        return blocks_needed(config.num_kv_tokens, config.block_size)
    if device.type == "cpu":
        return blocks_needed(CPU_DEFAULT_NUM_KV_TOKENS, config.block_size)
    if device.type != "cuda":
        raise ValueError(f"KVCacheConfig.num_kv_tokens is required on device type {device.type!r} "
                         f"(free memory is only measured on CUDA)")
    free_bytes, _ = torch.cuda.mem_get_info(device)
    per_block = kv_cache_bytes_per_block(num_layers, num_kv_heads, head_dim, config.block_size, dtype)
    num_blocks = num_blocks_from_memory(free_bytes, config.kv_cache_memory_fraction, per_block)
    if num_blocks < 1:
        raise RuntimeError(f"no room for the KV cache: {free_bytes / 2**20:.0f} MiB free x "
                           f"kv_cache_memory_fraction {config.kv_cache_memory_fraction} < one block "
                           f"({per_block / 2**20:.1f} MiB); free memory or set num_kv_tokens")
    return num_blocks


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device | str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The cache tensors: per layer (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim].

    One allocation, [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], viewed per layer (each
    view is contiguous). On CUDA it is `torch.empty`: slots are read only after they are written, and a memset
    of tens of GB at startup buys nothing; kernels must therefore mask positions past a sequence's length
    rather than multiply them by zero (stale bytes may be NaN). On other devices it is zero-filled so that CPU
    runs are deterministic even when a bug reads an unwritten slot.
    """
    import torch

    for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        _check_int(name, value, 1)
    device = torch.device(device)
    alloc = torch.empty if device.type == "cuda" else torch.zeros
    kv = alloc(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    return [(kv[i, 0], kv[i, 1]) for i in range(num_layers)]
