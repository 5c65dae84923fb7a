"""The engine I/O contract: what one engine step takes and returns, written once.

One step processes a ragged batch: the new tokens of B sequences packed into T rows (prefill
chunks and decode tokens mixed, no padding), each layer's paged KV pool and each sequence's
block table. This module holds everything about that interface:

- the tensor names, dtypes and symbolic dims, and each dim's (min, opt, max) from the build
  limits (TensorRT profiles, the cuda backend's arena);
- `EngineIO`, the header's description of one engine's tensors;
- the per-step index math (which sequence a token belongs to, where its K/V row goes, which
  keys it sees) over a small builder interface, so the model graph and the PagedAttention
  node's function body emit the same ops from one definition;
- `pack_step` / `pack_arrays`, the host side: the arrays a runtime feeds for a list of
  sequence chunks, or for arrays the runtime already holds (its block tables).

No other module spells these names: they import them from here.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from llmc.limits import BuildLimits

# ---- names -----------------------------------------------------------------------------------

INPUT_IDS = "input_ids"              # int32 [T]: the new tokens, packed
POSITION_IDS = "position_ids"        # int32 [T]: their positions in their sequences
SEQ_STARTS = "seq_starts"            # int32 [B+1]: prefix sums of new-token counts
CONTEXT_LENS = "context_lens"        # int32 [B]: tokens in each sequence's cache after the step
BLOCK_TABLES = "block_tables"        # int32 [B, max_blocks]: physical block of each logical one
LAST_TOKEN_ROWS = "last_token_rows"  # int32 [B]: rows of T whose logits are returned
LOGITS = "logits"                    # float32 [B, vocab]

# The int32 control inputs in the order a step lists them, with their symbolic shapes.
CONTROL_INPUTS: dict[str, tuple[str, ...]] = {
    INPUT_IDS: ("num_tokens",),
    POSITION_IDS: ("num_tokens",),
    SEQ_STARTS: ("batch_plus_one",),
    CONTEXT_LENS: ("batch",),
    BLOCK_TABLES: ("batch", "max_blocks"),
    LAST_TOKEN_ROWS: ("batch",),
}
# What paged attention reads of them (the PagedAttention node's trailing inputs).
ATTENTION_INPUTS = (BLOCK_TABLES, SEQ_STARTS, CONTEXT_LENS, POSITION_IDS)

_KV_IN, _KV_OUT, _KV_ROWS = "kv_cache_", "kv_cache_out_", "kv_rows_out_"


def kv_cache_input(layer: int) -> str:
    """Layer `layer`'s pool [2, num_blocks, kv_heads, block_size, head_dim] (0 = K, 1 = V)."""
    return f"{_KV_IN}{layer}"


def kv_cache_output(layer: int) -> str:
    """The pool after this step's writes, where a backend returns it rather than updating in
    place (the reference backend)."""
    return f"{_KV_OUT}{layer}"


def kv_rows_output(layer: int) -> str:
    """This step's new K/V rows [2, T, kv_heads, head_dim] (0 = K, 1 = V) in the pool's
    dtype, where the graph cannot write its pool and the session writes them (an FP8 pool:
    ScatterND takes no float8, docs/quantization.md)."""
    return f"{_KV_ROWS}{layer}"


def kv_layer(name: str) -> int | None:
    """The layer of a KV pool input or output name, or None for any other tensor."""
    for prefix in (_KV_OUT, _KV_IN):   # _KV_IN is a prefix of _KV_OUT: test the longer first
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return int(name[len(prefix):])
    return None


def is_kv_output(name: str) -> bool:
    return name.startswith(_KV_OUT) and kv_layer(name) is not None


# Keys outside a token's view get this logit before softmax (float32's lowest, not -inf, so a
# row with no visible key cannot turn into NaN).
MASKED = float(np.finfo(np.float32).min)

# ---- symbolic dims ---------------------------------------------------------------------------

DIMS = ("num_tokens", "batch", "batch_plus_one", "max_blocks", "num_blocks")


