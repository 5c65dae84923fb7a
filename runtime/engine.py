"""The engine core: requests in, steps over the session, outputs out.

    engine = LLMEngine(session, header)                     synchronous, one thread
    engine.add_request("The capital of France is", SamplingParams(max_tokens=16))
    while engine.has_unfinished():
        for out in engine.step(): ...                        RequestOutput per request

A step asks the scheduler which requests run, packs their new tokens into the contract's
inputs, runs the session, samples (on the device when the session samples and every row's
settings are ones it supports, else on the host over the logits; a structured output's
masks, computed meanwhile, banned in either place: runtime/structured.py), then appends tokens,
checks stops and frees what finished. A request that fails (bad settings, a prompt that can
never fit, a failing detokenizer) errors alone; the others go on.

With `speculative`, a decoding request may bring guesses of its next tokens, each in a row
of its own, and keep as many of the rows' sampled tokens as agree with them
(runtime/speculative.py).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from operator import attrgetter, itemgetter

import numpy as np

from llmc import contract
from llmc.errors import LlmcError
from llmc.runtime.kv_cache import BlockPool
from llmc.runtime.kv_manager import KVCacheManager
from llmc.runtime.request import Request, RequestOutput, Status
from llmc.runtime.sampler import SamplingParams, sample_batch, token_logprobs
from llmc.runtime.scheduler import Scheduler, StepPlan
from llmc.runtime.speculative import NgramDrafter, SpeculativeConfig
from llmc.runtime.structured import Grammars

_REQUEST, _OUTPUT, _LAST = itemgetter(0), attrgetter("output_token_ids"), itemgetter(-1)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of what the engine holds and has counted (for a server's metrics)."""

    waiting: int                  # requests queued or preempted
    running: int
    kv_blocks_used: int           # blocks held by requests (cached free blocks are free)
    kv_blocks_total: int
    prefix_cache_queries: int     # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int        # ... and found there
    preemptions: int
    # speculative decoding (vLLM's spec_decode counters): request-steps that brought guesses,
    # the guesses, and those the model's own tokens agreed with
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


