"""Token sampling on the host: one row (`sample`, `probabilities`) or a whole batch
(`sample_batch`), each row with its own `SamplingParams` and random stream.

Order of operations (vLLM's), per row:
  1. logit_bias is added; min_tokens: while the output is shorter than min_tokens, the
     stop_token_ids (and EOS, unless ignore_eos) are masked (-inf).
  2. penalties, on the logits: repetition_penalty over the tokens of prompt + output (a
     positive logit is divided by it, a non-positive one multiplied), then
     logit -= frequency_penalty * count + presence_penalty * (count > 0) over the output.
  3. temperature 0: argmax of the penalised logits (lowest index on ties); done.
  4. temperature: z = logits / T.
  5. truncation: min_p (keep p >= min_p * p_max) and top_k (keep z >= the k-th largest z,
     ties at the cut all stay), then top_p on the distribution renormalised over what is
     left (keep the smallest most-likely-first prefix whose mass reaches top_p; ties in
     index order; the most likely token always stays).
  6. one draw: inverse CDF, in token-index order, of one uniform from the row's generator
     (the rule of plugins/kernels/sampling.cu and of `rng.choice(p=...)`).
logprobs, when asked for, are those of the model's raw output: log_softmax of the logits
before any of the above (vLLM's default, "raw_logprobs"); a structured output's mask comes
before them, as in vLLM (runtime/structured.py), and the tokens it bans are never among the
top-n.

`sample_batch` does the vocabulary-wide work as numpy array operations in float32 (sums in
float64). Top-p never sorts a whole row when it can help it: the candidates are the tokens
above a threshold that provably holds the top-p prefix (all of its ties included), found by
a cheap mass check, else by a partial sort (np.partition), else the whole row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llmc.errors import LlmcError
from llmc.runtime.sampling_params import MAX_LOGPROBS, SamplingParams

__all__ = ["MAX_LOGPROBS", "SampleResult", "SamplingParams", "batch_probabilities",
           "probabilities", "request_generator", "sample", "sample_batch", "token_logprobs"]

# Top-p candidate search: relative-probability thresholds tried first, then a partial sort
# keeping CANDIDATES tokens, then the whole row. Rows are processed CHUNK at a time.
THRESHOLDS = (1e-3, 1e-6)
CANDIDATES = 4096
CHUNK = 64
BLOCK = 1024          # dense rows: the draw finds its block of the vocabulary first
_MARGIN = 1 + 1e-5   # a threshold must hold this much more than top_p of the mass


@dataclass
class SampleResult:
    tokens: np.ndarray                   # int32 [B]
    logprobs: np.ndarray | None = None   # float32 [B]: the sampled token's; NaN where not asked
    # per row: None, or the top-n (token id, logprob) pairs, most likely first (ties: lower id)
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


def request_generator(params: SamplingParams) -> np.random.Generator:
    """A request's own stream: its seed alone decides its draws, whatever its batch slot."""
    return np.random.default_rng(params.seed)


# ---- one row: the float64 reference ------------------------------------------------------

def probabilities(logits: np.ndarray, params: SamplingParams,
                  output_token_ids: Sequence[int] = (), prompt_token_ids: Sequence[int] = (),
                  eos_token_ids: Sequence[int] = ()) -> np.ndarray:
    """The exact distribution (float64 [vocab]) a row is drawn from; the reference of
    `sample_batch` and of the GPU sampler (plugins/kernels/sampling.cu: temperature, top_k,
    top_p)."""
    x = _penalised_row(np.asarray(logits, np.float64), params, output_token_ids,
                       prompt_token_ids, eos_token_ids)
    if params.temperature == 0:
        probs = np.zeros(x.size)
        probs[int(np.argmax(x))] = 1.0
        return probs
    z = x / params.temperature
    if 0 < params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max())
    if params.min_p > 0:   # probs / max(probs) here; top_k never drops the maximum
        probs = np.where(probs < params.min_p, 0.0, probs)
    probs /= probs.sum()
    if params.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cut = int(np.searchsorted(cumulative, params.top_p)) + 1
        keep = np.zeros_like(probs, dtype=bool)
        keep[order[:cut]] = True
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    return probs


