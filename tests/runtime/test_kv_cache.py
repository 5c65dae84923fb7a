"""KV cache stack: exact block ids and free-queue order on a dozen blocks, then random
operation sequences checked against a model of what each block holds."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmc.runtime.kv_cache import BlockPool, FreeBlockQueue, KVBlock, hash_block, int32s
from llmc.runtime.kv_manager import BlockTables, KVCacheManager

BS = 4


@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    prompt_len: int = field(init=False)

    def __post_init__(self):
        self.prompt_len = len(self.all_token_ids)


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_queue]


def pool_state(pool: BlockPool):
    return (free_ids(pool), [(b.ref_cnt, b.block_hash) for b in pool.blocks],
            pool.num_cached_blocks)


def manager(num_blocks=12, caching=True) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks), BS, enable_prefix_caching=caching)


def admit(mgr: KVCacheManager, req: Req) -> int:
    """Look up, allocate the rest of the prompt, and mark it computed, as a scheduler would."""
    hits, n = mgr.get_computed_blocks(req)
    assert mgr.allocate_slots(req, len(req.all_token_ids) - n, hits) is not None
    req.num_computed_tokens = len(req.all_token_ids)
    return n


def test_free_queue_is_a_linked_list():
    blocks = [KVBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert [b.block_id for b in q] == [0, 1, 3, 4] and q.num_free == 4
    assert q.popleft() is blocks[0]
    q.append(blocks[2])
    q.append_n([blocks[0]])
    assert [b.block_id for b in q] == [1, 3, 4, 2, 0] and len(q) == 5
    with pytest.raises(ValueError, match="already in the free queue"):
        q.append(blocks[3])
    assert q.popleft_n(2) == [blocks[1], blocks[3]] and [b.block_id for b in q] == [4, 2, 0]
    assert blocks[1].prev_free is blocks[1].next_free is blocks[3].next_free is None
    q.append(blocks[1])                               # unlinked: it can join again
    assert [b.block_id for b in q] == [4, 2, 0, 1] and q.popleft_n(0) == []
    with pytest.raises(IndexError):
        q.popleft_n(5)
    assert q.popleft_n(4) == [blocks[4], blocks[2], blocks[0], blocks[1]] and len(q) == 0
    with pytest.raises(IndexError):
        q.popleft()
    with pytest.raises(ValueError, match="not in the free queue"):
        q.remove(blocks[1])


def test_allocation_order_and_lru_reuse():
    pool = BlockPool(12)
    a, b = pool.get_new_blocks(3), pool.get_new_blocks(2)
    assert [x.block_id for x in a] == [0, 1, 2] and [x.block_id for x in b] == [3, 4]
    assert free_ids(pool) == list(range(5, 12)) and pool.usage == pytest.approx(5 / 12)
    pool.free_blocks(b)
    pool.free_blocks(a)
    # freed earlier = reused earlier: the never-used blocks first, then b's, then a's
    assert free_ids(pool) == [5, 6, 7, 8, 9, 10, 11, 3, 4, 0, 1, 2]
    assert [x.block_id for x in pool.get_new_blocks(9)] == [5, 6, 7, 8, 9, 10, 11, 3, 4]
    with pytest.raises(ValueError, match="4 blocks requested, 3 free"):
        pool.get_new_blocks(4)
    with pytest.raises(ValueError, match="freed more often than held"):
        pool.free_blocks([pool.blocks[0]])


def test_request_blocks_are_freed_tail_first():
    mgr = manager()
    mgr.allocate_slots(Req("x", list(range(10))), 10)
    assert mgr.block_ids(Req("x", [])) == [0, 1, 2]
    mgr.free(Req("x", []))
    assert free_ids(mgr.pool) == list(range(3, 12)) + [2, 1, 0]
    mgr.free(Req("x", []))   # freeing twice, or a request never allocated, is a no-op
    assert mgr.pool.num_free_blocks == 12


def test_prefix_hit_reuses_physical_blocks():
    mgr = manager()
    pool = mgr.pool
    a = Req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert admit(mgr, a) == 0 and mgr.block_ids(a) == [0, 1, 2]
    # blocks 0 and 1 are full and cached; block 2 (2 of 4 slots) is not
    assert [pool.blocks[i].block_hash is not None for i in range(3)] == [True, True, False]
    b = Req("b", [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0])
    assert admit(mgr, b) == 8 and mgr.block_ids(b) == [0, 1, 3]
    assert [pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    assert (mgr.prefix_queries, mgr.prefix_hits) == (21, 8)
    mgr.free(a)
    assert [pool.blocks[i].ref_cnt for i in range(4)] == [1, 1, 0, 1]
    mgr.free(b)
    assert free_ids(pool) == list(range(4, 12)) + [2, 3, 1, 0]
    # a third request hits blocks 1 and 0 while they sit free: they leave the queue's middle
    c = Req("c", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert admit(mgr, c) == 8 and mgr.block_ids(c) == [0, 1, 4]
    assert free_ids(pool) == list(range(5, 12)) + [2, 3]
    assert pool.blocks[0].ref_cnt == pool.blocks[1].ref_cnt == 1


def test_whole_prompt_is_never_a_hit():
    mgr = manager()
    admit(mgr, Req("a", list(range(8))))
    # all 8 tokens are cached, but the last must be computed again to get logits
    hits, n = mgr.get_computed_blocks(Req("b", list(range(8))))
    assert [b.block_id for b in hits] == [0] and n == 4
    hits, n = mgr.get_computed_blocks(Req("c", list(range(9))))
    assert [b.block_id for b in hits] == [0, 1] and n == 8


def test_eviction_drops_the_hash():
    mgr = manager(num_blocks=4)
    pool = mgr.pool
    admit(mgr, Req("a", list(range(9))))     # blocks 0, 1 cached; 2 partial
    h0 = pool.blocks[0].block_hash
    mgr.free(Req("a", []))
    assert free_ids(pool) == [3, 2, 1, 0] and pool.get_cached_block(h0) is pool.blocks[0]
    mgr.allocate_slots(Req("b", [7] * 13), 13)   # 4 blocks: evicts 1, then 0
    assert mgr.block_ids(Req("b", [])) == [3, 2, 1, 0]
    # 1 now holds b's third full block; 0, b's partial last block, is uncached
    assert pool.get_cached_block(h0) is None and pool.blocks[0].block_hash is None
    hits, _ = mgr.get_computed_blocks(Req("c", list(range(9))))
    assert hits == []


def test_allocate_slots_when_full_changes_nothing():
    mgr = manager()
    pool = mgr.pool
    a = Req("a", list(range(10)))
    admit(mgr, a)
    mgr.free(a)
    b = Req("b", list(range(30, 66)))
    admit(mgr, b)                               # 9 blocks: 2, 1, 0 stay free and cached
    before = pool_state(pool)
    c = Req("c", list(range(10)) + [99] * 8)
    hits, n = mgr.get_computed_blocks(c)
    assert [x.block_id for x in hits] == [0, 1] and pool.num_free_blocks == 3
    # 3 new blocks would fit, but the 2 hits leave the free queue too
    assert mgr.allocate_slots(c, len(c.all_token_ids) - n, hits) is None
    assert mgr.allocate_slots(b, 13) is None    # 49 tokens: 13 blocks, 4 more than b holds
    assert pool_state(pool) == before
    assert mgr.block_ids(c) == [] and len(mgr.block_ids(b)) == 9


def test_partial_last_block_is_cached_once_full():
    mgr = manager()
    pool = mgr.pool
    a = Req("a", [5, 6, 7, 8, 9, 10])
    admit(mgr, a)
    assert pool.blocks[1].block_hash is None
    for token in (11, 12):   # decode: the sampled token is scheduled the next step
        a.all_token_ids.append(token)
        mgr.allocate_slots(a, 1)
        a.num_computed_tokens += 1
    assert pool.blocks[1].block_hash == hash_block(pool.blocks[0].block_hash, [9, 10, 11, 12])
    a.all_token_ids.append(13)
    assert mgr.allocate_slots(a, 1) == [pool.blocks[2]] and pool.blocks[2].block_hash is None


def test_hash_chain():
    a, b = hash_block(None, [1, 2, 3, 4]), hash_block(None, [1, 2, 3, 5])
    assert hash_block(a, [9, 9, 9, 9]) != hash_block(b, [9, 9, 9, 9])
    # a root block is not the child of a parent whose hash is all zeros
    assert hash_block(None, [1, 2, 3, 4]) == a != hash_block(bytes(16), [1, 2, 3, 4])
    assert isinstance(a, bytes) and len(a) == 16
    # the same value in another process: no per-process hash salt
    code = ("from llmc.runtime.kv_cache import hash_block; "
            "print(hash_block(None, [1, 2, 3, 4]).hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert bytes.fromhex(out.stdout.strip()) == a


def test_caching_off_and_ever_fits():
    mgr = manager(caching=False)
    admit(mgr, Req("a", list(range(9))))
    assert all(b.block_hash is None for b in mgr.pool.blocks)
    assert mgr.get_computed_blocks(Req("b", list(range(9)))) == ([], 0)
    assert mgr.can_ever_fit(48) and not mgr.can_ever_fit(49)
    assert mgr.num_blocks_needed(9) == 3


def test_hits_must_be_taken_before_they_are_evicted():
    mgr = manager(num_blocks=3)
    admit(mgr, Req("a", list(range(5))))
    mgr.free(Req("a", []))
    c = Req("c", list(range(6)))
    hits, _ = mgr.get_computed_blocks(c)
    mgr.allocate_slots(Req("x", [0] * 12), 12)   # takes every block, evicting the hit
    mgr.free(Req("x", []))
    with pytest.raises(ValueError, match="evicted after get_computed_blocks"):
        mgr.allocate_slots(c, 2, hits)


# Property tests: a model of the scheduler's use of the manager, with what each block holds.

NUM_BLOCKS = 12
BASES = ([1, 2, 1, 2, 3, 3, 1, 2, 2, 1, 3, 1, 1, 2, 3, 3], [1, 2, 1, 2, 2, 2, 2, 2, 3, 1])


class KVMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.mgr = manager(NUM_BLOCKS)
        self.pool = self.mgr.pool
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.next_id = 0
        self.content: dict[int, list[int | None]] = {}   # block id -> token per slot
        self.frozen: dict[int, tuple[int, list[int]]] = {}  # cached block -> (hash, content)

    @rule(base=st.sampled_from(BASES), keep=st.integers(0, 16),
          tail=st.lists(st.integers(1, 3), max_size=6))
    def add_request(self, base, keep, tail):
        prompt = base[:keep] + tail or [1]
        req = Req(f"r{self.next_id}", prompt)
        self.next_id += 1
        if self.mgr.can_ever_fit(len(prompt) + 4):
            self.waiting.append(req)

    @precondition(lambda self: self.waiting)
    @rule(i=st.integers(0, 9), chunk=st.integers(1, 12))
    def schedule_waiting(self, i, chunk):
        req = self.waiting[i % len(self.waiting)]
        hits, n = self.mgr.get_computed_blocks(req)
        assert n == len(hits) * BS < len(req.all_token_ids)
        for j, block in enumerate(hits):   # a hit holds exactly this request's tokens
            assert self.content[block.block_id] == req.all_token_ids[j * BS:(j + 1) * BS]
        todo = min(chunk, len(req.all_token_ids) - n)
        if self.step(req, todo, hits):
            self.waiting.remove(req)
            self.running.append(req)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 9), chunk=st.integers(1, 12), token=st.integers(1, 3))
    def step_running(self, i, chunk, token):
        req = self.running[i % len(self.running)]
        left = len(req.all_token_ids) - req.num_computed_tokens
        if not self.step(req, min(chunk, left), ()):
            self.preempt(req)
        elif req.num_computed_tokens == len(req.all_token_ids):
            req.all_token_ids.append(token)   # sampled from the last token's logits
            if len(req.all_token_ids) >= req.prompt_len + 4:
                self.running.remove(req)
                self.mgr.free(req)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 9))
    def preempt_running(self, i):
        self.preempt(self.running[i % len(self.running)])

    @precondition(lambda self: self.waiting or self.running)
    @rule(i=st.integers(0, 19))
    def abort(self, i):
        queue = self.waiting + self.running
        req = queue[i % len(queue)]
        (self.waiting if req in self.waiting else self.running).remove(req)
        self.mgr.free(req)

    def preempt(self, req):
        self.running.remove(req)
        self.mgr.free(req)
        req.num_computed_tokens = 0
        self.waiting.append(req)

    def snapshot(self):
        return pool_state(self.pool), [self.mgr.block_ids(r) for r in self.waiting + self.running]

    def step(self, req, n, hits) -> bool:
        """Allocate for n new tokens after the hits and write them, as the engine would."""
        was_cached = {b.block_id for b in self.pool.blocks if b.block_hash is not None}
        before = self.snapshot()
        new = self.mgr.allocate_slots(req, n, hits)
        if new is None:
            assert self.snapshot() == before
            return False
        for block in new:   # evicted if it was cached: new contents from here on
            assert block.ref_cnt == 1
            was_cached.discard(block.block_id)
            self.content[block.block_id] = [None] * BS
            self.frozen.pop(block.block_id, None)
        table = self.mgr.block_ids(req)
        req.num_computed_tokens += len(hits) * BS
        for pos in range(req.num_computed_tokens, req.num_computed_tokens + n):
            bid = table[pos // BS]
            # the write invariant: an unshared block that was not cached before this step
            assert self.pool.blocks[bid].ref_cnt == 1 and bid not in was_cached
            self.content[bid][pos % BS] = req.all_token_ids[pos]
        req.num_computed_tokens += n
        return True

    @invariant()
    def blocks_are_accounted_for(self):
        free = free_ids(self.pool)
        assert len(free) == len(set(free)) == self.pool.num_free_blocks
        assert all(self.pool.blocks[i].ref_cnt == 0 for i in free)
        holders: dict[int, list[tuple[Req, int]]] = {}
        for req in self.waiting + self.running:
            table = self.mgr.block_ids(req)
            assert len(table) == len(set(table))
            assert len(table) == -(-req.num_computed_tokens // BS)
            for j, bid in enumerate(table):
                holders.setdefault(bid, []).append((req, j))
        # no leak: every block is free or held, never both
        assert set(free).isdisjoint(holders) and len(free) + len(holders) == NUM_BLOCKS
        for bid, held in holders.items():
            block = self.pool.blocks[bid]
            assert block.ref_cnt == len(held)
            if len(held) > 1:   # shared only through the cache: same hash, same prefix
                assert block.block_hash is not None
                (r0, j0), rest = held[0], held[1:]
                for r, j in rest:
                    assert j == j0
                    assert r.all_token_ids[:(j + 1) * BS] == r0.all_token_ids[:(j + 1) * BS]

    @invariant()
    def tables_say_what_the_requests_hold(self):
        mgr = self.mgr
        for req in self.waiting + self.running:
            ids = mgr.block_ids(req)
            row = mgr.rows_of([req])[0]
            if not ids:
                continue
            held, cached = len(ids), int(mgr.tables.cached[row])
            assert mgr.tables.array[row, :held].tolist() == ids
            assert mgr.tables.held[row] == held and mgr.tables.last[row] == ids[-1]
            assert mgr.tables.until[row] == min(held * BS, (cached + 1) * BS - 1)

    @invariant()
    def held_blocks_hold_the_requests_tokens(self):
        for req in self.waiting + self.running:
            for pos in range(req.num_computed_tokens):
                bid = self.mgr.block_ids(req)[pos // BS]
                assert self.content[bid][pos % BS] == req.all_token_ids[pos]

    @invariant()
    def cached_blocks_never_change(self):
        for block in self.pool.blocks:
            if block.block_hash is None:
                assert block.block_id not in self.frozen
                continue
            assert self.pool.get_cached_block(block.block_hash) is block
            content = self.content[block.block_id]
            assert None not in content
            frozen = self.frozen.setdefault(block.block_id, (block.block_hash, list(content)))
            assert frozen == (block.block_hash, content)


KVMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40,
                                       deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
TestKVMachine = KVMachine.TestCase


def test_block_tables_grow_and_release_rows():
    tables = BlockTables(rows=2, cols=2)
    a, b, c = tables.take(), tables.take(), tables.take()    # the third doubles the rows
    assert (a, b, c) == (0, 1, 2) and tables.array.shape == (4, 2)
    tables.put(a, [7, 8])
    tables.put(a, [9])                                        # wider: the columns double
    tables.put(c, [5])
    tables.cached[a] = 2
    assert tables.array.shape == (4, 4) and [tables.held[r] for r in (a, b, c)] == [3, 0, 1]
    assert tables.array[[a, c]].tolist() == [[7, 8, 9, 0], [5, 0, 0, 0]]
    tables.release(a)
    assert not tables.array[a].any() and tables.held[a] == tables.cached[a] == 0
    assert tables.take() == a                                 # zeroed, then reused


def running_state(mgr: KVCacheManager, reqs: list[Req]):
    rows = mgr.rows_of(reqs)
    t = mgr.tables
    return (pool_state(mgr.pool), [mgr.block_ids(r) for r in reqs], t.array[rows].tolist(),
            [(t.held[r], t.cached[r], t.until[r], t.last[r]) for r in rows.tolist()],
            mgr.until_of(rows).tolist())


def allocate_both_ways(mgr: KVCacheManager, reqs: list[Req]):
    """allocate_running for every request's tokens not yet computed, and allocate_slots
    request by request on a copy; returns (its result, the loop's, the state before,
    each state after)."""
    before = copy.deepcopy((mgr, reqs))
    loop_mgr, loop_reqs = copy.deepcopy((mgr, reqs))
    kept_mgr, kept_reqs = copy.deepcopy((mgr, reqs))
    totals = np.array([len(r.all_token_ids) for r in reqs])
    untils = mgr.allocate_running(reqs, mgr.rows_of(reqs), totals)
    done = untils is not None
    if done:   # what it returns is each request's `until` now
        assert untils == mgr.until_of(mgr.rows_of(reqs)).tolist()
    # The same, handed each request's last BS tokens (zeros before its first), as a
    # scheduler that keeps them does: blocks ending there hash from those bytes.
    last = [([0] * BS + list(r.all_token_ids))[-BS:] for r in kept_reqs]
    recent = b"".join(int32s(BS).pack(*t) for t in last)
    # And with a copy of the tables to keep up (`into`), its rows in reverse order: the
    # new blocks land there too.
    rows = kept_mgr.rows_of(kept_reqs)
    width = max(kept_mgr.num_blocks_needed(len(r.all_token_ids)) for r in kept_reqs)
    table = kept_mgr.block_tables(rows[::-1], width * BS)
    at = list(range(len(reqs)))[::-1]
    assert kept_mgr.allocate_running(kept_reqs, rows, totals, recent, (table, at)) == untils
    assert running_state(kept_mgr, kept_reqs) == running_state(mgr, reqs)
    assert table.tolist() == kept_mgr.block_tables(rows[::-1], width * BS).tolist()
    loop_done = all(loop_mgr.allocate_slots(r, len(r.all_token_ids) - r.num_computed_tokens)
                    is not None for r in loop_reqs)
    return (done, loop_done, running_state(*before), running_state(mgr, reqs),
            running_state(loop_mgr, loop_reqs))


def test_allocate_running_opens_and_fills_in_request_order():
    """A hash offered to the cache and an eviction decide each other's outcome: a request
    filling a block whose hash a free block holds, before a later request pops that block,
    leaves its own block uncached, as allocate_slots one by one does."""
    mgr = manager(num_blocks=4)
    admit(mgr, Req("p", [1, 2, 3, 4]))               # block 0, cached
    mgr.free(Req("p", []))
    a, b, d = Req("a", [1, 2, 3]), Req("b", [7, 7, 7, 7]), Req("d", [8])
    for req in (a, b, d):                            # blocks 1, 2, 3: block 0 is next to go
        admit(mgr, req)
    h0 = mgr.pool.blocks[0].block_hash
    assert free_ids(mgr.pool) == [0] and h0 == hash_block(None, [1, 2, 3, 4])
    a.all_token_ids.append(4)                        # a fills block 1 with block 0's tokens
    b.all_token_ids.append(5)                        # b opens a block: it pops block 0
    done, loop_done, _, after, loop_after = allocate_both_ways(mgr, [a, b])
    assert done and loop_done and after == loop_after
    assert mgr.block_ids(a) == [1] and mgr.block_ids(b) == [2, 0]
    assert mgr.pool.blocks[1].block_hash is None and mgr.pool.get_cached_block(h0) is None
    # the other way round, b pops block 0 first, and a's block takes the hash
    mgr = manager(num_blocks=4)
    admit(mgr, Req("p", [1, 2, 3, 4]))
    mgr.free(Req("p", []))
    a, b, d = Req("a", [1, 2, 3]), Req("b", [7, 7, 7, 7]), Req("d", [8])
    for req in (a, b, d):
        admit(mgr, req)
    a.all_token_ids.append(4)
    b.all_token_ids.append(5)
    done, loop_done, _, after, loop_after = allocate_both_ways(mgr, [b, a])
    assert done and loop_done and after == loop_after
    assert mgr.pool.get_cached_block(h0) is mgr.pool.blocks[1]


def test_allocate_running_opens_many_blocks_at_once():
    """More new blocks than the cell-by-cell writes take (a batch whose requests all open
    a block in one step): one fancy write each, to the manager's tables and to `into`."""
    reqs = [Req(f"r{i}", [i % 3 + 1] * (2 * BS)) for i in range(40)]
    done, loop_done, _, after, loop_after = allocate_both_ways(
        _admitted(manager(num_blocks=120), reqs), [_grown(r, 1) for r in reqs])
    assert done and loop_done and after == loop_after
    assert [len(ids) for ids in after[1]] == [3] * 40   # 40 new blocks, one each
    assert len({ids[-1] for ids in after[1]}) == 40