def dim_ranges(limits: BuildLimits) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) for each symbolic dimension.

    The opt point is a full decode step: every sequence of a full batch adds one token. That
    is the shape a serving loop runs most; prefill chunks are rarer and larger. Block tables
    are tuned at full width (the runtime may always pass max_blocks columns), and the KV
    pool at its largest size, since the runtime allocates it once and keeps it.
    """
    limits.validate()
    b = limits.max_batch_size
    return {
        "num_tokens": (1, b, limits.max_num_tokens),
        "batch": (1, b, b),
        "batch_plus_one": (2, b + 1, b + 1),
        "max_blocks": (1, limits.max_blocks_per_seq, limits.max_blocks_per_seq),
        "num_blocks": (1, limits.max_num_blocks, limits.max_num_blocks),
    }


@dataclass(frozen=True)
class EngineIO:
    """One engine's tensors: the control inputs above, a KV pool per layer, the logits."""

    num_layers: int
    vocab_size: int
    kv_dtype: str
    kv_heads: int
    block_size: int
    head_dim: int
    kv_outputs: bool = True   # the graph returns each updated pool (kv_cache_out_{l})
    kv_rows: bool = False     # the graph returns the step's new K/V rows (kv_rows_out_{l})

    @property
    def kv_block_shape(self) -> tuple[int, int, int]:
        return (self.kv_heads, self.block_size, self.head_dim)

    def kv_shape(self, num_blocks: int | str = "num_blocks") -> tuple:
        return (2, num_blocks, *self.kv_block_shape)

    def inputs(self) -> dict[str, tuple[str, tuple]]:
        """name -> (dtype, shape of ints and dim names), in the engine's input order."""
        out = {name: ("int32", dims) for name, dims in CONTROL_INPUTS.items()}
        for layer in range(self.num_layers):
            out[kv_cache_input(layer)] = (self.kv_dtype, self.kv_shape())
        return out

    def outputs(self) -> dict[str, tuple[str, tuple]]:
        out = {LOGITS: ("float32", ("batch", self.vocab_size))}
        if self.kv_outputs:
            for layer in range(self.num_layers):
                out[kv_cache_output(layer)] = (self.kv_dtype, self.kv_shape())
        if self.kv_rows:
            for layer in range(self.num_layers):
                out[kv_rows_output(layer)] = (self.kv_dtype, (2, "num_tokens", self.kv_heads,
                                                              self.head_dim))
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineIO":
        return cls(**d)


# ---- the per-step index math, over a builder ----------------------------------------------------


class OpBuilder(Protocol):
    """What the index math needs of a graph builder: `b.Op(*inputs, **attrs)` for any ONNX op
    (returning the output's name) and `b.const(value, dtype)`. model_zoo's GraphBuilder and
    the PagedAttention function body both are one."""

    def const(self, value, dtype=np.int64) -> str: ...
    def __getattr__(self, op_type: str): ...


def token_sequences(b, positions: str, seq_starts: str) -> tuple[str, str]:
    """(seq [T] int64: the sequence of each token, n_tok [1] int64: T).

    Token t belongs to the number of sequence ends at or before it."""
    n_tok = b.Shape(positions)
    rows = b.Unsqueeze(b.Range(b.const(0), b.Squeeze(n_tok, b.const([0])), b.const(1)),
                       b.const([1]))                                       # [T, 1]
    ends = b.Unsqueeze(b.Cast(b.Slice(seq_starts, b.const([1]), b.const([2**31 - 1])), to=7),
                       b.const([0]))                                       # [1, B] int64
    seq = b.ReduceSum(b.Cast(b.GreaterOrEqual(rows, ends), to=7), b.const([1]), keepdims=0)
    return seq, n_tok


def token_block_tables(b, block_tables: str, seq: str) -> str:
    """int64 [T, max_blocks]: the block table of each token's sequence."""
    return b.Cast(b.Gather(block_tables, seq), to=7)


def kv_write_index(b, token_blocks: str, pos64: str, n_tok: str, kv_heads: str,
                   block_size: str) -> str:
    """ScatterND indices int64 [2, T, Hkv, 4] = (K or V, block, kv head, row in block) of each
    new K/V row. kv_heads: int64 [1]; block_size: an int64 scalar."""
    block = b.GatherElements(token_blocks, b.Unsqueeze(b.Div(pos64, block_size),
                                                       b.const([1])), axis=1)      # [T, 1]
    row = b.Unsqueeze(b.Mod(pos64, block_size), b.const([1]))                      # [T, 1]
    shape = b.Concat(b.const([2]), n_tok, kv_heads, b.const([1]), axis=0)
    heads = b.Reshape(b.Range(b.const(0), b.Squeeze(kv_heads, b.const([0])), b.const(1)),
                      b.const([1, 1, -1, 1]))
    parts = [b.const(np.arange(2).reshape(2, 1, 1, 1)), b.Unsqueeze(block, b.const([0, 3])),
             heads, b.Unsqueeze(row, b.const([0, 3]))]
    return b.Concat(*[b.Expand(p, shape) for p in parts], axis=-1)


def key_mask(b, block_tables: str, context_lens: str, seq: str, pos64: str, block_size: str,
             lowest: str | None = None) -> str:
    """float32 [T, 1, 1, max_blocks * block_size]: 0 where a token sees key j, MASKED elsewhere.

    Key j is visible to a token at position p iff j <= p and j < its context length, and,
    with a sliding window, j > lowest ([T, 1] int64, p - window)."""
    n_keys = b.Mul(b.Shape(block_tables, start=1, end=2), block_size)
    keys = b.Range(b.const(0), b.Squeeze(n_keys, b.const([0])), b.const(1))        # [C]
    pos_col = b.Unsqueeze(pos64, b.const([1]))                                      # [T, 1]
    ctx_len = b.Unsqueeze(b.Cast(b.Gather(context_lens, seq), to=7), b.const([1]))
    visible = b.And(b.LessOrEqual(keys, pos_col), b.Less(keys, ctx_len))
    if lowest is not None:
        visible = b.And(visible, b.Greater(keys, lowest))
    mask = b.Where(visible, b.const(0.0, np.float32), b.const(MASKED, np.float32))
    return b.Unsqueeze(mask, b.const([1, 2]))


