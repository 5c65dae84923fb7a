"""`llmc eval`: an engine's perplexity on a text, measured by running the engine itself.

    scores, n = score_engine(engine_file, windows)   # windows: token id lists; n a step
    scores.perplexity(); agreement(scores, other_scores)

A quantized build measures its accuracy on onnxruntime, over the graph it lowers
(quantization/measure.py). That says nothing of the kernels a cuda or TensorRT engine runs
instead; this runs the engine file on its own backend, as `llmc run` and `llmc serve` do.

Teacher-forced decode: the windows run as the sequences of a batch, each window's first token
as a one-token prompt and every later token fed as if the engine had generated it, one decode
step at a time. A step's logits score the token that follows, so every token of a window but
its first is scored: the tokens the build's report scores, through the steps serving runs
most (the decode GEMVs, decode attention over the paged cache) rather than one prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from llmc import contract
from llmc.errors import LlmcError
from llmc.quantization.measure import token_logprobs


@dataclass
class Scores:
    """An engine over a text's windows, in window order: each scored token's log-probability
    (float64) and the engine's most likely token at its position."""

    logp: np.ndarray
    greedy: np.ndarray

    @property
    def tokens(self) -> int:
        return len(self.logp)

    def perplexity(self) -> float:
        return float(np.exp(-self.logp.mean()))


def agreement(a: Scores, b: Scores) -> float:
    """The share of positions where two engines' most likely tokens are the same."""
    return float(np.mean(a.greedy == b.greedy))


def check_windows(header, windows: Sequence[Sequence[int]]) -> None:
    """The engine takes windows this long (asked before its session loads the weights)."""
    longest, limit = max(map(len, windows)), header.build.limits.max_seq_len
    if longest > limit:
        raise LlmcError(f"a window of {longest} tokens is longer than this engine's max_seq_len "
                        f"({limit}); lower --seq-len")


def batch_size(header, windows: Sequence[Sequence[int]], capacity: int,
               batch: int | None = None) -> int:
    """Windows a step: at most the engine's max_batch_size (or ``batch``), and as many as
    ``capacity`` KV blocks hold at the longest window."""
    check_windows(header, windows)
    limits, longest = header.build.limits, max(map(len, windows))
    per_window = -(-longest // header.io.block_size)
    n = min(batch or limits.max_batch_size, limits.max_batch_size, len(windows),
            capacity // per_window)
    if n < 1:
        raise LlmcError(f"a window of {longest} tokens needs {per_window} KV blocks and the "
                        f"cache holds {capacity}; lower --seq-len")
    return n


def score(session, header, windows: Sequence[Sequence[int]], batch: int,
          progress: Callable[[int, int], None] | None = None) -> Scores:
    """Run ``windows`` (each at least 2 tokens) through the session in groups of ``batch``
    (batch_size), teacher-forced one token a step; progress(steps done, steps in all)."""
    bs = header.io.block_size
    per_window = -(-max(map(len, windows)) // bs)
    session.allocate_kv(batch * per_window)
    # every window of a group has its own blocks; a group reuses the last one's (each step
    # writes a token's K/V before any step reads it)
    tables = np.arange(batch * per_window, dtype=np.int32).reshape(batch, per_window)
    groups = [windows[i:i + batch] for i in range(0, len(windows), batch)]
    total, done = sum(max(map(len, g)) - 1 for g in groups), 0
    logp = [np.empty(len(w) - 1) for w in windows]
    greedy = [np.empty(len(w) - 1, np.int32) for w in windows]
    for g, group in enumerate(groups):
        lens = np.array([len(w) for w in group])
        ids = np.zeros((len(group), lens.max()), np.int32)
        for row, w in enumerate(group):
            ids[row, :len(w)] = w
        for pos in range(lens.max() - 1):
            live = np.flatnonzero(lens > pos + 1)   # windows with a token after this one
            inputs = contract.pack_arrays(ids[live, pos], np.ones(len(live), np.int32),
                                          np.full(len(live), pos, np.int32), tables[live], bs)
            logits = session.step(inputs)
            lp, top = token_logprobs(logits, ids[live, pos + 1]), logits.argmax(axis=1)
            for j, row in enumerate(live):
                logp[g * batch + row][pos] = lp[j]
                greedy[g * batch + row][pos] = top[j]
            done += 1
            if progress:
                progress(done, total)
    return Scores(np.concatenate(logp), np.concatenate(greedy))


def score_engine(file, windows: Sequence[Sequence[int]], batch: int | None = None,
                 backend: str = "auto", log: Callable[[str], None] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 **options) -> tuple[Scores, int]:
    """An engine file's Scores over ``windows`` in a session of its own (``options``: the
    backend's, e.g. gpu_memory_utilization), and the windows it ran a step."""
    from llmc.runtime.runner import open_session

    session = open_session(file, backend, log, **options)
    try:
        capacity = getattr(session, "kv_capacity", file.header.build.limits.max_num_blocks)
        n = batch_size(file.header, windows, capacity, batch)
        return score(session, file.header, windows, n, progress), n
    finally:
        session.close()
