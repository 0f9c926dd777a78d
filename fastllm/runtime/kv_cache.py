"""The paged KV cache: block accounting (pure Python) and the cache tensors (torch).

The cache is `num_blocks` blocks of `block_size` token slots each. A sequence owns a list of blocks (its
`BlockTable`); the K/V of its token at position `pos` live in slot `blocks[pos // block_size] * block_size +
pos % block_size`. Blocks are ref-counted so that sequences can share a prefix: full, computed blocks can be
registered under a cryptographic digest of their content chained over the prefix (`hash_block`), and outlive
their sequence until evicted. A hit is served only after the pool compared the block's stored token ids and
parent key with the asking request's, so even a colliding key cannot hand one prompt's K/V to another.

The scheduler imports this module and must not need torch, so torch is imported only inside the tensor
helpers at the bottom.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# A cache starts with this many tokens (unless `KVCacheConfig.num_kv_tokens` fixes its size) and grows on demand up
# to its cap: the drop-in generate() holds what its sequences need (4,096 tokens of an 8B Llama-3 in bf16 are
# 512 MiB), while `fastllm.LLM` grows it to the cap at once, as a server reserves memory.
INITIAL_NUM_KV_TOKENS = 4096
# Without a CUDA device there is no free-memory figure to cap the cache with: the CPU path (tests, laptops) may grow
# to this many tokens. The CPU cache is zero-filled (see `allocate_kv_cache`), so what it holds is committed memory:
# 16,384 tokens of SmolLM2-135M in fp32 (30 layers, 3 KV heads of 64) are 755 MB.
CPU_MAX_NUM_KV_TOKENS = 16384


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for. Nothing was allocated; the scheduler preempts or waits."""


