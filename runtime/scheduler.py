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

A request that could never fit the cache is refused when it is added, alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

from llmc.limits import BuildLimits
from llmc.runtime.request import Request, Status

_PROMPT = attrgetter("prompt_token_ids")
_OUTPUT = attrgetter("output_token_ids")
_COMPUTED = attrgetter("num_computed_tokens")


@dataclass
class StepPlan:
    """The requests of one step, each with the number of new tokens it computes."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
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
    serial: int = -1   # the scheduler's `_serial` when the plan was made (see `commit`)

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
        # The running requests' KV table rows and prompt lengths, which change only when a
        # request joins or leaves `running` (`_changed`).
        self._fixed: tuple[np.ndarray, np.ndarray, bool] | None = None
        # The persistent batch (vLLM v1's InputBatch): the running requests' computed tokens
        # and last token, in `running` order, as `commit` left them after the last step, so
        # a decode step need not read hundreds of Request objects; None when unknown (then
        # they are read from the requests, and the next commit sets them again). Third, the
        # longest context of that step when known (a decode step's is the last one's + 1),
        # so a decode step takes no maximum; else None.
        self._next: tuple[np.ndarray, np.ndarray, int | None] | None = None
        # Counts plans made and changes of `running`: a plan whose serial is not the
        # current one cannot be committed.
        self._serial = 0
        self._decode: tuple[list, np.ndarray] | None = None   # (req, 1) each, and 1s

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
                rows, prompt_lens, usable = self._fixed
                self._fixed = (np.delete(rows, i), np.delete(prompt_lens, i), usable)
            if self._next is not None:   # the longest context may have left: recount it
                computed, last, _ = self._next
                self._next = (np.delete(computed, i), np.delete(last, i), None)
            self._decode = None
        if request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)

    def commit(self, plan: StepPlan, tokens: np.ndarray) -> None:
        """The caller has run `plan` (the last plan made) and sampled `tokens` (one per
        scheduled request, in order): it is about to add each request's new tokens to its
        computed count and append its sampled token, as it does after every step. For a plan
        of the array path that is every request's whole remainder, so each one's computed
        count becomes its old token count and its last token the sampled one: the next step
        reads both from here. Not calling this is always safe: the next step then reads the
        requests themselves."""
        if plan.arrays is None or plan.serial != self._serial:
            self._next = None   # not the last plan, or `running` changed: read the requests
            return
        _, computed, new = plan.arrays
        # A decode step: every context grows by one, and so does the longest.
        longest = None if plan.longest is None else plan.longest + 1
        self._next = (computed + new, np.array(tokens, np.int32), longest)

    def _changed(self) -> None:
        """`running` gained or lost requests other than through `remove`."""
        self._fixed = self._next = self._decode = None
        self._serial += 1

    def schedule(self) -> StepPlan:
        self._serial += 1
        plan = StepPlan()
        budget = self._running_at_once(plan) if self.running else None
        if budget is None:
            budget = self._running_each(plan)
        if plan.preempted:   # no admissions in a step that had to preempt
            return plan
        self.waiting.sort(key=lambda r: (r.priority, r.arrival_time))
        while self.waiting and budget and len(self.running) < self.limits.max_batch_size:
            req = self.waiting[0]
            computed, num_cached = self.kv.get_computed_blocks(req)
            n = min(req.num_tokens - num_cached, budget)
            if self.kv.allocate_slots(req, n, computed) is None:
                break
            self.waiting.pop(0)
            if req.num_computed_tokens == 0 and req.num_preemptions == 0:
                req.num_cached_prompt_tokens = num_cached
            req.num_computed_tokens = num_cached
            req.status = Status.RUNNING
            self.running.append(req)
            self._changed()
            plan.scheduled.append((req, n))
            plan.arrays = plan.last_tokens = plan.context_lens = plan.longest = None
            budget -= n
        return plan

    def _running_each(self, plan: StepPlan) -> int:
        """Step 1, request by request, preempting where the pool runs out; returns the
        budget left."""
        budget = self.limits.max_num_tokens
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:   # preempted below to make room for an older
                continue                           # one (a status test: `in` is O(batch))
            n = min(req.num_tokens - req.num_computed_tokens, budget)
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
            self._fixed = (rows, np.fromiter(map(len, map(_PROMPT, running)), np.int32, n),
                           n > 0 and rows.min() >= 0)
        rows, prompt_lens, usable = self._fixed
        known, self._next = self._next, None   # only a commit of this step sets it again
        if not usable:
            return None
        if known is not None:   # the last step computed every token and sampled one more
            computed, last, longest = known
            total = computed + 1
            if longest is None:
                longest = int(total.max())
            if self._decode is None:   # the same from step to step, for the same requests
                self._decode = (list(zip(running, [1] * n)), np.ones(n, np.int32))
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
        need = np.flatnonzero(self.kv.needs_slots(rows, total))
        if need.size and not self.kv.allocate_running([running[i] for i in need.tolist()],
                                                      rows[need], total[need]):
            return None
        # A copy of the kept list: admissions append to the plan's.
        plan.scheduled = (list(zip(running, new.tolist())) if scheduled is None
                          else scheduled.copy())
        plan.arrays = (rows, computed, new)
        plan.last_tokens = last
        if last is not None:
            plan.context_lens, plan.longest = total, longest
        plan.serial = self._serial
        return self.limits.max_num_tokens - used

    def _victim(self) -> Request:
        return max(self.running, key=lambda r: (r.priority, r.arrival_time))

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.running.remove(req)
        self._changed()
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, req)
        plan.preempted.append(req)
        plan.scheduled = [(r, n) for r, n in plan.scheduled if r is not req]