class LLMEngine:
    def __init__(self, session, header, num_kv_blocks: int | None = None,
                 enable_prefix_caching: bool = True, tokenizer=None,
                 speculative: SpeculativeConfig | None = None):
        """num_kv_blocks: the pool's size; default what the session holds (a GPU session
        sizes it from memory) or, on the CPU, what the build limits can address.
        speculative: guess tokens by prompt lookup and check them in the step."""
        from tokenizers import Tokenizer

        self.session = session
        self.header = header
        self.limits = header.build.limits
        self.tokenizer = tokenizer or Tokenizer.from_str(header.tokenizer.json)
        self.eos_ids = tuple(header.tokenizer.eos_token_ids)
        blocks = num_kv_blocks or getattr(session, "kv_capacity", self.limits.max_num_blocks)
        self.block_size = self.limits.kv_block_size
        session.allocate_kv(blocks)
        self.kv = KVCacheManager(BlockPool(blocks), self.block_size,
                                 enable_prefix_caching=enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, self.limits)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._pending: list[RequestOutput] = []
        # structured outputs' side (llguidance's tokenizer made on first use, or by warm())
        self.grammars = Grammars(header.tokenizer.json, header.io.vocab_size, self.eos_ids)
        # False: a step's masks are computed before it runs, not alongside (bench/structured.py)
        self.overlap_masks = True
        self.speculative = speculative
        self.spec_counts = [0, 0, 0]   # EngineStats' spec_drafts, _draft_tokens, _accepted
        self._drafted: list[Request] = []   # the requests the last `_draft` gave guesses

    # --- requests ------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0) -> str:
        """Queue a request; returns its id. A request that is wrong in itself (empty prompt,
        too long, bad settings) finishes at once with finish_reason "error", alone."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise LlmcError(f"a request with id {request_id!r} is already running")
        req = Request(request_id, [], params, priority=priority)
        self.requests[request_id] = req
        try:
            params.validate()
            self._check_bias(params)
            req.prompt_token_ids = self._tokens(prompt)
            self._check_fits(req)
            if params.structured_outputs is not None:
                req.matcher = self.grammars.matcher(params.structured_outputs)
                req.matching = params.structured_after is None
        except LlmcError as e:
            self._fail(req, str(e))
            return request_id
        seed = np.random.SeedSequence(params.seed)   # a request's own stream, any batch row
        req.seed = int(seed.generate_state(1, np.uint64)[0])
        req.rng = np.random.default_rng(seed)
        req.detokenizer = self._detokenizer(req)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = []
            if self._scored_only(req):   # one prompt token, nothing to generate: done
                self._finish(req, "length")
                return request_id
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is not None and not req.finished:
            self._finish(req, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending)

    def stats(self) -> EngineStats:
        pool, sched = self.kv.pool, self.scheduler
        return EngineStats(len(sched.waiting), len(sched.running),
                           pool.num_blocks - pool.num_free_blocks, pool.num_blocks,
                           self.kv.prefix_queries, self.kv.prefix_hits, sched.num_preemptions,
                           *self.spec_counts)

    def _tokens(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            try:
                ids = self.tokenizer.encode(prompt).ids
            except Exception as e:   # e.g. lone surrogates from undecodable bytes
                raise LlmcError(f"the prompt cannot be tokenized ({e})") from None
        elif isinstance(prompt, (list, tuple)) and all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise LlmcError(f"a prompt is a string or a list of token ids, not "
                            f"{type(prompt).__name__}")
        vocab = self.header.io.vocab_size
        if not ids:
            raise LlmcError("the prompt is empty (0 tokens)")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise LlmcError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        return ids

    def _check_bias(self, params: SamplingParams) -> None:
        vocab = self.header.io.vocab_size
        bad = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if bad is not None:
            raise LlmcError(f"logit_bias names token id {bad}, outside the vocabulary "
                            f"(0..{vocab - 1})")

    def _check_fits(self, req: Request) -> None:
        n, lim = len(req.prompt_token_ids), self.limits
        if n >= lim.max_seq_len:
            raise LlmcError(f"the prompt has {n} tokens; this engine allows at most "
                            f"{lim.max_seq_len - 1} prompt tokens (max_seq_len "
                            f"{lim.max_seq_len}). Shorten the prompt or rebuild with a larger "
                            "--max-seq-len.")
        total = min(n + req.params.max_tokens, lim.max_seq_len)
        if not self.kv.can_ever_fit(total):
            raise LlmcError(f"this request needs {self.kv.num_blocks_needed(total)} KV blocks "
                            f"but the cache holds {self.kv.pool.num_blocks}; lower max_tokens "
                            "or give the cache more memory")

    def _detokenizer(self, req: Request):
        from llmc.runtime.detokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, req.params.stop,
                                      req.params.skip_special_tokens)

    # --- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the outputs of the requests that advanced, finished
        or failed since the last call."""
        outputs, self._pending = self._pending, []
        if self.speculative is not None:
            self._draft()
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            if not plan.preempted and (self.scheduler.waiting or self.scheduler.running):
                self._unschedulable()
            return outputs
        rows = [r for r, _ in plan.scheduled]
        spans = guessed = None   # without rows of their own: request i is row i
        if self.scheduler.drafting or plan.split:   # guesses, a prompt scored: a row a token
            inputs, spans = self._row_inputs(plan)
        else:
            inputs = self._inputs(plan)
        # Rows whose prompt is done sample; a prompt chunk with more to come does not (on
        # the host it must not even draw, or a seeded request's stream would depend on how
        # its prompt was chunked, i.e. on what else ran).
        if plan.arrays is not None:   # every request brings all its remaining tokens
            done, scoring = [True] * len(rows), {}
        else:
            done = [r.num_computed_tokens + n >= r.num_tokens for r, n in plan.scheduled]
            scoring = self._scoring(plan, spans)
        if spans is not None:
            rows, done, guessed = _expand(plan, done)
        tokens, logprobs = self._sample(inputs, rows, done, scoring, guessed)
        self.scheduler.commit(plan, tokens)   # before the loop below may finish requests
        now = time.monotonic()
        for i, (req, n) in enumerate(plan.scheduled):
            row = i if spans is None else spans[i]
            if req.draft:
                self._accept(req, tokens, logprobs, row, now)
                out = self._output(req)
                if out is not None:
                    outputs.append(out)
                continue
            req.num_computed_tokens += n
            last = row if spans is None or req not in plan.split else row + n - 1
            if scoring and (scores := [logprobs[r] for r in range(row, last + 1)
                                       if r in scoring]):
                req.prompt_logprobs += scores
                if self._scored_only(req):
                    self._finish(req, "length")
                    outputs.append(self._pending.pop())
                    continue
            row = last   # a split prompt's last row may sample: its last prompt token
            if not done[row]:
                continue
            if req.matcher is not None and not req.matching:   # reasoning, unconstrained
                req.matching = int(tokens[row]) == req.params.structured_after
            elif req.matcher is not None and not req.matcher.consume_token(int(tokens[row])):
                self._fail(req, "structured output: " + (req.matcher.get_error().strip()
                                                         or "no token can continue it"))
                outputs.append(self._pending.pop())
                continue
            self._append(req, int(tokens[row]), logprobs[row] if logprobs else None, now)
            out = self._output(req)
            if out is not None:
                outputs.append(out)
        return outputs

    def _inputs(self, plan: StepPlan) -> dict[str, np.ndarray]:
        """The step's control inputs, from arrays (the scheduler's, when it has them): no
        Python work per block, one token slice per request, or at a decode step one C-level
        read of each request's last token."""
        if plan.arrays is not None:
            rows, first, counts = plan.arrays
            if plan.last_tokens is not None:   # a decode step the scheduler kept the tokens,
                # contexts and tables of, from step to step, as the session takes them
                return contract.pack_decode(plan.last_tokens, first, plan.context_lens,
                                            plan.tables)
            if len(plan.scheduled) == int(counts.sum()):   # one token each: the last one
                outputs = list(map(_OUTPUT, map(_REQUEST, plan.scheduled)))
                if all(outputs):
                    ids = np.fromiter(map(_LAST, outputs), np.int32, len(outputs))
                    return contract.pack_arrays(ids, counts, first, self.kv.block_tables(rows),
                                                self.block_size)
        else:
            reqs = [r for r, _ in plan.scheduled]
            counts = np.fromiter((n for _, n in plan.scheduled), np.int32, len(reqs))
            first = np.fromiter((r.num_computed_tokens for r in reqs), np.int32, len(reqs))
            rows = self.kv.rows_of(reqs)
        ids = np.fromiter(itertools.chain.from_iterable(
            r.tokens(r.num_computed_tokens, n) for r, n in plan.scheduled), np.int32,
            int(counts.sum()))
        return contract.pack_arrays(ids, counts, first, self.kv.block_tables(rows),
                                    self.block_size)

    def _draft(self) -> None:
        """Guess the next tokens of the running requests that decode, as far as the step's
        rows and tokens leave room, while no request waits to start (and no more than
        disable_by_batch_size run)."""
        sched, cfg, lim = self.scheduler, self.speculative, self.limits
        for req in self._drafted:   # guesses a step did not take (its budget ran out)
            req.draft = []
        self._drafted = []
        sched.drafting = False
        if sched.waiting or not sched.running or (
                cfg.disable_by_batch_size is not None
                and len(sched.running) > cfg.disable_by_batch_size):
            return
        room = min(lim.max_batch_size, lim.max_num_tokens) - len(sched.running)
        for req in sched.running:
            if room <= 0:
                break
            if (req.matcher is not None or req.num_tokens - req.num_computed_tokens != 1
                    or req.chunk_limit() is not None):
                continue
            # Past max_tokens or max_seq_len a guess could not be kept.
            k = min(cfg.num_speculative_tokens, room,
                    req.params.max_tokens - len(req.output_token_ids) - 1,
                    lim.max_seq_len - req.num_tokens - 1)
            if k < 1:
                continue
            if req.drafter is None:
                req.drafter = NgramDrafter(cfg.prompt_lookup_min, cfg.prompt_lookup_max)
            req.draft = req.drafter.propose(req.all_token_ids, k)
            if req.draft:
                room -= len(req.draft)
                sched.drafting = True
                self._drafted.append(req)

    def _row_inputs(self, plan: StepPlan) -> tuple[dict[str, np.ndarray], list[int]]:
        """The step's inputs when requests bring guesses or a prompt to score: such a
        request's tokens (its last token and each guess; its prompt tokens) go in rows of
        one token of their own, at consecutive positions, with the request's block table;
        every other request in a row as usual. Also each request's first row."""
        ids, counts, first, table_rows, spans = [], [], [], [], []
        kv_rows = self.kv.rows_of([r for r, _ in plan.scheduled]).tolist()
        for (req, n), kv_row in zip(plan.scheduled, kv_rows):
            spans.append(len(counts))
            start = req.num_computed_tokens
            if req.draft or req in plan.split:   # with guesses, n = 1 + len(draft)
                ids += [*req.tokens(start, 1), *req.draft] if req.draft else req.tokens(start, n)
                counts += [1] * n
                first += range(start, start + n)
                table_rows += [kv_row] * n
            else:
                ids += req.tokens(start, n)
                counts.append(n)
                first.append(start)
                table_rows.append(kv_row)
        i32 = lambda x: np.asarray(x, np.int32)  # noqa: E731
        return contract.pack_arrays(
            i32(ids), i32(counts), i32(first),
            self.kv.block_tables(np.asarray(table_rows, np.intp)), self.block_size), spans

    def _accept(self, req: Request, tokens, logprobs, row: int, now: float) -> None:
        """Keep the sampled tokens of a request's rows from `row` on while each agrees with
        the guess fed to the next row, and the first that does not."""
        draft, req.draft = req.draft, []
        kept = 1
        while kept <= len(draft) and int(tokens[row + kept - 1]) == draft[kept - 1]:
            kept += 1
        counts = self.spec_counts
        counts[0] += 1
        counts[1] += len(draft)
        counts[2] += kept - 1
        req.num_computed_tokens += kept   # the last token and the guesses kept: K/V that hold
        for j in range(row, row + kept):
            self._append(req, int(tokens[j]), logprobs[j] if logprobs else None, now)
            if req.finished:   # a stop, or max_tokens, among the kept tokens
                break

    def _scoring(self, plan: StepPlan, spans: list[int] | None
                 ) -> dict[int, tuple[int, int]]:
        """The rows whose logits score a prompt token this step: row -> (that token, the
        top-n asked). A chunk ends right before the next token to score
        (Request.chunk_limit), or its tokens have rows of their own (`plan.split`), each
        scoring the next. spans: each request's first row, when not its index."""
        out = {}
        for i, (req, n) in enumerate(plan.scheduled):
            scored = req.prompt_logprobs
            if scored is None:
                continue
            row = i if spans is None else spans[i]
            start = req.num_computed_tokens
            ends = range(start + 1, start + n + 1) if req in plan.split else (start + n,)
            for j, at in enumerate(ends):   # the token after a row's last
                if at == len(scored) + 1 + j and at < len(req.prompt_token_ids):
                    out[row + j] = (req.prompt_token_ids[at], req.params.prompt_logprobs)
        return out

    def _scored_only(self, req: Request) -> bool:
        """Whether a request that generates nothing (max_tokens 0) has scored its prompt."""
        return (req.params.max_tokens == 0
                and len(req.prompt_logprobs) >= len(req.prompt_token_ids) - 1)

    def _sample(self, inputs, rows: list[Request], done: list[bool],
                scoring: dict[int, tuple[int, int]], guessed: list[int] | None = None):
        """Token ids for every row (meaningful where done), and logprobs if any row asked:
        of the sampled token where done, of the prompt token a scoring row scores.
        guessed: for each row, how many of its request's guesses come before its token
        (that row samples the request's output token after them)."""
        params = [r.params for r in rows]
        which = [i for i, d in enumerate(done) if d]
        # A constrained row's mask depends only on the tokens it has: computed on a worker
        # thread while the session runs the step (vLLM overlaps it with the forward too).
        constrained = [j for j, i in enumerate(which) if rows[i].matching]
        masks = None
        if constrained:
            masks = self.grammars.masks([rows[which[j]].matcher for j in constrained])
            if not self.overlap_masks:
                masks.result()
        if hasattr(self.session, "step_sample") and not any(p.needs_host for p in params) \
                and (not constrained or getattr(self.session, "bans_tokens", False)):
            # Philox keyed by (seed, tokens sampled so far): a row that does not sample
            # this step consumes nothing.
            allowed = None
            if constrained:   # the session bans what the masks do not allow, on the device
                def allowed():
                    return self.grammars.rows_bitmask(
                        len(rows), [which[j] for j in constrained], masks.result())
            tokens = self.session.step_sample(
                inputs, [p.temperature for p in params], [p.top_k for p in params],
                [p.top_p for p in params], [r.seed for r in rows],
                [len(r.output_token_ids) for r in rows] if guessed is None else
                [len(r.output_token_ids) + g for r, g in zip(rows, guessed)], allowed=allowed)
            return tokens, None
        logits = self.session.step(inputs)
        tokens = np.zeros(len(rows), np.int32)
        scored = None
        if scoring:
            at = list(scoring)
            targets = np.zeros(len(rows), np.int32)
            targets[at] = [t for t, _ in scoring.values()]
            lp, top = token_logprobs(logits, targets, at, [n for _, n in scoring.values()])
            scored = [None] * len(rows)
            for i in at:
                scored[i] = (float(lp[i]), top[i])
        if not which:
            return tokens, scored
        sub = [rows[i] for i in which]
        x = logits[which]   # a copy: the constraints mask it
        if constrained:
            self.grammars.apply(x, constrained, masks.result())
        outputs = [r.output_token_ids for r in sub]
        if guessed is not None:   # penalties and min_tokens count the guesses before a row
            outputs = [out + rows[i].draft[:guessed[i]] if guessed[i] else out
                       for i, out in zip(which, outputs)]
        result = sample_batch(x, [r.params for r in sub], [r.rng for r in sub], outputs,
                              [r.prompt_token_ids for r in sub], self.eos_ids)
        tokens[which] = result.tokens
        if result.logprobs is None:
            return tokens, scored
        logprobs = scored or [None] * len(rows)   # the rows differ: done or scoring
        tops = result.top_logprobs or [None] * len(sub)
        for i, lp, top in zip(which, result.logprobs, tops):
            logprobs[i] = (float(lp), top)
        return tokens, logprobs

    def _append(self, req: Request, token: int, logprob, now: float) -> None:
        p = req.params
        req.output_token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
        req.token_times.append(now)
        if logprob is not None:
            req.pending_logprobs.append(logprob)
        n_out = len(req.output_token_ids)
        stop_id = n_out > p.min_tokens and (
            (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids)
        if not stop_id:   # a stop token's own text is not part of the completion
            req.pending_text += req.detokenizer.push(token)
            req.pending_ids.append(token)
        else:
            req.stop_token_id = token
        if stop_id or req.detokenizer.stopped or (req.matching and req.matcher.is_stopped()):
            req.finish_reason = "stop"
        elif n_out >= p.max_tokens or req.num_tokens >= self.limits.max_seq_len:
            req.finish_reason = "length"
        if req.finish_reason:
            if not req.detokenizer.stopped:
                req.pending_text += req.detokenizer.flush()
            req.status = Status.FINISHED
            self.scheduler.remove(req)

    def _output(self, req: Request) -> RequestOutput | None:
        text, ids = req.pending_text, req.pending_ids
        req.pending_text, req.pending_ids = "", []
        logprobs, req.pending_logprobs = req.pending_logprobs, []
        if not (text or ids or req.finished):
            return None
        return RequestOutput(
            req.request_id, text, ids, req.finished, req.finish_reason, req.error,
            len(req.prompt_token_ids), len(req.output_token_ids), req.num_cached_prompt_tokens,
            logprobs or None,
            req.first_token_time - req.arrival_time if req.first_token_time else None,
            list(req.token_times) if req.finished else [], self._prompt_logprobs(req),
            req.stop_token_id)

    def _prompt_logprobs(self, req: Request) -> list | None:
        """The prompt's scores for the request's first output: None for its first token
        (nothing came before it), then each one's (logprob, top-n)."""
        if (req.prompt_logprobs is None or req.prompt_logprobs_sent
                or len(req.prompt_logprobs) < len(req.prompt_token_ids) - 1):
            return None   # not asked, sent, or cut short (an abort while it scored)
        req.prompt_logprobs_sent = True
        return [None] + req.prompt_logprobs

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish_reason, req.error, req.status = reason, error, Status.FINISHED
        self.scheduler.remove(req)
        text, ids = req.pending_text, req.pending_ids
        req.pending_text, req.pending_ids = "", []
        self._pending.append(RequestOutput(
            req.request_id, text, ids, True, reason, error, len(req.prompt_token_ids),
            len(req.output_token_ids), req.num_cached_prompt_tokens,
            prompt_logprobs=self._prompt_logprobs(req)))

    def _fail(self, req: Request, error: str) -> None:
        self._finish(req, "error", error)

    def _unschedulable(self) -> None:
        """Nothing could run although requests wait: fail the first, so none waits forever."""
        req = (self.scheduler.waiting or self.scheduler.running)[0]
        self._fail(req, "the KV cache cannot hold this request next to nothing else")

    def release(self, request_id: str) -> None:
        """Forget a finished request (the caller has its output)."""
        req = self.requests.get(request_id)
        if req is not None and req.finished:
            del self.requests[request_id]


def _expand(plan: StepPlan, done: list[bool]):
    """A step's requests and their `done` as rows (`_row_inputs`'): a request with guesses
    has a row for its last token and one for each guess, all sampling; a split prompt a row
    a token, the last prompt token's sampling. Also each row's count of guesses before it."""
    x_rows, x_done, guessed = [], [], []
    for (req, n), d in zip(plan.scheduled, done):
        if req.draft:
            x_done += [d] * n
            guessed += range(n)
        elif req in plan.split:
            start = req.num_computed_tokens
            x_done += [start + j + 1 >= req.num_tokens for j in range(n)]
            guessed += [0] * n
        else:
            n = 1
            x_done.append(d)
            guessed.append(0)
        x_rows += [req] * n
    return x_rows, x_done, guessed
