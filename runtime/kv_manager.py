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

from llmc.runtime.kv_cache import (
    CHILD_STATE,
    BlockPool,
    KVBlock,
    blocks_needed,
    hash_packed,
    int32s,
)


class KVRequest(Protocol):
    """What the manager reads of a request. One that also has `tokens(start, n)` (a list of
    tokens start..start+n, as `Request` does) is read through it when blocks are hashed."""

    request_id: Hashable
    all_token_ids: Sequence[int]   # prompt + generated so far
    num_computed_tokens: int       # tokens whose K/V are in the cache


class BlockTables:
    """Every request holding blocks has a row: its block ids in `array` (int32, then 0s),
    how many it holds (`held`), how many of those the prefix cache was offered (`cached`)
    and `until`, the most tokens the request can have before allocate_slots has anything to
    do for it (kept by the manager). The array grows as needed and is written only when a
    request gains a block, so a step reads its tables with one fancy index, not a Python
    loop over each request's list (~300 us at 256 rows). A released row is zeroed, so
    unused entries stay valid block ids.

    `held`, `cached`, `until` and `last` (the id of the row's last block, 0 for none) are
    Python lists, one item a row: a decode step reads and writes them for the few dozen
    requests that open or fill a block, where a numpy call on so few numbers costs more
    (2-5 us each with the caches as a model step leaves them) than the list items; a vector
    test over all running requests takes `until` once per running set
    (`KVCacheManager.until_of`), and the scheduler keeps it."""

    def __init__(self, rows: int = 16, cols: int = 16):
        self.array = np.zeros((rows, cols), np.int32)
        self.held = [0] * rows
        self.cached = [0] * rows
        self.until = [0] * rows
        self.last = [0] * rows
        self._free = list(range(rows - 1, -1, -1))

    def take(self) -> int:
        if not self._free:
            rows = len(self.array)
            self.array = np.concatenate([self.array, np.zeros_like(self.array)])
            for column in (self.held, self.cached, self.until, self.last):
                column += [0] * rows
            self._free = list(range(2 * rows - 1, rows - 1, -1))
        return self._free.pop()

    def put(self, row: int, block_ids: list[int]) -> None:
        """Append block ids to the row."""
        start = self.held[row]
        end = start + len(block_ids)
        self._widen(end)
        self.array[row, start:end] = block_ids
        self.held[row] = end
        if block_ids:
            self.last[row] = block_ids[-1]

    def release(self, row: int) -> None:
        self.array[row] = 0
        self.held[row] = self.cached[row] = self.until[row] = self.last[row] = 0
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
        self._hashes: dict[Hashable, list[bytes]] = {}   # hash chain of its full blocks so far
        self._rows: dict[Hashable, int] = {}           # its row of `tables`
        # The tables are the one record of which blocks a request holds, in order: a step
        # that opens blocks writes them there alone, not into a list a request as well.
        self.tables = BlockTables()

    def num_blocks_needed(self, num_tokens: int) -> int:
        return blocks_needed(num_tokens, self.block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        """False when even the whole, empty pool cannot hold num_tokens: such a request would
        wait forever, so the scheduler refuses it up front."""
        return self.num_blocks_needed(num_tokens) <= self.pool.num_blocks

    def block_ids(self, request: KVRequest) -> list[int]:
        row = self._rows.get(request.request_id)
        if row is None:
            return []
        return self.tables.array[row, :self.tables.held[row]].tolist()

    def _held(self, request_id: Hashable) -> list[KVBlock]:
        """The request's blocks, in order."""
        row = self._rows.get(request_id)
        if row is None:
            return []
        blocks = self.pool.blocks
        return [blocks[i] for i in self.tables.array[row, :self.tables.held[row]].tolist()]

    def rows_of(self, requests: Sequence[KVRequest]) -> np.ndarray:
        """Each request's row of `tables` (intp), -1 for one that holds no blocks."""
        return np.fromiter((self._rows.get(r.request_id, -1) for r in requests), np.intp,
                           len(requests))

    def block_tables(self, rows: np.ndarray, num_tokens: int | None = None) -> np.ndarray:
        """int32 [len(rows), >= their most blocks]: the block ids of these rows (`rows_of`
        requests that hold blocks), then 0s; with num_tokens, only the columns that many
        tokens need (one copy of what a step reads, not of the table's whole width)."""
        if num_tokens is None:
            return self.tables.array[rows]
        return self.tables.array[rows, :self.num_blocks_needed(num_tokens)]

    def until_of(self, rows: np.ndarray) -> np.ndarray:
        """int32 [len(rows)]: `tables.until` of these rows (`rows_of` rows: requests that
        hold blocks). Where num_tokens[i] <= until_of(rows)[i], allocate_slots up to
        num_tokens[i] tokens would change nothing: the request already holds the blocks for
        them and none of them fills a block not yet cached. The scheduler keeps these for
        its running requests, and tests a decode step with one vector comparison, updating
        them from what `allocate_running` returns."""
        # int32, as the scheduler's token counts are: a comparison of one type is cheaper
        return np.fromiter(map(self.tables.until.__getitem__, rows.tolist()), np.int32,
                           len(rows))

    def get_computed_blocks(self, request: KVRequest) -> tuple[list[KVBlock], int]:
        """The longest cached run of the request's leading full blocks and the tokens they
        hold. Never the whole request: its last token is always computed again, because
        sampling needs that token's logits. Takes no reference: pass the blocks to
        `allocate_slots` before anything else allocates from the pool."""
        if not self.enable_prefix_caching:
            return [], 0
        num_tokens = len(request.all_token_ids)
        num_full = (num_tokens - 1) // self.block_size
        hits = []
        for h in self._hash_chain(request, num_full)[:num_full]:
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
        held = self._held(rid)
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
        if computed or new:
            if rid not in self._rows:
                self._rows[rid] = self.tables.take()
            self.tables.put(self._rows[rid],
                            [b.block_id for b in computed] + [b.block_id for b in new])
        if computed:
            self.tables.cached[self._rows[rid]] = len(computed)
        self._cache_full(request, held + computed + new,
                         min(num_tokens, len(request.all_token_ids)))
        row = self._rows.get(rid)
        if row is not None:
            tables = self.tables
            tables.until[row] = self._until(tables.held[row], tables.cached[row])
        return new

    def allocate_running(self, requests: Sequence[KVRequest], rows: Sequence[int],
                         num_tokens: Sequence[int] | None,
                         recent: bytes | None = None,
                         into: tuple[np.ndarray, Sequence[int]] | None = None
                         ) -> list[int] | None:
        """allocate_slots(requests[i], num_tokens[i] - requests[i].num_computed_tokens) for
        each request in order, in one call, for requests that hold blocks (`rows`, their
        `rows_of` rows), bring no cached prefix and have num_tokens[i] tokens (all of them
        scheduled): the same blocks to the same requests, the same blocks cached. Returns
        each request's `until` after the call. All or nothing: None, changing nothing, when
        the pool cannot supply every block (the calls one by one would have stopped at the
        first request that does not fit, keeping what those before it got). `rows` and
        `num_tokens` are lists or int arrays; num_tokens None means one token more than
        each request's `until` (a decode step's requests that `until_of` says need the
        manager, when each had at most `until` tokens the step before). `recent`, when the
        caller keeps them: each request's last block_size tokens (num_tokens[i] - block_size
        ..), packed as `hash_block` packs them, 4 * block_size bytes a request in order; a
        block ending at num_tokens[i] is then hashed from there, not read from the request.
        `into`, (table, at): the caller's own copy of these requests' block tables (the
        scheduler keeps one for decode steps, in batch order), wide enough for their new
        blocks: each new block id also goes to table[at[i], its column] for requests[i].

        Built for a decode step, where one request in block_size opens a block and as many
        fill one: the free queue is popped once for all of them, in the requests' order, and
        the rows' counts are Python list items (no numpy call). An eviction (a pop) and a
        hash offered to the cache decide each other's outcome, request by request in order:
        a request that fills a block whose hash a free cached block holds leaves its block
        uncached unless that free block was popped before it, by itself or an earlier
        request. The pops record which request evicted which hash, and the offers follow."""
        bs, tables, pool, caching = (self.block_size, self.tables, self.pool,
                                     self.enable_prefix_caching)
        # One Python pass over the rows works out every request's new counts; they are
        # written only once the pool is known to hold the blocks.
        rows_l = rows.tolist() if isinstance(rows, np.ndarray) else rows
        held_l, cached_l = tables.held, tables.cached
        if num_tokens is None:
            until_l = tables.until
            totals = [until_l[row] + 1 for row in rows_l]
        else:
            totals = num_tokens.tolist() if isinstance(num_tokens, np.ndarray) else num_tokens
        counts: list[tuple[int, int, int, int]] = []   # (row, held, cached, until) each
        # The new blocks' owners and table cells, in the order the pops hand them out.
        owner: list[int] = []
        cell_rows: list[int] = []
        cell_cols: list[int] = []
        fills: list[tuple[int, int, int]] = []   # (request, first block, stop) to offer
        decode = True   # every fill offers one block, the request's last one
        given: list[bytes | None] = []   # with decode: each fill's bytes from `recent`
        width = 4 * bs
        for i, (row, total) in enumerate(zip(rows_l, totals)):
            held, cached = held_l[row], cached_l[row]
            if not held or row < 0:
                raise ValueError("allocate_running is for requests that hold blocks")
            want = -(-total // bs)
            if want > held:
                if want == held + 1:   # a decode step
                    owner.append(i)
                    cell_rows.append(row)
                    cell_cols.append(held)
                else:
                    owner += [i] * (want - held)
                    cell_rows += [row] * (want - held)
                    cell_cols += range(held, want)
                held = want
            until = held * bs   # _until, inlined (no `min` call: a few dozen a step)
            if caching:
                stop = total // bs
                if stop > cached:
                    fills.append((i, cached, stop))
                    if stop != cached + 1 or stop != held:
                        decode = False
                    given.append(recent[i * width:(i + 1) * width]
                                 if recent is not None and stop * bs == total else None)
                    cached = stop
                if cached * bs + (bs - 1) < until:
                    until = cached * bs + (bs - 1)
            counts.append((row, held, cached, until))
        num_new = len(owner)
        if num_new > pool.num_free_blocks:
            return None   # nothing written yet
        evicted: dict[bytes, int] = {}   # hash -> the request whose pop took it out
        if num_new:
            new = pool.get_new_blocks(num_new, evicted)
            tables._widen(max(cell_cols) + 1)
            array, last = tables.array, tables.last
            ids = [b.block_id for b in new]
            if num_new <= 32:   # cell by cell: cheaper than making three index arrays
                for row, col, block in zip(cell_rows, cell_cols, ids):
                    array[row, col] = last[row] = block
                if into is not None:
                    table, at = into
                    for i, col, block in zip(owner, cell_cols, ids):
                        table[at[i], col] = block
            else:
                array[cell_rows, cell_cols] = ids
                for row, block in zip(cell_rows, ids):   # a row's cells come in order
                    last[row] = block
                if into is not None:
                    table, at = into
                    table[[at[i] for i in owner], cell_cols] = ids
            if evicted:
                evicted = {h: owner[j] for h, j in evicted.items()}
        if fills:
            self._offer(requests, rows_l, fills, evicted, given if decode else None)
        until_l = tables.until
        for row, held, cached, until in counts:
            held_l[row], cached_l[row], until_l[row] = held, cached, until
        return [c[3] for c in counts]

    def _offer(self, requests: Sequence[KVRequest], rows: list[int],
               fills: list[tuple[int, int, int]], evicted: dict[bytes, int],
               decode: list[bytes | None] | None) -> None:
        """allocate_running's cache offers: for each (i, start, stop) of `fills`, in order,
        requests[i] (its table row rows[i]) offers its blocks start..stop-1. `decode`, when
        each offers one block, its last: each one's bytes where known, else None. Hashes do
        not depend on the cache, so the step's are computed first; the offers then go to
        the pool in one call, in order. A hash that a later request's pop evicted is held by
        a free block now: that offer is dropped (see allocate_running)."""
        pool_blocks = self.pool.blocks
        blocks = []
        hashes = []
        if decode is not None:
            # One block each, the row's last, its hash the next link of the request's chain:
            # one pass, one BLAKE2b each (what `hash_packed` computes), no list a stage.
            size, chains, last = self.block_size, self._hashes, self.tables.last
            pack, child = int32s(size).pack, CHILD_STATE.copy
            for (i, start, _), body in zip(fills, decode):
                request = requests[i]
                chain = chains.get(request.request_id)
                if chain and len(chain) == start:   # the chain lacks just this block
                    if body is None:
                        body = pack(*_read(request, start * size, size))
                    h = child()
                    h.update(chain[-1])
                    h.update(body)
                    h = h.digest()
                    chain.append(h)
                else:   # its first block, or a chain that lacks more or has it already
                    h = self._hash_chain(request, start + 1)[start]
                if not evicted or evicted.get(h, -1) <= i:
                    blocks.append(pool_blocks[last[rows[i]]])
                    hashes.append(h)
            self.pool.cache_full_blocks(blocks, hashes)
            return
        array = self.tables.array
        chains = self._hash_chains([requests[i] for i, _, _ in fills],
                                   [stop for _, _, stop in fills])
        for (i, start, stop), chain in zip(fills, chains):
            ids = array[rows[i], start:stop].tolist()
            offered = chain[start:stop]
            if evicted:
                keep = [j for j, h in enumerate(offered) if evicted.get(h, -1) <= i]
                ids, offered = [ids[j] for j in keep], [offered[j] for j in keep]
            blocks += [pool_blocks[b] for b in ids]
            hashes += offered
        self.pool.cache_full_blocks(blocks, hashes)

    def free(self, request: KVRequest) -> None:
        """Release the request's blocks, last block first, so its prefix stays cached
        longest; a request holding nothing (still waiting, or freed) is a no-op."""
        rid = request.request_id
        blocks = self._held(rid)
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
        hashes = self._hash_chain(request, len(computed))[:len(computed)]
        if any(b.block_hash != h for b, h in zip(computed, hashes, strict=True)):
            raise ValueError(f"request {request.request_id!r}: a computed block was evicted "
                             "after get_computed_blocks")

    def _cache_full(self, request: KVRequest, blocks: list[KVBlock], num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        row = self._rows.get(request.request_id)
        if row is None:   # holds no blocks
            return
        start, stop = self.tables.cached[row], num_tokens // self.block_size
        if stop <= start:
            return
        hashes = self._hash_chain(request, stop)
        self.pool.cache_full_blocks(blocks[start:stop], hashes[start:stop])
        self.tables.cached[row] = stop

    def _hash_chain(self, request: KVRequest, num_blocks: int) -> list[bytes]:
        """Hashes of the request's first num_blocks full blocks (`hash_block`), extended as
        tokens arrive: tokens are only ever appended, so a prefix's hashes never change.
        Returns the request's whole chain, which may run past num_blocks: slice it."""
        return self._hash_chains([request], [num_blocks])[0]

    def _hash_chains(self, requests: Sequence[KVRequest], num_blocks: list[int]) -> list:
        """`_hash_chain` of many requests in one call (a decode step fills a block of
        ~1/block_size of its requests)."""
        size, pack, chains = self.block_size, int32s(self.block_size).pack, self._hashes
        out = []
        for request, n in zip(requests, num_blocks):
            chain = chains.get(request.request_id)
            if chain is None:
                chain = chains[request.request_id] = []
            if len(chain) < n:
                parent = chain[-1] if chain else None
                for i in range(len(chain), n):
                    parent = hash_packed(parent, pack(*_read(request, i * size, size)))
                    chain.append(parent)
            out.append(chain)
        return out


def _read(request: KVRequest, start: int, n: int) -> Sequence[int]:
    """Tokens start..start+n of a request, which must have them all (a full block): a
    `Request` reads a span without building the whole sequence's view."""
    read = getattr(request, "tokens", None)
    block = read(start, n) if read is not None else request.all_token_ids[start:start + n]
    if len(block) != n:   # only full blocks have a hash
        raise ValueError(f"request {request.request_id!r} has no block {start // n} yet")
    return block
