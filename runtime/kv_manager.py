"""Which blocks each request holds, over a `BlockPool`, with prefix caching (vLLM v1's
KVCacheManager, one attention type, one block size).

Invariant: new K/V rows only ever go to blocks the request holds alone and that were not
cached before the step that writes them. A prefix hit covers only full blocks below the
first token still to compute, so the request's writes start in a block of its own; a block
is cached only once every one of its slots is scheduled, so the last, partial block is never
a cached one; shared (ref count > 1) and cached blocks are therefore only read.

Blocks are cached when their tokens are scheduled, before the step computes them. That is
safe because the scheduled step always runs, and within a layer it writes every new K/V row
before any attention reads the pool (contract: scatter, then gather), so a request that hits
a block in the same step reads the rows written in that step.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

import numpy as np

from llmc.runtime.kv_cache import BlockPool, KVBlock, blocks_needed, hash_block


class KVRequest(Protocol):
    """What the manager reads of a request."""

    request_id: Hashable
    all_token_ids: Sequence[int]   # prompt + generated so far
    num_computed_tokens: int       # tokens whose K/V are in the cache


class BlockTables:
    """Every request holding blocks has a row: its block ids in `array` (int32, then 0s),
    how many it holds (`held`), how many of those the prefix cache was offered (`cached`)
    and `until`, the most tokens the request can have before allocate_slots has anything to
    do for it (kept by the manager). The arrays grow as needed and are written only when a
    request gains or caches a block, so a step reads them with one fancy index, not a
    Python loop over each request's list (~300 us at 256 rows). A released row is zeroed,
    so unused entries stay valid block ids."""

    def __init__(self, rows: int = 16, cols: int = 16):
        self.array = np.zeros((rows, cols), np.int32)
        self.held = np.zeros(rows, np.int64)
        self.cached = np.zeros(rows, np.int64)
        self.until = np.zeros(rows, np.int64)
        self._free = list(range(rows - 1, -1, -1))

    def take(self) -> int:
        if not self._free:
            rows = len(self.array)
            self.array = np.concatenate([self.array, np.zeros_like(self.array)])
            for name in ("held", "cached", "until"):
                grown = np.concatenate([getattr(self, name), np.zeros(rows, np.int64)])
                setattr(self, name, grown)
            self._free = list(range(2 * rows - 1, rows - 1, -1))
        return self._free.pop()

    def put(self, row: int, block_ids: list[int]) -> None:
        """Append block ids to the row."""
        start = int(self.held[row])
        end = start + len(block_ids)
        self._widen(end)
        self.array[row, start:end] = block_ids
        self.held[row] = end

    def put_many(self, rows: np.ndarray, counts: list[int], block_ids: list[int]) -> None:
        """Append counts[i] block ids to row rows[i] (distinct rows), taking them from
        block_ids in order: what put does row by row, in a few numpy calls."""
        held = self.held[rows]
        end = held + counts
        self._widen(int(end.max()))
        if len(block_ids) == len(rows):   # one block each (a decode step)
            self.array[rows, held] = block_ids
        else:
            each = np.repeat(np.arange(len(rows)), counts)       # the row of each new id
            first = np.cumsum(counts) - counts                  # its first id's index
            self.array[rows[each], held[each] + np.arange(len(block_ids)) - first[each]] = \
                block_ids
        self.held[rows] = end

    def release(self, row: int) -> None:
        self.array[row] = 0
        self.held[row] = self.cached[row] = self.until[row] = 0
        self._free.append(row)

    def _widen(self, cols: int) -> None:
        if cols > self.array.shape[1]:
            wider = np.zeros((len(self.array), max(cols, 2 * self.array.shape[1])), np.int32)
            wider[:, :self.array.shape[1]] = self.array
            self.array = wider


class KVCacheManager:
    """Allocates a request's blocks step by step, reusing cached prefixes across requests.

    Counts prefix-cache lookups in tokens: `prefix_queries` (tokens of requests looked up)
    and `prefix_hits` (tokens found cached).
    """

    def __init__(self, pool: BlockPool, block_size: int, enable_prefix_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching and pool.enable_caching
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._blocks: dict[Hashable, list[KVBlock]] = {}
        self._hashes: dict[Hashable, list[int]] = {}   # hash chain of its full blocks so far
        self._rows: dict[Hashable, int] = {}           # its row of `tables`
        self.tables = BlockTables()

    def num_blocks_needed(self, num_tokens: int) -> int:
        return blocks_needed(num_tokens, self.block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        """False when even the whole, empty pool cannot hold num_tokens: such a request would
        wait forever, so the scheduler refuses it up front."""
        return self.num_blocks_needed(num_tokens) <= self.pool.num_blocks

    def block_ids(self, request: KVRequest) -> list[int]:
        return [b.block_id for b in self._blocks.get(request.request_id, ())]

    def rows_of(self, requests: Sequence[KVRequest]) -> np.ndarray:
        """Each request's row of `tables` (intp), -1 for one that holds no blocks."""
        return np.fromiter((self._rows.get(r.request_id, -1) for r in requests), np.intp,
                           len(requests))

    def block_tables(self, rows: np.ndarray) -> np.ndarray:
        """int32 [len(rows), >= their most blocks]: the block ids of these rows (`rows_of`
        requests that hold blocks), then 0s."""
        return self.tables.array[rows]

    def needs_slots(self, rows: np.ndarray, num_tokens: np.ndarray) -> np.ndarray:
        """bool [len(rows)]: False where a request (its `rows_of` row) already holds the
        blocks for its first num_tokens[i] tokens and none of them fills a block not yet
        cached, i.e. where allocate_slots up to num_tokens[i] would change nothing. One
        vector test over a decode step's running requests, instead of a call each."""
        return (num_tokens > self.tables.until[rows]) | (rows < 0)

    def get_computed_blocks(self, request: KVRequest) -> tuple[list[KVBlock], int]:
        """The longest cached run of the request's leading full blocks and the tokens they
        hold. Never the whole request: its last token is always computed again, because
        sampling needs that token's logits. Takes no reference: pass the blocks to
        `allocate_slots` before anything else allocates from the pool."""
        if not self.enable_prefix_caching:
            return [], 0
        num_tokens = len(request.all_token_ids)
        hashes = self._hash_chain(request, (num_tokens - 1) // self.block_size)
        hits = []
        for h in hashes:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: KVRequest, num_new_tokens: int,
                       computed_blocks: Sequence[KVBlock] = ()) -> list[KVBlock] | None:
        """Make the request's blocks cover its computed tokens, the cached prefix
        `computed_blocks` (from `get_computed_blocks`, for a request holding no blocks yet)
        and num_new_tokens more. Returns the newly allocated blocks, or None, changing
        nothing, when the pool cannot supply them. Then caches the blocks this filled."""
        rid = request.request_id
        held = self._blocks.get(rid, [])
        if held and not computed_blocks:   # the common decode step: often nothing to do
            if (request.num_computed_tokens + num_new_tokens
                    <= self.tables.until[self._rows[rid]]):
                return []
        computed = list(computed_blocks)
        if computed:
            self._check_hits(request, held, computed)
        num_tokens = (request.num_computed_tokens + len(computed) * self.block_size
                      + num_new_tokens)
        num_new = max(0, self.num_blocks_needed(num_tokens) - len(held) - len(computed))
        # A hit on a free block takes it out of the free queue, so it costs a free block too.
        num_revived = sum(1 for b in computed if b.ref_cnt == 0)
        if num_new + num_revived > self.pool.num_free_blocks:
            return None
        self.pool.touch(computed)
        new = self.pool.get_new_blocks(num_new)
        blocks = self._blocks.setdefault(rid, held)
        if computed or new:
            if rid not in self._rows:
                self._rows[rid] = self.tables.take()
            self.tables.put(self._rows[rid],
                            [b.block_id for b in computed] + [b.block_id for b in new])
        blocks += computed + new
        if computed:
            self.tables.cached[self._rows[rid]] = len(computed)
        self._cache_full(request, blocks, min(num_tokens, len(request.all_token_ids)))
        row = self._rows.get(rid)
        if row is not None:
            tables = self.tables
            tables.until[row] = self._until(int(tables.held[row]), int(tables.cached[row]))
        return new

    def allocate_running(self, requests: Sequence[KVRequest], rows: np.ndarray,
                         num_tokens: np.ndarray) -> bool:
        """allocate_slots(requests[i], num_tokens[i] - requests[i].num_computed_tokens) for
        each request in order, in one call, for requests that hold blocks (`rows`, their
        `rows_of` rows) and bring no cached prefix: the same blocks to the same requests, the
        same blocks cached. All or nothing: False, changing nothing, when the pool cannot
        supply every block (the calls one by one would have stopped at the first request
        that does not fit, keeping what those before it got).

        Built for a decode step, where one request in block_size opens a block and as many
        fill one: the free queue is popped and hashes are offered to the cache request by
        request, in order, since an eviction (a pop) and a hash offered to the cache decide
        each other's outcome; the block tables are written as numpy assignments."""
        bs, tables = self.block_size, self.tables
        # Python lists from here: a decode step brings ~2/block_size of its requests, and
        # a numpy call on a few dozen numbers costs more than a list comprehension.
        held, cached = tables.held[rows].tolist(), tables.cached[rows].tolist()
        num = num_tokens.tolist()
        if 0 in held:
            raise ValueError("allocate_running is for requests that hold blocks")
        opens = [max(0, -(-n // bs) - h) for n, h in zip(num, held)]
        if sum(opens) > self.pool.num_free_blocks:
            return False
        caching = self.enable_prefix_caching
        new_ids: list[int] = []
        for i, req in enumerate(requests):
            blocks = self._blocks[req.request_id]
            if opens[i]:
                new = self.pool.get_new_blocks(opens[i])
                blocks += new
                new_ids += [b.block_id for b in new]
            if caching and num[i] // bs > cached[i]:
                start, stop = cached[i], min(num[i], len(req.all_token_ids)) // bs
                hashes = self._hash_chain(req, stop)
                self.pool.cache_full_blocks(blocks[start:stop], hashes[start:stop])
                cached[i] = stop
        if new_ids:
            opened = [i for i, k in enumerate(opens) if k]
            tables.put_many(rows[opened], [opens[i] for i in opened], new_ids)
            held = [h + k for h, k in zip(held, opens)]
        tables.cached[rows] = cached
        tables.until[rows] = [self._until(h, c) for h, c in zip(held, cached)]
        return True

    def free(self, request: KVRequest) -> None:
        """Release the request's blocks, last block first, so its prefix stays cached
        longest; a request holding nothing (still waiting, or freed) is a no-op."""
        rid = request.request_id
        blocks = self._blocks.pop(rid, [])
        self._hashes.pop(rid, None)
        row = self._rows.pop(rid, None)
        if row is not None:
            self.tables.release(row)
        self.pool.free_blocks(reversed(blocks))

    def _until(self, held: int, cached: int) -> int:
        """`tables.until` of a row holding `held` blocks, `cached` of them offered to the
        prefix cache: up to held * block_size tokens nothing needs a block, and with prefix
        caching, below the end of the first block not yet offered nothing needs caching."""
        if self.enable_prefix_caching:
            return min(held * self.block_size, (cached + 1) * self.block_size - 1)
        return held * self.block_size

    def _check_hits(self, request: KVRequest, held: list[KVBlock],
                    computed: list[KVBlock]) -> None:
        if held or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id!r}: a cached prefix is only for a "
                             "request that holds no blocks yet")
        # A hit evicted between get_computed_blocks and here would now hold other tokens.
        hashes = self._hash_chain(request, len(computed))
        if any(b.block_hash != h for b, h in zip(computed, hashes, strict=True)):
            raise ValueError(f"request {request.request_id!r}: a computed block was evicted "
                             "after get_computed_blocks")

    def _cache_full(self, request: KVRequest, blocks: list[KVBlock], num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        row = self._rows.get(request.request_id)
        if row is None:   # holds no blocks
            return
        start, stop = int(self.tables.cached[row]), num_tokens // self.block_size
        if stop <= start:
            return
        hashes = self._hash_chain(request, stop)
        self.pool.cache_full_blocks(blocks[start:stop], hashes[start:stop])
        self.tables.cached[row] = stop

    def _hash_chain(self, request: KVRequest, num_blocks: int) -> list[int]:
        """Hashes of the request's first num_blocks full blocks, extended as tokens arrive:
        tokens are only ever appended, so a prefix's hashes never change."""
        chain = self._hashes.setdefault(request.request_id, [])
        tokens, size = request.all_token_ids, self.block_size
        for i in range(len(chain), num_blocks):
            chain.append(hash_block(chain[-1] if chain else None, tokens[i * size:(i + 1) * size]))
        return chain if len(chain) == num_blocks else chain[:num_blocks]