# ---- the host side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One sequence's share of a step: `tokens` are its new tokens, starting at position
    `start`; `blocks` its block table (at least enough blocks for start + len(tokens))."""

    tokens: Sequence[int]
    start: int
    blocks: Sequence[int]


def pack_step(chunks: Sequence[Chunk], block_size: int) -> dict[str, np.ndarray]:
    """The control inputs of one step from a list of chunks (see `pack_arrays`)."""
    counts = np.fromiter((len(c.tokens) for c in chunks), np.int32, len(chunks))
    first = np.fromiter((c.start for c in chunks), np.int32, len(chunks))
    if counts.max() == 1:   # a decode step: one token each (the common case, kept cheap)
        ids = np.fromiter((c.tokens[0] for c in chunks), np.int32, len(chunks))
    else:
        ids = np.concatenate([np.asarray(c.tokens, np.int32) for c in chunks])
    width = int(-(-(first + counts).max() // block_size))
    tables = np.zeros((len(chunks), width), np.int32)
    for row, c in enumerate(chunks):
        used = np.asarray(c.blocks[:width], np.int32)
        tables[row, :used.size] = used
    return pack_arrays(ids, counts, first, tables, block_size)


@functools.lru_cache(maxsize=16)
def _one_token_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """`seq_starts` and `last_token_rows` of a step of n one-token sequences: 0..n and
    0..n-1. Every decode step of a batch of n has these, so they are made once (read-only,
    since every such step shares them): cold after a model step, an `arange` costs several
    microseconds of a decode step's ~200 of host time."""
    starts = np.arange(n + 1, dtype=np.int32)
    starts.flags.writeable = False
    return starts, starts[:-1]


def pack_decode(ids: np.ndarray, positions: np.ndarray, ctx: np.ndarray,
                tables: np.ndarray) -> dict[str, np.ndarray]:
    """`pack_arrays` of a decode step (one token a sequence: `ids`, at `positions`, context
    lengths `ctx` = positions + 1) from arrays already as the step takes them: int32 [B],
    and `tables` int32 [B, ceil(max(ctx) / block_size)], C-contiguous. They go in as they
    are, unchecked: a decode step's host time is mostly the cost of small calls, each a
    cache miss or more after a model step."""
    starts, last_rows = _one_token_rows(len(ids))
    return {INPUT_IDS: ids, POSITION_IDS: positions, SEQ_STARTS: starts, CONTEXT_LENS: ctx,
            BLOCK_TABLES: tables, LAST_TOKEN_ROWS: last_rows}


def pack_arrays(ids: np.ndarray, counts: np.ndarray, first: np.ndarray, tables: np.ndarray,
                block_size: int, *, ctx: np.ndarray | None = None,
                longest: int | None = None) -> dict[str, np.ndarray]:
    """The control inputs of one step: `ids` int32 [T] the new tokens packed, `counts` and
    `first` int32 [B] each sequence's number of new tokens (at least 1) and the position of
    its first, `tables` int [B, >= width] the block tables. They are cut to the width the
    longest context needs.

    Unused table entries must be valid block ids (0, say): the kernels and the graph never
    read past a sequence's context length. A caller that already has the context lengths
    (`ctx`, first + counts) and their maximum (`longest`) passes them: a decode step's host
    time is mostly the fixed cost of such small numpy calls. The arrays returned are the
    step's to read: a decode step's `seq_starts` and `last_token_rows` are shared by every
    step of its batch size (read-only), and the tables may be the caller's own."""
    if ctx is None:
        ctx = first + counts
    if ids.size == counts.size:   # one token a sequence (a decode step): fewer numpy calls,
        starts, last_rows = _one_token_rows(len(counts))       # each costs microseconds
        positions = first
    else:
        starts = np.zeros(len(counts) + 1, np.int32)
        np.cumsum(counts, out=starts[1:])
        positions = np.repeat(first - starts[:-1], counts) + np.arange(starts[-1],
                                                                      dtype=np.int32)
        last_rows = starts[1:] - 1
    width = -(-(int(ctx.max()) if longest is None else longest) // block_size)
    if tables.shape[1] != width or tables.dtype != np.int32 or not tables.flags.c_contiguous:
        tables = np.ascontiguousarray(tables[:, :width], np.int32)   # else it is already
    if positions.dtype != np.int32:
        positions = positions.astype(np.int32)
    return {INPUT_IDS: ids, POSITION_IDS: positions, SEQ_STARTS: starts, CONTEXT_LENS: ctx,
            BLOCK_TABLES: tables, LAST_TOKEN_ROWS: last_rows}
