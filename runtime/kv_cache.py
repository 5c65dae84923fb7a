"""Paged KV cache bookkeeping: a pool of fixed-size blocks and each sequence's block table.

The device-side pool lives in the backend; this module only decides which physical block
holds which tokens. The later in-flight-batching runtime grows this into the vLLM-style
block -> free queue -> pool -> manager layering; for now one free list is all it takes.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Hands out physical block ids; ``allocate`` returns None when the pool is too empty."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
