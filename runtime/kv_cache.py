"""Paged KV cache bookkeeping, the pool layer: blocks, the free queue, the block pool.

The device-side pool lives in the backend; this module only decides which physical block
holds which tokens. The layering follows vLLM v1: `KVBlock` (one physical block's metadata),
`FreeBlockQueue` (eviction order), `BlockPool` (allocation, ref counts, the prefix-cache hash
map). Which blocks a request holds, and which of them are cached, is `kv_manager.py`'s job.

A block's identity in the cache is `hash_block(parent, tokens)`: the hash of a FULL block's
tokens chained with the hash of the block before it, so equal hashes mean equal prefixes.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Iterator, Sequence
from hashlib import blake2b


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """A full block's prefix identity: the 16-byte BLAKE2b digest of the parent's hash and
    the token ids. Python's `hash` is salted per process over bytes, and easy to collide on
    purpose over ints and tuples; this is neither, so a hash means the same thing in every
    process (and in a test's expected values).

    Why this is collision-safe enough: equal hashes are taken as equal prefixes, so a
    collision would hand one request another's K/V. BLAKE2b is a cryptographic hash: at 128
    bits an accidental collision among even 2^40 cached blocks has odds of about 2^-49, and
    a prompt crafted to match an existing block's hash needs a second preimage (~2^128
    tries). That is the strength of vLLM's default (sha256); BLAKE2b is a little cheaper
    here (CPython's own code, no OpenSSL call in between), and the tokens go in as int32,
    half the bytes of the int64 packing before. The digest stays bytes (it keys the cache
    as well as an int would), so chaining a block to its parent converts nothing."""
    # The marker byte keeps a root block apart from a child of any parent; after it the
    # parent is fixed-width (16 bytes), and token ids are below 2^31 (struct refuses
    # anything else), so the bytes determine the block.
    return hash_packed(parent_hash, int32s(len(token_ids)).pack(*token_ids))


def hash_packed(parent_hash: bytes | None, body: bytes) -> bytes:
    """`hash_block` of tokens already packed by `int32s` (a caller hashing many blocks of one
    size keeps the packer)."""
    if parent_hash is None:
        h = _ROOT_STATE.copy()
    else:
        h = CHILD_STATE.copy()
        h.update(parent_hash)
    h.update(body)
    return h.digest()


ROOT, CHILD = b"\x00", b"\x01"   # what precedes a block's tokens: nothing, or its parent
# BLAKE2b states that have hashed the marker byte: a copy of one is cheaper than a new
# state (no keyword arguments to parse, no parameter block to set up): a quarter to a
# third of the cost of hashing a block of 16 tokens. Only ever copied, never updated.
_ROOT_STATE, CHILD_STATE = blake2b(ROOT, digest_size=16), blake2b(CHILD, digest_size=16)


@functools.cache
def int32s(n: int) -> struct.Struct:
    """Packs n token ids as little-endian int32 (the bytes `hash_block` hashes)."""
    return struct.Struct(f"<{n}i")


class KVBlock:
    """One physical block's metadata; `block_id` is its index in the device pool."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0                       # requests holding it; 0 = in the free queue
        self.block_hash: bytes | None = None   # set once full and cached, cleared on eviction
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        h = "" if self.block_hash is None else f", hash={self.block_hash.hex()}"
        return f"KVBlock({self.block_id}, ref_cnt={self.ref_cnt}{h})"


class FreeBlockQueue:
    """The free blocks in eviction order: the head is reused first (least recently freed).

    A doubly linked list through the blocks' own `prev_free`/`next_free`, not a deque: a free
    block may still be cached, and when a new request hits it in the prefix cache it must
    leave the queue from wherever it sits. A deque removes from the middle in O(n); unlinking
    a node is O(1), and so is every other operation here.
    """

    def __init__(self, blocks: Iterable[KVBlock] = ()):
        # Sentinels at both ends, so no operation has to special-case an empty list.
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free = 0
        self.append_n(blocks)

    def __len__(self) -> int:
        return self.num_free

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not self._tail:
            yield node
            node = node.next_free

    def popleft(self) -> KVBlock:
        if self.num_free == 0:
            raise IndexError("no free blocks")
        block = self._head.next_free
        self.remove(block)
        return block

    def popleft_n(self, n: int) -> list[KVBlock]:
        """The first n blocks, unlinked in one splice (what n popleft calls return)."""
        if n > self.num_free:
            raise IndexError(f"{n} blocks wanted, {self.num_free} free")
        out = []
        node = self._head.next_free
        for _ in range(n):
            out.append(node)
            node.prev_free, node = None, node.next_free
        for block in out:
            block.next_free = None
        self._head.next_free, node.prev_free = node, self._head
        self.num_free -= n
        return out

    def remove(self, block: KVBlock) -> None:
        if block.prev_free is None or block.next_free is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def append(self, block: KVBlock) -> None:
        if block.prev_free is not None or block.next_free is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        last = self._tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free += 1

    def append_n(self, blocks: Iterable[KVBlock]) -> None:
        for block in blocks:
            self.append(block)


class BlockPool:
    """All physical blocks 0..num_blocks-1: allocation, ref counts and the prefix cache.

    A block whose ref count drops to 0 goes to the free queue but keeps its hash: it stays in
    the cache, reusable by a prefix hit (`touch`), until `get_new_blocks` pops it for new
    contents (eviction). One block per hash: a second block that fills with the same prefix
    (two requests computed it at once) stays uncached and is simply reused when freed.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"a pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self._cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_new_blocks(self, n: int, evicted: dict[bytes, int] | None = None) -> list[KVBlock]:
        """n blocks with ref count 1, least recently freed first. Raises ValueError when
        fewer than n are free: callers check `num_free_blocks` first, as the manager does,
        so running short here is a bookkeeping bug, not back-pressure. `evicted`, if given,
        gets {hash: index in the result} of each block that this took out of the cache."""
        if n > self.num_free_blocks:
            raise ValueError(f"{n} blocks requested, {self.num_free_blocks} free")
        out = self.free_queue.popleft_n(n)
        for i, block in enumerate(out):
            if block.block_hash is not None:
                if evicted is not None:
                    evicted[block.block_hash] = i
                self._evict(block)
            block.ref_cnt = 1
        return out

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; those no longer held join the free queue's
        tail in the order given, still cached. Callers pass a request's blocks tail first, so
        its prefix, the part other requests are likeliest to share, is evicted last."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than held")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference on each (a prefix hit); a free cached block leaves the
        free queue, so it can no longer be evicted."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache_full_blocks(self, blocks: Sequence[KVBlock], block_hashes: Sequence[bytes]) -> None:
        """Enter full blocks into the prefix cache under their hashes; a block already cached
        keeps its entry, a hash already held by another block leaves this one uncached."""
        if not self.enable_caching:
            return
        for block, h in zip(blocks, block_hashes, strict=True):
            if block.block_hash is not None:
                if block.block_hash != h:
                    raise ValueError(f"block {block.block_id} is cached under another hash")
                continue
            if h not in self._cached:
                block.block_hash = h
                self._cached[h] = block

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