def _admitted(mgr: KVCacheManager, reqs: list[Req]) -> KVCacheManager:
    for req in reqs:
        admit(mgr, req)
    return mgr


def _grown(req: Req, n: int) -> Req:
    req.all_token_ids += [9] * n
    return req


def test_allocate_running_is_all_or_nothing():
    mgr = manager(num_blocks=4)
    a, b = Req("a", [1, 2, 3, 4]), Req("b", [5, 6, 7, 8])
    admit(mgr, a)
    admit(mgr, b)
    a.all_token_ids += [9] * 5                       # 2 blocks more each: 4, 2 are free
    b.all_token_ids += [9] * 5
    done, loop_done, before, after, _ = allocate_both_ways(mgr, [a, b])
    assert not done and not loop_done and after == before
    with pytest.raises(ValueError, match="hold blocks"):
        mgr.allocate_running([Req("c", [1])], np.array([-1]), np.array([1]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=st.lists(st.lists(st.integers(1, 2), min_size=1, max_size=13), min_size=1,
                        max_size=7),
       freed=st.lists(st.booleans(), min_size=7, max_size=7),
       extra=st.lists(st.lists(st.integers(1, 2), max_size=9), min_size=7, max_size=7),
       num_blocks=st.integers(3, 16), caching=st.booleans())
def test_allocate_running_is_allocate_slots_in_order(prompts, freed, extra, num_blocks,
                                                     caching):
    """Over random pools (cached free blocks, shared prefixes, two tokens so hashes repeat):
    the same blocks, hashes, free-queue order and tables as the calls one by one, or, when
    the pool is short, nothing changed."""
    mgr = manager(num_blocks, caching)
    running = []
    for i, prompt in enumerate(prompts):
        req = Req(f"r{i}", list(prompt))
        hits, n = mgr.get_computed_blocks(req)
        if mgr.allocate_slots(req, len(prompt) - n, hits) is None:
            continue
        req.num_computed_tokens = len(prompt)
        if freed[i]:
            mgr.free(req)
        else:
            running.append(req)
    for req, tokens in zip(running, extra):
        req.all_token_ids += tokens
    if not running:
        return
    done, loop_done, before, after, loop_after = allocate_both_ways(mgr, running)
    assert done == loop_done
    assert after == (loop_after if done else before)