class KVCacheTooLarge(ValueError, RuntimeError):
    """A cache size the user fixed (`num_kv_tokens`) that the device could not allocate. A ValueError, since a number
    the user passed is out of range for this device (the CLI prints it as one line), and a RuntimeError, which is
    what the allocator raised and what callers catching allocation failures catch."""


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
    - cached: refcount 0 but registered under a content key (`cache()`), so a later request with the same
      prefix can take it back (`lookup()` + `incref()`) instead of recomputing it. Cached blocks sit in an LRU
      set and are evicted, oldest first, when the free list is empty. They count as free in `num_free_blocks`.
    A held block may be registered too (its key stays with it while held, shared or not).

    Each registered block keeps its parent's key and its token ids, and `lookup()` serves a block only if both
    equal the asking request's: a key collision is a miss (counted in `num_hash_mismatches`), never a leak.
    Blocks registered under one key all hold the same content (`cache()` rejects another), so two requests
    that computed the same prefix at once both keep their blocks registered and chained.

    Why the parent *key* is enough to compare: a caller registers a block only when the block before it in
    its table is registered under the parent key (the scheduler's `_cache_blocks` does). Every holder of a
    block then also holds a block of its parent key, and frees its table tail first, so a key's last block
    is evicted after its children's (LRU). While a block is registered its parent key therefore still names
    blocks of the content its K/V was computed after, and the key cannot be taken by a colliding content.
    """

    def __init__(self, num_blocks: int, block_size: int, *, max_num_blocks: int | None = None,
                 grow: Callable[[int], int] | None = None) -> None:
        """
        Args:
            num_blocks: blocks to start with.
            max_num_blocks: the most the pool may grow to (default: `num_blocks`, a fixed pool).
            grow: `grow(target) -> blocks now backed`, called when free blocks run short and the pool is below its
                maximum: the owner of the cache tensors makes room for up to `target` blocks and returns how many
                it now has (at least the current number; fewer than `target` when memory ran short).
        """
        _check_int("num_blocks", num_blocks, 1)
        _check_int("block_size", block_size, 1)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_num_blocks = num_blocks if max_num_blocks is None else max_num_blocks
        _check_int("max_num_blocks", self.max_num_blocks, num_blocks)
        self._grow = grow
        self.num_growths = 0
        self.ref_counts = [0] * num_blocks
        # FIFO: a freed block is reused last, which lets a cached prefix survive longest.
        self._free_ids: deque[int] = deque(range(num_blocks))
        self.block_hashes: list[bytes | None] = [None] * num_blocks  # the key each registered block is under
        # Per registered block, what a hit must match: (parent key, packed token ids). About 250 bytes at block
        # size 16 (a 161-byte bytes object and a tuple; the parent key is shared with the child's request);
        # a block of K/V is 737 KB even for SmolLM2-135M in fp32 (46 KB a token), so the copy costs < 0.04%.
        self._block_contents: list[tuple[bytes | None, bytes] | None] = [None] * num_blocks
        # key -> its registered blocks (an ordered set; all of one content). `lookup()` serves the first.
        self._key_to_blocks: dict[bytes, dict[int, None]] = {}
        self._num_cached = 0
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, refcount 0; first = least recently used
        self.num_evictions = 0
        self.num_hash_mismatches = 0  # a key found holding other content, at lookup() or cache()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_ids) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, held or evictable."""
        return self._num_cached

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether `num_blocks` blocks can be taken now (growing the pool first if it is short and may grow)."""
        if num_blocks > self.num_free_blocks:
            self.try_grow(num_blocks - self.num_free_blocks)
        return num_blocks <= self.num_free_blocks

    def try_grow(self, shortfall: int) -> None:
        """Grow by at least `shortfall` blocks if the pool may: in large steps (to twice its size, capped at its
        maximum), so a run of growing requests costs few reallocations of the cache tensors."""
        if self._grow is None or self.num_blocks >= self.max_num_blocks:
            return
        target = min(self.max_num_blocks, max(self.num_blocks + shortfall, 2 * self.num_blocks))
        backed = self._grow(target)
        if backed <= self.num_blocks:
            return
        backed = min(backed, self.max_num_blocks)
        added = backed - self.num_blocks
        self.ref_counts += [0] * added
        self.block_hashes += [None] * added
        self._block_contents += [None] * added
        self._free_ids.extend(range(self.num_blocks, backed))
        self.num_blocks = backed
        self.num_growths += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks (refcount 1 each), free ones first, then evicting cached ones LRU (growing the
        pool first if it may).

        All or nothing: raises OutOfBlocks.
        """
        _check_int("num_blocks", num_blocks, 0)
        if num_blocks > self.num_free_blocks:
            self.try_grow(num_blocks - self.num_free_blocks)
        if num_blocks > self.num_free_blocks:
            raise OutOfBlocks(f"need {num_blocks} KV-cache blocks, {self.num_free_blocks} of {self.num_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            if self._free_ids:
                b = self._free_ids.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                self._uncache(b)
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

    def lookup(self, block_hash: bytes, parent_hash: bytes | None, token_ids: Sequence[int]) -> int | None:
        """The cached block under `block_hash` whose parent key and token ids are `parent_hash` and `token_ids`,
        or None. A block under that key with other content (a collision) is a miss, counted in
        `num_hash_mismatches`. Does not take the block: `incref()` does.

        The check packs `token_ids` and compares ~160 bytes: 512 hits (an 8k-token prompt, block size 16) take
        ~200 us, once per admission.
        """
        blocks = self._key_to_blocks.get(block_hash)
        if not blocks:
            return None
        block = next(iter(blocks))
        if self._block_contents[block] != (parent_hash, pack_token_ids(token_ids)):
            self.num_hash_mismatches += 1
            return None
        return block

    def cache(self, block: int, block_hash: bytes, parent_hash: bytes | None, token_ids: Sequence[int]) -> bool:
        """Register a held, full, computed block, whose K/V were computed after the prefix registered under
        `parent_hash` (None: the first block) and for `token_ids`, under `block_hash`.

        Returns whether it is registered. If blocks of the same content already are (two requests computed the
        same prefix at once), it joins them. If blocks of other content are (a collision), it is not, and the
        mismatch is counted: the caller must then register none of the blocks after it in its table, whose K/V
        were computed after content the key does not name. Re-registering a block as it is is a no-op.
        """
        if self.ref_counts[block] < 1:
            raise ValueError(f"cannot cache block {block}: it is not held")
        content = (parent_hash, pack_token_ids(token_ids))
        if self.block_hashes[block] is not None:
            if self.block_hashes[block] != block_hash or self._block_contents[block] != content:
                raise ValueError(f"block {block} is already cached under another hash or content "
                                 f"(rewritten while cached?)")
            return True
        blocks = self._key_to_blocks.setdefault(block_hash, {})
        if blocks and self._block_contents[next(iter(blocks))] != content:
            self.num_hash_mismatches += 1
            return False
        blocks[block] = None
        self.block_hashes[block], self._block_contents[block] = block_hash, content
        self._num_cached += 1
        return True

    def _uncache(self, block: int) -> None:
        """Drop an evicted block from the prefix cache, with its stored content."""
        key = self.block_hashes[block]
        blocks = self._key_to_blocks[key]
        del blocks[block]
        if not blocks:
            del self._key_to_blocks[key]
        self.block_hashes[block] = self._block_contents[block] = None
        self._num_cached -= 1

    def _check_held(self, counts: dict[int, int], action: str) -> None:
        for b, n in counts.items():
            if not (isinstance(b, int) and 0 <= b < self.num_blocks):
                raise ValueError(f"no block {b!r} in a pool of {self.num_blocks}")
            if action == "share" and b in self._evictable:
                continue
            if self.ref_counts[b] < n:
                raise ValueError(f"cannot {action} block {b} {n} time(s): its refcount is {self.ref_counts[b]}"
                                 + (" (double free?)" if action == "free" else ""))


# The first block's parent: 32 zero bytes, so that every digest input is a 32-byte parent then the tokens.
_ROOT_KEY = bytes(32)
_INT64S: dict[int, struct.Struct] = {}  # n -> packer of n little-endian int64s (one entry per block size)


def pack_token_ids(token_ids: Sequence[int]) -> bytes:
    """Token ids as fixed-width little-endian int64s: one encoding per list ([1, 23] and [12, 3] differ), the
    same on every host. Raises struct.error for an id outside int64."""
    n = len(token_ids)
    packer = _INT64S.get(n)
    if packer is None:
        packer = _INT64S[n] = struct.Struct(f"<{n}q")
    return packer.pack(*token_ids)


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: SHA-256 of its parent's key (32 bytes; None for the first block)
    then its packed token ids. Chained, so equal keys mean equal whole prefixes; a collision, which Python's
    64-bit tuple hash (used before) let an adversary craft, now needs a SHA-256 collision.

    Cost, pure Python on a shared CPU core: an 8,192-token prompt at block size 16 (512 blocks) takes
    360-420 us, against 77-85 us with `hash((parent, tuple(tokens)))`: ~50 ns a token, computed once per
    request (memoized), small next to the prefill of 8k tokens. SHA-256 (OpenSSL) beat blake2b (400-450 us)
    here, and struct.pack beat array('q').tobytes() (~430 us with SHA-256).
    """
    prefix = _ROOT_KEY if parent_hash is None else parent_hash
    if len(prefix) != len(_ROOT_KEY):
        raise ValueError(f"parent_hash must be a {len(_ROOT_KEY)}-byte key from hash_block, got {parent_hash!r}")
    return hashlib.sha256(prefix + pack_token_ids(token_ids)).digest()


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
    """How big the paged KV cache may grow.

    Args:
        block_size: token slots per block.
        kv_cache_memory_fraction: on CUDA, the share of the card's *total* memory that may be in use once the cache
            is at its largest (vLLM's convention): the cache's cap is that share minus what is in use when the model
            starts (its weights, other models, other processes) and its activations. In (0, 1].
        num_kv_tokens: an explicit, fixed cache size in tokens (rounded up to whole blocks) instead. Without it, a
            CPU cache may grow to `CPU_MAX_NUM_KV_TOKENS` tokens; other devices require it.
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

    @property
    def fixed(self) -> bool:
        """Whether the size is given (`num_kv_tokens`): the pool starts at it and never grows."""
        return self.num_kv_tokens is not None

    def initial_blocks(self) -> int:
        """Blocks a new cache starts with: `num_kv_tokens`, else `INITIAL_NUM_KV_TOKENS` (it grows on demand)."""
        return blocks_needed(self.num_kv_tokens or INITIAL_NUM_KV_TOKENS, self.block_size)


def kv_cache_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                             dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, K and V: 2 * layers * block_size * kv_heads * head_dim * itemsize."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def cap_num_blocks(*, total_bytes: int, free_bytes: int, fraction: float, reserved_bytes: int, held_blocks: int,
                   bytes_per_block: int) -> int:
    """The most blocks a cache may hold (vLLM's convention): at most `fraction` of the card's total memory may be in
    use, counting what is in use now (`total - free`, which includes this cache's `held_blocks`), and leaving
    `reserved_bytes` for activations and CUDA graphs. Never fewer than `held_blocks`."""
    if min(total_bytes, free_bytes, reserved_bytes, held_blocks) < 0 or not 0 < fraction <= 1 or bytes_per_block < 1:
        raise ValueError(f"invalid memory figures: total {total_bytes}, free {free_bytes}, fraction {fraction}, "
                         f"reserved {reserved_bytes}, held {held_blocks}, per block {bytes_per_block}")
    budget = fraction * total_bytes - (total_bytes - free_bytes) - reserved_bytes
    return held_blocks + max(0, int(budget) // bytes_per_block)


def max_num_blocks(config: KVCacheConfig, *, device: torch.device | str, bytes_per_block: int, held_blocks: int,
                   reserved_bytes: int = 0) -> int:
    """The cap of a cache that holds `held_blocks` now: `num_kv_tokens` if given; on the CPU
    `CPU_MAX_NUM_KV_TOKENS`; on CUDA `cap_num_blocks` of what `torch.cuda.mem_get_info` reports.

    Raises ValueError for another device type without `num_kv_tokens`.
    """
    import torch

    device = torch.device(device)
    if config.fixed:
        return held_blocks
    if device.type == "cpu":
        return max(held_blocks, blocks_needed(CPU_MAX_NUM_KV_TOKENS, config.block_size))
    if device.type != "cuda":
        raise ValueError(f"KVCacheConfig.num_kv_tokens is required on device type {device.type!r} "
                         f"(free memory is only measured on CUDA)")
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    return cap_num_blocks(total_bytes=total_bytes, free_bytes=free_bytes, fraction=config.kv_cache_memory_fraction,
                          reserved_bytes=reserved_bytes, held_blocks=held_blocks, bytes_per_block=bytes_per_block)


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