def _penalised_row(x: np.ndarray, params, output_ids, prompt_ids, eos_ids) -> np.ndarray:
    x = x.copy()
    output = np.asarray(output_ids, np.int64)
    for ids in _suppressed(params, len(output), eos_ids):
        x[ids] = -np.inf
    if params.repetition_penalty != 1:
        seen = np.unique(np.concatenate([np.asarray(prompt_ids, np.int64), output]))
        v = x[seen]
        x[seen] = np.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if params.frequency_penalty or params.presence_penalty:
        ids, counts = np.unique(output, return_counts=True)
        x[ids] -= params.frequency_penalty * counts + params.presence_penalty
    return x


def _suppressed(params: SamplingParams, n_output: int, eos_ids) -> list[np.ndarray]:
    if n_output >= params.min_tokens:
        return []
    ids = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_ids))
    return [np.asarray(ids, np.int64)] if ids else []


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           output_token_ids: Sequence[int] = (), prompt_token_ids: Sequence[int] = (),
           eos_token_ids: Sequence[int] = ()) -> int:
    """One token id from one row of logits [vocab] (`sample_batch` on one row)."""
    row = np.asarray(logits, np.float32).reshape(1, -1)
    return int(sample_batch(row, [params], [rng], [output_token_ids], [prompt_token_ids],
                            eos_token_ids).tokens[0])


# ---- the batch ----------------------------------------------------------------------------

def sample_batch(logits: np.ndarray, params: Sequence[SamplingParams],
                 generators: Sequence[np.random.Generator],
                 output_token_ids: Sequence[Sequence[int]],
                 prompt_token_ids: Sequence[Sequence[int]],
                 eos_token_ids: Sequence[int] = ()) -> SampleResult:
    """One token per row of logits float32 [B, V], row b with params[b], drawing one uniform
    from generators[b] (greedy rows draw none). output_token_ids[b] / prompt_token_ids[b]:
    the row's tokens so far, for the penalties and min_tokens; eos_token_ids: the model's
    EOS ids (masked before min_tokens unless ignore_eos). Params are not validated here."""
    logits = np.asarray(logits, np.float32)
    if logits.ndim != 2:
        raise LlmcError(f"sample_batch takes logits [batch, vocab], got shape {logits.shape}")
    b, v = logits.shape
    for name, seq in (("params", params), ("generators", generators),
                      ("output_token_ids", output_token_ids),
                      ("prompt_token_ids", prompt_token_ids)):
        if len(seq) != b:
            raise LlmcError(f"sample_batch: {len(seq)} {name} for {b} rows of logits")
    x = _penalise(logits, params, output_token_ids, prompt_token_ids, eos_token_ids)
    tokens = np.empty(b, np.int32)
    temperature = np.array([p.temperature for p in params], np.float32)
    greedy = np.flatnonzero(temperature == 0)
    if greedy.size == b:
        tokens[:] = np.argmax(x, axis=1)
    elif greedy.size:
        tokens[greedy] = np.argmax(x[greedy], axis=1)
    rows = np.flatnonzero(temperature != 0)
    u = np.array([generators[r].random() for r in rows], np.float64)
    for start in range(0, rows.size, CHUNK):
        chunk = rows[start:start + CHUNK]
        kept = _kept(x, chunk, [params[r] for r in chunk])
        tokens[chunk] = kept.draw(u[start:start + CHUNK])
    logprobs = top = None
    asked = [r for r in range(b) if params[r].logprobs is not None]
    if asked:
        logprobs, top = token_logprobs(logits, tokens, asked, [params[r].logprobs for r in asked])
    return SampleResult(tokens, logprobs, top)


