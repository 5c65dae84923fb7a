"""The scheduler: which requests run in the next step, and how many tokens each brings.

One token budget a step (`max_num_tokens`), no separate prefill and decode phases (vLLM v1):
each request's computed-token count catches up with its token count, a prompt in chunks of
what the budget leaves, a running request one token a step. Order:

1. running requests, oldest first; when the KV cache has no room for one, the running request
   that matters least (highest priority value, then latest arrival) is preempted by
   recompute: its blocks are freed and it goes back to the front of the waiting queue (its
   generated tokens are kept and recomputed with the prompt);
2. waiting requests by (priority, arrival), while there are blocks, budget and batch rows:
   a prompt whose leading full blocks are in the prefix cache skips their prefill.

A request that scores its prompt (prompt_logprobs) skips the prefix cache while it scores:
every prompt position's logits are needed, and a step returns those of a sequence's last
token alone. So it brings its prompt tokens in one-token rows of their own that share its
block table (`StepPlan.split`), each row's logits scoring the next prompt token: as many as
the step's rows leave after one for every running and waiting request, at least one. After
a preemption, the part already scored comes back in one chunk (`Request.chunk_limit`).

A request that could never fit the cache is refused when it is added, alone.

A request with guesses of its next tokens (`Request.draft`, speculative decoding) brings them
too, as far as the budget and the pool allow; without room they are dropped, never a reason
to preempt. Such steps are planned request by request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

from llmc.limits import BuildLimits
from llmc.runtime.request import Request, Status

_PROMPT = attrgetter("prompt_token_ids")
_OUTPUT = attrgetter("output_token_ids")
_COMPUTED = attrgetter("num_computed_tokens")
RING = np.dtype("<i4")   # the bytes `hash_block` packs a token into
# Row k: k + 1, for the context lengths of the next decode steps (see `Scheduler._ahead`).
_AHEAD = np.arange(1, 17, dtype=np.int32)[:, None]


@dataclass(slots=True)   # (no instance dict: made every step)
class StepPlan:
    """The requests of one step, each with the number of new tokens it computes."""

    # A list; at a decode step from the persistent batch, a tuple kept from step to step.
    scheduled: Sequence[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # For the array path: the scheduled requests' rows of the KV manager's tables, their
    # computed tokens and their new ones (int arrays), so the engine need not gather them
    # again; None when requests were scheduled one by one.
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # With `arrays`, when the scheduler knows them: each request's last token (int32), the
    # one a decode step feeds (every request then brings exactly one); else None.
    last_tokens: np.ndarray | None = None
    context_lens: np.ndarray | None = None   # with last_tokens: computed + 1 (int32)
    longest: int | None = None               # with context_lens: their maximum
    # With context_lens: the step's block tables, int32 [B, ceil(longest / block_size)]: the
    # scheduler's own copy, which it writes again at its next plan.
    tables: np.ndarray | None = None
    serial: int = -1   # the scheduler's `_serial` when the plan was made (see `commit`)
    # Requests whose n new tokens go in n one-token rows (a prompt being scored) -> n, and
    # the rows the step has beyond one a request (these and requests' guesses).
    split: dict = field(default_factory=dict)
    extra_rows: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, kv, limits: BuildLimits):
        self.kv = kv                      # runtime.kv_cache.KVCacheManager
        self.limits = limits
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
        # The running requests' KV table rows (an array and a list) and prompt lengths,
        # which change only when a request joins or leaves `running` (`_changed`).
        self._fixed: tuple[np.ndarray, list[int], np.ndarray, bool] | None = None
        # The running requests' `until` in the KV manager's tables (`until_of`), in
        # `running` order: what `allocate_running` returns keeps it up to date; None when
        # something else may have changed it (the request-by-request loop, a change of
        # `running`), and then read again.
        self._until: np.ndarray | None = None
        # The tokens the last commits recorded, one row a commit, in `running` order, each
        # row twice (at c % block_size and block_size later), so the last block_size commits
        # are always one slice; `_recorded` counts the commits in it, from the last one that
        # did not follow a decode step (see `_recent`).
        self._ring: np.ndarray | None = None
        self._recorded = 0
        # The persistent batch (vLLM v1's InputBatch): the running requests' computed tokens
        # and last token, in `running` order, as `commit` left them after the last step, so
        # a decode step need not read hundreds of Request objects; None when unknown (then
        # they are read from the requests, and the next commit sets them again). Third, the
        # longest context of the next step (computed + 1), so a decode step takes no
        # maximum; None once a request has left (the step then takes one).
        self._next: tuple[np.ndarray, np.ndarray, int | None] | None = None
        # Counts plans made and changes of `running`: a plan whose serial is not the
        # current one cannot be committed.
        self._serial = 0
        self._decode: tuple[tuple, np.ndarray] | None = None   # (req, 1) each, and 1s
        # The running requests' block tables in `running` order, as the last decode step
        # handed them to the session (vLLM v1's persistent block table): the next decode
        # step has `allocate_running` write its new blocks there too, instead of gathering
        # 256 rows from the KV manager's tables. None unless the last plan was such a step.
        self._table: np.ndarray | None = None
        # The context lengths of the next decode steps, made in one call every len(_AHEAD)
        # steps (row k: the computed counts then + 1 + k), and the row of the next step: a
        # step takes its row, a view, where an add of its own would be its first and so
        # coldest numpy call (~8 us). Kept on the same terms as `_table`.
        self._ahead: tuple[np.ndarray, int] | None = None
        # Running requests that may still score their prompt (a chunk limit): while one does,
        # steps are planned request by request (the array path brings every remainder).
        self._scoring: set[Request] = set()
        # Set by the engine before `schedule`: some running request has guesses.
        self.drafting = False

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request: Request) -> None:
        """Take a request out (finished, aborted, failed) and free its blocks."""
        try:
            i = self.running.index(request)
        except ValueError:
            pass
        else:
            del self.running[i]
            self._serial += 1
            # The others keep their counters: drop the request's entry from each array,
            # rather than read every request again at the next step.
            if self._fixed is not None:
                rows, rows_l, prompt_lens, usable = self._fixed
                self._fixed = (np.delete(rows, i), rows_l[:i] + rows_l[i + 1:],
                               np.delete(prompt_lens, i), usable)
            if self._until is not None:
                self._until = np.delete(self._until, i)
            if self._ring is not None:
                self._ring = np.delete(self._ring, i, axis=1)
            if self._next is not None:   # the longest context may have left: recount it
                computed, last, _ = self._next
                self._next = (np.delete(computed, i), np.delete(last, i), None)
            self._decode = self._table = self._ahead = None
        if request in self.waiting:
            self.waiting.remove(request)
        self._scoring.discard(request)
        self.kv.free(request)

    def commit(self, plan: StepPlan, tokens: np.ndarray) -> None:
        """The caller has run `plan` (the last plan made) and sampled `tokens` (one per
        scheduled request, in order): it is about to add each request's new tokens to its
        computed count and append its sampled token, as it does after every step. For a plan
        of the array path that is every request's whole remainder, so each one's computed
        count becomes its old token count and its last token the sampled one: the next step
        reads both from here, and the KV manager records the sampled tokens for the blocks
        they fill (so `tokens` must be what the caller appends). Not calling this is always
        safe: the next step then reads the requests themselves, and the manager reads a
        block's tokens from its request."""
        if plan.arrays is None or plan.serial != self._serial:
            self._next = None   # not the last plan, or `running` changed: read the requests
            self._recorded = 0
            return
        rows, computed, new = plan.arrays
        tokens = np.array(tokens, np.int32)
        # `at`: where the sampled tokens go, the next step's computed counts (a decode
        # step's are its context lengths). The next step's longest context: at a decode
        # step every context grows by one, and so does the longest.
        if plan.context_lens is not None:
            at, longest = plan.context_lens, plan.longest + 1
        else:
            at = computed + new
            longest = int(at.max()) + 1
        self._record(tokens, plan.last_tokens is not None)
        self._next = (at, tokens, longest)

    def _record(self, tokens: np.ndarray, decode: bool) -> None:
        """Keep the sampled tokens for the blocks they fill. After a committed decode step
        (`decode`: its plan came from the last commit) every request's new token follows the
        one the last commit recorded, so the last block_size commits hold each request's
        last block_size tokens; any other commit starts the count again."""
        bs, n = self.kv.block_size, len(tokens)
        if not decode or self._ring is None or self._ring.shape[1] != n:
            if self._ring is None or self._ring.shape[1] != n:
                self._ring = np.empty((2 * bs, n), RING)
            self._recorded = 0
        slot = self._recorded % bs
        self._ring[slot] = tokens   # two plain row copies: cheaper than one fancy write
        self._ring[slot + bs] = tokens
        self._recorded += 1

    def _recent(self, need: np.ndarray) -> bytes | None:
        """The last block_size tokens of the running requests `need` (indices), packed as
        `hash_block` packs them, when the last block_size commits recorded them all; else
        None. Only for a decode step from the last commit: each request's last token is the
        last one recorded."""
        bs = self.kv.block_size
        if self._recorded < bs:
            return None
        start = self._recorded % bs   # the oldest of the last bs commits
        # Gathered through the transpose, so the copy is already a request a row.
        return self._ring.T[need, start:start + bs].tobytes()

    def _changed(self) -> None:
        """`running` gained or lost requests other than through `remove`."""
        self._fixed = self._next = self._decode = self._until = self._ring = None
        self._table = self._ahead = None
        self._recorded = 0
        self._serial += 1

    def schedule(self) -> StepPlan:
        self._serial += 1
        plan = StepPlan()
        budget = self._running_at_once(plan) if self.running else None
        if budget is None:
            budget = self._running_each(plan)
        # No admissions in a step that had to preempt (nor any with nothing waiting).
        if plan.preempted or not self.waiting:
            return plan
        self.waiting.sort(key=lambda r: (r.priority, r.arrival_time))
        if isinstance(plan.scheduled, tuple):   # the kept decode list
            plan.scheduled = list(plan.scheduled)
        while (self.waiting and budget
               and len(self.running) + plan.extra_rows < self.limits.max_batch_size):
            req = self.waiting[0]
            limit = req.chunk_limit()
            computed, num_cached = (self.kv.get_computed_blocks(req) if limit is None
                                    else ([], 0))
            n = min(req.num_tokens - num_cached, budget, limit or budget)
            if limit == 1:   # (its own row is counted among the waiting)
                n = self._score_rows(req, budget, plan.extra_rows)
            if self.kv.allocate_slots(req, n, computed) is None:
                break
            self.waiting.pop(0)
            if req.num_computed_tokens == 0 and req.num_preemptions == 0:
                req.num_cached_prompt_tokens = num_cached
            req.num_computed_tokens = num_cached
            req.status = Status.RUNNING
            self.running.append(req)
            if limit is not None:
                self._scoring.add(req)
            self._changed()
            plan.scheduled.append((req, n))
            if limit == 1 and n > 1:
                plan.split[req] = n
                plan.extra_rows += n - 1
            plan.arrays = plan.last_tokens = plan.context_lens = plan.longest = None
            plan.tables = None
            budget -= n
        return plan

    def _running_each(self, plan: StepPlan) -> int:
        """Step 1, request by request, preempting where the pool runs out; returns the
        budget left."""
        budget = self.limits.max_num_tokens
        self._until = None   # allocate_slots below may change it
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:   # preempted below to make room for an older
                continue                           # one (a status test: `in` is O(batch))
            limit = req.chunk_limit()
            n = min(req.num_tokens - req.num_computed_tokens, budget, limit or budget)
            if req.draft:   # as many guesses as the budget and the rows leave
                rows = self.limits.max_batch_size - len(self.running) - plan.extra_rows
                del req.draft[max(0, min(budget - n, rows)):]
                if req.draft and self.kv.allocate_slots(req, n + len(req.draft)) is not None:
                    plan.scheduled.append((req, n + len(req.draft)))
                    plan.extra_rows += len(req.draft)
                    budget -= n + len(req.draft)
                    continue
                req.draft = []
            elif limit == 1:   # scoring its prompt: a row a token, if there is room
                m = self._score_rows(req, budget, plan.extra_rows)
                if m > 1 and self.kv.allocate_slots(req, m) is not None:
                    plan.scheduled.append((req, m))
                    plan.split[req] = m
                    plan.extra_rows += m - 1
                    budget -= m
                    continue
            while self.kv.allocate_slots(req, n) is None:
                victim = self._victim()
                self._preempt(victim, plan)
                if victim is req:
                    break
            else:
                plan.scheduled.append((req, n))
                budget -= n
        return budget

    def _running_at_once(self, plan: StepPlan) -> int | None:
        """Step 1 for the common case, over arrays: the budget covers every running request's
        remaining tokens, and those that need a block or fill one (at a decode step, one in
        block_size opens one and as many fill one) go to the KV manager in one call. Returns
        the budget left, or None when the budget is short or the pool runs out; the loop
        then decides, from the state it would have started from (the call is all or
        nothing).

        After a committed step of this path every running request has computed all its
        tokens and has one more, its last sampled one: the counters then come from the
        commit, and no Request object is read."""
        running, n = self.running, len(self.running)
        if self._fixed is None:   # the running set changed since the last step
            rows = self.kv.rows_of(running)
            # A running request always holds blocks; were one not to, the loop decides
            # (allocate_running is for requests that do).
            self._fixed = (rows, rows.tolist(),
                           np.fromiter(map(len, map(_PROMPT, running)), np.int32, n),
                           n > 0 and rows.min() >= 0)
        rows, rows_l, prompt_lens, usable = self._fixed
        known, self._next = self._next, None   # only a commit of this step sets it again
        # Only a decode plan of this path keeps these, and only a step from its commit
        # takes them: the step after one not committed reads the requests, and its new
        # blocks may lie past the kept tables' width.
        table, self._table = self._table, None
        ahead, self._ahead = self._ahead, None
        if known is None:
            table = ahead = None
        if not usable or self.drafting:
            return None
        if self._scoring:   # requests that still score their prompt: planned by the loop
            self._scoring = {r for r in self._scoring if r.chunk_limit() is not None}
            if self._scoring:
                return None
        if known is not None:   # the last step computed every token and sampled one more
            computed, last, longest = known
            # With `ahead` kept, the last plan was a decode step of this path: `computed`,
            # its context lengths as committed, is the row before ahead[1].
            if ahead is None or ahead[1] == len(_AHEAD):
                ahead = (computed + _AHEAD, 0)
            total = ahead[0][ahead[1]]   # computed + 1
            if longest is None:
                longest = int(total.max())
            if table is not None and table.shape[1] != -(-longest // self.kv.block_size):
                table = None   # the longest context opens a block: gathered wider below
            if self._decode is None:   # the same from step to step, for the same requests
                self._decode = (tuple(zip(running, [1] * n)), np.ones(n, np.int32))
            scheduled, new = self._decode
            used = n
        else:
            # map over attrgetters runs in C: a generator's frame per request costs 4x as
            # much.
            computed = np.fromiter(map(_COMPUTED, running), np.int32, n)
            total = prompt_lens + np.fromiter(map(len, map(_OUTPUT, running)), np.int32, n)
            new, last = total - computed, None
            scheduled = None
            used = int(new.sum())
            if not new.all():
                return None
        if used > self.limits.max_num_tokens:
            return None
        until = self._until
        if until is None:
            until = self._until = self.kv.until_of(rows)
        # Those that need a block or fill one: as many numpy calls whatever their number,
        # then Python lists for the few dozen a decode step brings. (`nonzero` rather than
        # `flatnonzero`, which adds a Python call and a `ravel`.)
        need = (total > until).nonzero()[0]
        if need.size:
            which = need.tolist()
            # After a committed step every request had at most `until` tokens (its last
            # allocation covered them) and now has one more: those picked have until + 1,
            # which the manager reads from its tables.
            untils = self.kv.allocate_running(
                [running[i] for i in which], [rows_l[i] for i in which],
                total[need].tolist() if known is None else None,
                None if known is None else self._recent(need),
                None if table is None else (table, which))
            if untils is None:
                return None
            until[need] = untils
        # The kept one is a tuple, which nothing can change: admissions make a list of it.
        plan.scheduled = list(zip(running, new.tolist())) if scheduled is None else scheduled
        plan.arrays = (rows, computed, new)
        plan.last_tokens = last
        if last is not None:
            if table is None:   # gathered after the allocation, so it holds the new blocks
                table = self.kv.block_tables(rows, longest)
            plan.context_lens, plan.longest, plan.tables = total, longest, table
            self._table, self._ahead = table, (ahead[0], ahead[1] + 1)
        plan.serial = self._serial
        return self.limits.max_num_tokens - used

    def _score_rows(self, req: Request, budget: int, extra: int) -> int:
        """The tokens a request that scores its prompt may bring as one-token rows: one row
        for every running and waiting request first (a waiting one: itself too)."""
        rows = self.limits.max_batch_size - len(self.running) - len(self.waiting) - extra
        return min(req.num_tokens - req.num_computed_tokens, budget, 1 + max(0, rows))

    def _victim(self) -> Request:
        return max(self.running, key=lambda r: (r.priority, r.arrival_time))

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.running.remove(req)
        self._scoring.discard(req)
        self._changed()
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, req)
        plan.preempted.append(req)
        plan.scheduled = [(r, n) for r, n in plan.scheduled if r is not req]
        plan.split.pop(req, None)