def batch_probabilities(logits: np.ndarray, params: Sequence[SamplingParams],
                        output_token_ids: Sequence[Sequence[int]],
                        prompt_token_ids: Sequence[Sequence[int]],
                        eos_token_ids: Sequence[int] = ()) -> np.ndarray:
    """The distributions `sample_batch` draws from, float64 [B, V] (for tests)."""
    logits = np.asarray(logits, np.float32)
    x = _penalise(logits, params, output_token_ids, prompt_token_ids, eos_token_ids)
    probs = np.zeros(x.shape)
    for r, p in enumerate(params):
        if p.temperature == 0:
            probs[r, np.argmax(x[r])] = 1.0
    rows = np.flatnonzero([p.temperature != 0 for p in params])
    for start in range(0, rows.size, CHUNK):
        chunk = rows[start:start + CHUNK]
        probs[chunk] = _kept(x, chunk, [params[r] for r in chunk]).dense(x.shape[1])
    return probs


def _penalise(logits: np.ndarray, params, outputs, prompts, eos_ids) -> np.ndarray:
    """logit_bias, min_tokens masks and penalties over the whole batch at once (flat
    indices); the logits themselves when no row has any."""
    b, v = logits.shape
    masked, rep, freq, bias = [], [], [], []
    for r, p in enumerate(params):
        if p.logit_bias:
            bias += [(t + r * v, value) for t, value in p.logit_bias]
        masked += [ids + r * v for ids in _suppressed(p, len(outputs[r]), eos_ids)]
        if p.repetition_penalty != 1:
            rep += [np.asarray(prompts[r], np.int64) + r * v,
                    np.asarray(outputs[r], np.int64) + r * v]
        if p.frequency_penalty or p.presence_penalty:
            freq.append(np.asarray(outputs[r], np.int64) + r * v)
    if not (masked or rep or freq or bias):
        return logits
    x = logits.copy()
    flat = x.reshape(-1)
    if bias:
        at, values = zip(*bias)
        flat[np.array(at, np.int64)] += np.array(values, np.float32)
    if masked:
        flat[np.concatenate(masked)] = -np.inf
    if rep:
        seen = np.unique(np.concatenate(rep))
        penalty = np.array([p.repetition_penalty for p in params], np.float32)[seen // v]
        values = flat[seen]
        flat[seen] = np.where(values > 0, values / penalty, values * penalty)
    if freq:
        ids, counts = np.unique(np.concatenate(freq), return_counts=True)
        row = ids // v
        fp = np.array([p.frequency_penalty for p in params], np.float32)[row]
        pp = np.array([p.presence_penalty for p in params], np.float32)[row]
        flat[ids] -= fp * counts.astype(np.float32) + pp
    return x


class _Kept:
    """A chunk's distributions, unnormalised: dense rows (e [n, V], zeros dropped) and
    sparse rows (kept (row, col, weight) in row-major order)."""

    def __init__(self, n: int):
        self.n = n
        self.dense_rows = np.zeros(0, np.int64)
        self.dense_e = None
        self.sparse_rows = np.zeros(0, np.int64)
        self.sp_row = self.sp_col = self.sp_w = None

    def draw(self, u: np.ndarray) -> np.ndarray:
        out = np.empty(self.n, np.int64)
        if self.dense_rows.size:
            out[self.dense_rows] = _draw_dense(self.dense_e, u[self.dense_rows])
        if self.sparse_rows.size:
            # one cumulative sum over all rows: row r's draw lies in its own segment
            cdf = np.cumsum(self.sp_w, dtype=np.float64)
            first = np.searchsorted(self.sp_row, self.sparse_rows)
            last = np.searchsorted(self.sp_row, self.sparse_rows, side="right") - 1
            base = np.where(first > 0, cdf[np.maximum(first - 1, 0)], 0.0)
            target = base + u[self.sparse_rows] * (cdf[last] - base)
            pos = np.minimum(np.searchsorted(cdf, target, side="right"), last)
            out[self.sparse_rows] = self.sp_col[pos]
        return out

    def dense(self, v: int) -> np.ndarray:
        probs = np.zeros((self.n, v))
        if self.dense_rows.size:
            e = self.dense_e.astype(np.float64)
            probs[self.dense_rows] = e / e.sum(1, keepdims=True)
        if self.sparse_rows.size:
            probs[self.sp_row, self.sp_col] = self.sp_w
            probs[self.sparse_rows] /= probs[self.sparse_rows].sum(1, keepdims=True)
        return probs


def _draw_dense(e: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse CDF in index order over rows e [n, V] without a cumulative sum of every row:
    block sums find the block where u * total falls, then one block per row is summed up."""
    n, v = e.shape
    nb = v // BLOCK
    sums = np.empty((n, nb + 1), np.float64)
    sums[:, :nb] = e[:, :nb * BLOCK].reshape(n, nb, BLOCK).sum(axis=2)
    sums[:, nb] = e[:, nb * BLOCK:].sum(axis=1)
    cum = np.cumsum(sums, axis=1)
    target = u * cum[:, -1]
    block = np.minimum((cum <= target[:, None]).sum(axis=1), nb)
    # the last block with mass, if rounding put the target past every block
    last = nb - np.argmax(sums[:, ::-1] > 0, axis=1)
    block = np.where(sums[np.arange(n), block] > 0, block, last)
    before = np.where(block > 0, cum[np.arange(n), np.maximum(block - 1, 0)], 0.0)
    cols = block[:, None] * BLOCK + np.arange(BLOCK)
    inside = cols < v
    w = np.where(inside, np.take_along_axis(e, np.minimum(cols, v - 1), axis=1), 0)
    wcum = np.cumsum(w, axis=1, dtype=np.float64)
    pos = (wcum <= (target - before)[:, None]).sum(axis=1)
    # past the block's end by rounding: its last token with mass
    lastw = BLOCK - 1 - np.argmax(w[:, ::-1] > 0, axis=1)
    return block * BLOCK + np.minimum(pos, lastw)


def _kept(x: np.ndarray, rows: np.ndarray, params: list[SamplingParams]) -> _Kept:
    """Temperature, min_p, top_k and top_p for some sampled rows of x."""
    n, v = rows.size, x.shape[1]
    xs = x[rows]
    zmax = xs.max(axis=1)
    if not np.isfinite(zmax).all():
        bad = int(rows[np.flatnonzero(~np.isfinite(zmax))[0]])
        raise LlmcError(f"row {bad} of the logits has no finite maximum (NaN, or every "
                        "token masked)")
    t = np.array([p.temperature for p in params], np.float32)[:, None]
    top_k = np.array([p.top_k for p in params], np.int64)
    # top_k threshold on the logits (ties at the cut all stay), one partition per distinct k
    kth = np.full(n, -np.inf, np.float32)
    for k in np.unique(top_k[(top_k > 0) & (top_k < v)]):
        sel = np.flatnonzero(top_k == k)
        kth[sel] = np.partition(xs[sel], v - k, axis=1)[:, v - k]
    top = (xs >= kth[:, None]) if np.isfinite(kth).any() else None
    # e = exp((x - max) / T) in place: the most likely token has e = 1
    e = np.subtract(xs, zmax[:, None], out=xs)
    np.divide(e, t, out=e)
    np.exp(e, out=e)
    if top is not None:
        np.multiply(e, top, out=e)
    min_p = np.array([p.min_p for p in params], np.float32)
    if (min_p > 0).any():
        np.multiply(e, e >= min_p[:, None], out=e)
    top_p = np.array([p.top_p for p in params], np.float64)
    kept = _Kept(n)
    cut = np.flatnonzero(top_p < 1)
    whole = np.flatnonzero(top_p >= 1)
    kept.dense_rows, kept.dense_e = whole, e[whole] if cut.size else e
    if cut.size:
        kept.sparse_rows = cut
        kept.sp_row, kept.sp_col, kept.sp_w = _top_p(e[cut] if whole.size else e, top_p[cut])
        kept.sp_row = cut[kept.sp_row]
    return kept


def _top_p(e: np.ndarray, top_p: np.ndarray):
    """Top-p over rows e [n, V] (unnormalised, max 1): the kept (row, col, weight), row-major."""
    n, v = e.shape
    goal = top_p * e.sum(axis=1, dtype=np.float64) * _MARGIN
    # A threshold t holds the prefix when the tokens with e >= t carry the goal's mass: the
    # prefix, ties at its end included, lies inside them.
    thresh = np.zeros(n, np.float32)
    todo = np.arange(n)
    for t in THRESHOLDS:
        if not todo.size:
            break
        et = e if todo.size == n else e[todo]
        mask = et >= t
        mass = np.sum(et, axis=1, where=mask)
        ok = (mass >= goal[todo]) & (np.count_nonzero(mask, axis=1) <= CANDIDATES)
        thresh[todo[ok]] = t
        todo = todo[~ok]
    if todo.size and CANDIDATES < v:
        et = e if todo.size == n else e[todo]
        t = np.partition(et, v - CANDIDATES, axis=1)[:, v - CANDIDATES]
        mass = np.sum(et, axis=1, where=et >= t[:, None])
        ok = (mass >= goal[todo]) & (t > 0)
        thresh[todo[ok]] = t[ok]
        todo = todo[~ok]
    thresh[todo] = np.finfo(np.float32).smallest_subnormal   # the whole row
    flat = np.flatnonzero(e >= thresh[:, None])    # 1-D: much faster than 2-D nonzero
    row, col = np.divmod(flat, v)
    w = e.reshape(-1)[flat]
    # most likely first, ties in index order: one sort of unique integer keys
    # (row | ~bits(w) | col); positive float32 bits order as the floats do.
    cbits = max(int(v - 1).bit_length(), 1)
    rbits = max(int(n - 1).bit_length(), 1)
    if rbits + 32 + cbits <= 64:
        key = ((row.astype(np.uint64) << np.uint64(32 + cbits))
               | ((~w.view(np.uint32)).astype(np.uint64) << np.uint64(cbits))
               | col.astype(np.uint64))
        order = np.argsort(key)
    else:
        order = np.lexsort((col, -w, row))
    ws, rs = w[order], row[order]
    cum = np.cumsum(ws, dtype=np.float64)
    first = np.searchsorted(rs, np.arange(n))
    before = np.where(first > 0, cum[np.maximum(first - 1, 0)], 0.0)
    exclusive = cum - ws - before[rs]
    keep_sorted = exclusive < (goal / _MARGIN)[rs]
    keep = np.empty_like(keep_sorted)
    keep[order] = keep_sorted
    return row[keep], col[keep], w[keep]


def token_logprobs(logits: np.ndarray, tokens: np.ndarray, rows: list[int], ns: list[int]):
    """Of rows `rows` of the raw logits [B, vocab]: each row's token's logprob (float32 [B],
    NaN elsewhere) and its ns[i] most likely (token, logprob), most likely first, ties to
    the lower id (a list a row, None elsewhere): a sampled token's, or a prompt token's."""
    b, v = logits.shape
    out = np.full(b, np.nan, np.float32)
    top: list = [None] * b
    raw = logits[rows]
    m = raw.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.sum(np.exp(raw - m), axis=1, dtype=np.float64)).astype(np.float32)
    out[rows] = raw[np.arange(len(rows)), tokens[rows]] - lse
    for i, (r, k) in enumerate(zip(rows, ns)):
        if k == 0:
            top[r] = []
            continue
        row = raw[i]
        kth = np.partition(row, v - k)[v - k] if k < v else row.min()
        cand = np.flatnonzero(row >= kth)
        cand = cand[np.isfinite(row[cand])]   # a token a constraint bans is no alternative
        cand = cand[np.lexsort((cand, -row[cand]))][:k]
        top[r] = [(int(c), float(row[c] - lse[i])) for c in cand]
    return out, top
