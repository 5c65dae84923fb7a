"""Paged attention: which kernels one step launches (decode or prefill, splits, shared
memory), their workspace and arguments, and the PagedAttention plugin's attributes and sizes.

Plain shape arithmetic, so it runs (and is tested) without a GPU or TensorRT: the torch
launcher (launch.py) and the TensorRT glue (trt_paged_attention.py) both plan and build their
launches here, so the GPU tests check the argument order TensorRT uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmc import contract

from .launch_rules import Launch, dtype_tag, float_bits
from .records import deserialize

HEAD_DIMS = (64, 128)
BLOCK_SIZES = (16, 32, 64)
ATTN_BN = 64                # key-tile columns, as in paged_attention.cu
ATTN_THREADS = 128          # decode kernel
# Prefill kernel variants: entry suffix -> warps (16 query rows each). See paged_attention.cu.
PREFILL_WARPS = {"w4": 4, "w8s": 8}
PREFILL_VARIANT = "w8s"  # 1.19x SDPA flash at 2k tokens on H100, against 1.42x for w4
# Hopper's prefill kernel (paged_attention_sm90.cu, sm_90a only): TMA + wgmma, a producer and
# two consumer warpgroups, 128 query rows and 128-key tiles in 2 stages. 16-bit pools (with or
# without a soft-cap); E4M3 pools keep the variants above.
SM90_VARIANT = "sm90"
SM90_MODULE = "paged_attention_sm90"
SM90_ROWS, SM90_THREADS, SM90_BN, SM90_STAGES = 128, 384, 128, 2
MAX_GRID_Y = 65535
# Decode K/V pipeline depths with an entry each, deepest (fastest) first; the plan takes the
# deepest that fits the device's shared memory per block. Entry suffix: 3 -> "", 2 -> "_s2".
DECODE_STAGES = (3, 2)
MIN_SPLIT_KEYS = ATTN_BN    # a split is at least one key tile
DECODE_WAVES = 2            # decode splits a context until its CTAs fill this many waves
MAX_DECODE_SPLITS = 512     # the reduce kernel's shared weights (REDUCE_SPLITS)


@dataclass(frozen=True)
class PoolMap:
    """A kernel argument: the TMA tensor map of a KV pool, seen as a 2-D tensor of `cols`
    16-bit columns by `rows` rows, copied in boxes of 64 columns by `box_rows` rows with the
    128-byte swizzle. The launcher encodes it (cuTensorMapEncodeTiled) from the pool pointer
    `pool` (its own pointer kind, as in attention_launches' `ptr`)."""
    pool: object
    rows: int
    cols: int
    box_rows: int
    dtype: str


@dataclass(frozen=True)
class AttentionPlan:
    kv_write: Launch | None
    main: Launch
    reduce: Launch | None
    n_split: int
    chunk: int             # least keys a split takes (decode path; the kernel spreads each
                           # token's own context over the splits in whole key tiles)
    workspace_bytes: int   # fp32 partial O + lse per (token, q head, split)
    pack: int = 1          # q heads per prefill tile (prefill path)
    window: int = 0        # sliding window (keys p - window < j <= p), 0 = none
    softcap: float = 0.0   # logit soft-cap cap * tanh(s / cap) (Gemma 2), 0 = none
    e4m3: bool = False     # the pool holds E4M3 bytes; the launches take its K and V scales
    pool_map: str = ""     # the sm90 kernel: dtype of the pool's tensor map, which it takes last
    counters: int = 0      # split decode whose last CTA combines the splits: the zeroed int32
                           # counters it takes (a token's kv heads), instead of `reduce`
    items: int = 0         # scheduled decode: its grid rows, the most items decode_schedule
                           # may list (0: the grid's splits, n_split a token)
    slots: int = 0         # scheduled decode: the CTAs decode_schedule balances the items'
                           # keys over

    @property
    def decode(self) -> bool:
        return self.main.kernel.startswith("attn_decode")


def decode_smem(head_dim: int, stages: int = DECODE_STAGES[0], e4m3: bool = False) -> int:
    """Q, then the K/V stages (an E4M3 pool's in bytes, which the MMAs read as they are)."""
    tile = ATTN_BN * head_dim
    kv = stages * 2 * tile * (1 if e4m3 else 2)
    combine = 4 * 16 * head_dim * 4 + 2 * 4 * 16 * 4  # per-warp O, m, l reuse the K/V tiles
    return 16 * head_dim * 2 + max(kv, combine)


def decode_stages(head_dim: int, max_smem: int, e4m3: bool = False) -> int | None:
    """Deepest decode pipeline whose shared memory fits max_smem; None if none does."""
    return next((st for st in DECODE_STAGES if decode_smem(head_dim, st, e4m3) <= max_smem),
                None)


def prefill_smem(head_dim: int, variant: str = PREFILL_VARIANT, e4m3: bool = False) -> int:
    """The Q tile and one K and one V tile of 16-bit values; with an E4M3 pool, a K and a V
    tile of bytes besides, where the pool's tiles land before they are dequantized.
    sm90: Q, the K/V stages, four barriers a stage (full and empty, K and V), and the slack that
    aligns the tiles to 1024 bytes (Sm90Layout in paged_attention_sm90.cu)."""
    if variant == SM90_VARIANT:
        return (SM90_ROWS + 2 * SM90_STAGES * SM90_BN) * head_dim * 2 + 4 * SM90_STAGES * 8 + 1024
    return (16 * PREFILL_WARPS[variant] + 2 * ATTN_BN) * head_dim * 2 + \
        (2 * ATTN_BN * head_dim if e4m3 else 0)


def prefill_rows_threads(variant: str) -> tuple[int, int]:
    """Query rows a CTA of the variant takes, and its threads."""
    if variant == SM90_VARIANT:
        return SM90_ROWS, SM90_THREADS
    return 16 * PREFILL_WARPS[variant], 32 * PREFILL_WARPS[variant]


def check_attention(num_q_heads, num_kv_heads, head_dim, block_size, window=0, softcap=0.0):
    if window < 0:
        raise ValueError(f"sliding window {window} < 0 (0 means none)")
    if not softcap >= 0 or softcap == float("inf"):
        raise ValueError(f"logit soft-cap {softcap} is not a positive number (0 means none)")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} not in {HEAD_DIMS}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} not in {BLOCK_SIZES}")
    if num_q_heads % num_kv_heads or num_q_heads // num_kv_heads > 16:
        raise ValueError("Hq must be a multiple of Hkv with at most 16 q heads per kv head")


SOFTCAP_MODULE = "paged_attention_softcap"   # the soft-capped entries' own module
E4M3_MODULES = ("paged_attention_e4m3", "paged_attention_softcap_e4m3")   # an E4M3 pool's


def attention_module(softcap: float, e4m3: bool = False) -> str:
    """The module of the attention entries: soft-capped ones and those reading an E4M3 pool
    are compiled only for the models that have them."""
    return "paged_attention" + ("_softcap" if softcap else "") + ("_e4m3" if e4m3 else "")


def _suffix(softcap: float, e4m3: bool) -> str:
    """The entry-point suffix of the E4M3-pool and soft-capped kernels (their own template
    instances)."""
    return ("_e4m3" if e4m3 else "") + ("_softcap" if softcap else "")


def _kv_write(tokens, dtype, write_kv, e4m3=False):
    if write_kv and e4m3:
        raise ValueError("an E4M3 pool is written by the rope kernel (rope_launch's e4m3), "
                         "not by kv_write: plan its attention with write_kv=False")
    return (Launch("paged_attention", f"kv_write_{dtype_tag(dtype)}", (tokens, 1, 1), (128, 1, 1))
            if write_kv else None)


def decode_plan(tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                max_blocks: int, block_size: int, dtype: str, sm_count: int,
                write_kv: bool = True, *, max_smem: int, window: int = 0,
                softcap: float = 0.0, e4m3: bool = False,
                fuse_reduce: bool = False, schedule: bool = False) -> AttentionPlan:
    """One CTA per (token, kv head, split); splits chosen so the grid fills two waves.

    The split count is fixed here (a decode graph is captured for the longest context), but
    each token's keys are divided on the device: its own context over the n_split splits in
    whole key tiles, at least `chunk` keys each. So a short context in a graph sized for a
    long one still runs on every split its length allows (at batch 1 a 512-key context takes
    8 splits a kv head, not the 2 that a fixed 256-key chunk gave).

    max_smem: the device's per-block opt-in shared memory; the deepest K/V pipeline that fits
    is taken (ValueError if none: attention_plan then falls back to the prefill kernel).
    With a window, a token's keys start at the key tile holding its window's first key, so
    they span at most window + ATTN_BN - 1 positions: the split count is sized from that.
    softcap > 0: the scores are soft-capped (the _softcap entries; Gemma 2).
    e4m3: the pool holds E4M3 bytes (the _e4m3 entries; attention_launches takes its scales).
    fuse_reduce: with splits, the last CTA of a (token, kv head) to finish combines them,
    counting arrivals in `counters` zeroed int32s that it leaves zeroed (a caller that can
    keep such memory across launches: the cuda backend); else attn_reduce runs after it.
    schedule: the splits come from a schedule the caller writes before each launch
    (decode_schedule, from the step's context lengths; the cuda backend's session does):
    one CTA per (kv head, item), a long context split into more items than a short one and
    the longest items first, so a batch of mixed lengths does not wait on its longest
    sequence's CTAs at the end. It combines in the last CTA (needs fuse_reduce)."""
    check_attention(num_q_heads, num_kv_heads, head_dim, block_size, window, softcap)
    stages = decode_stages(head_dim, max_smem, e4m3)
    if stages is None:
        raise ValueError(f"decode at head_dim {head_dim} needs "
                         f"{decode_smem(head_dim, 2, e4m3)} bytes of shared memory, over "
                         f"max_smem {max_smem}")
    suffix = "" if stages == DECODE_STAGES[0] else f"_s{stages}"
    smem = decode_smem(head_dim, stages, e4m3)
    name = f"attn_decode_{dtype_tag(dtype)}_d{head_dim}{suffix}{_suffix(softcap, e4m3)}"
    chunk = MIN_SPLIT_KEYS
    if schedule:
        if not fuse_reduce:
            raise ValueError("a scheduled decode combines its splits in its last CTA: plan it "
                             "with fuse_reduce=True")
        # The balanced share is sized for the grid plan's DECODE_WAVES x SMs CTAs (two 16-bit
        # decode CTAs fit an SM): an E4M3 pool's smaller CTAs fit four, but four an SM, one
        # short item each, measured slower at batch 1 (bench/results/kernels.md).
        slots = DECODE_WAVES * sm_count
        # decode_schedule's items number fewer than slots / Hkv + tokens (each token's last
        # item is the only one shorter than the balanced share)
        items = math.ceil(slots / num_kv_heads) + tokens
        if items > MAX_GRID_Y:
            raise ValueError(f"a scheduled decode of {tokens} tokens needs {items} grid rows, "
                             f"over {MAX_GRID_Y}")
        main = Launch(attention_module(softcap, e4m3), name, (num_kv_heads, items, 1),
                      (ATTN_THREADS, 1, 1), smem)
        return AttentionPlan(_kv_write(tokens, dtype, write_kv, e4m3), main, None, 0, chunk,
                             items * num_q_heads * (head_dim + 1) * 4, window=window,
                             softcap=softcap, e4m3=e4m3, counters=tokens * num_kv_heads,
                             items=items, slots=slots)
    max_ctx = max_blocks * block_size
    span = min(max_ctx, window + ATTN_BN - 1) if window else max_ctx
    want = math.ceil(DECODE_WAVES * sm_count / (tokens * num_kv_heads))
    n_split = max(1, min(want, math.ceil(span / MIN_SPLIT_KEYS), MAX_DECODE_SPLITS))
    main = Launch(attention_module(softcap, e4m3), name, (tokens, num_kv_heads, n_split),
                  (ATTN_THREADS, 1, 1), smem)
    red, ws, counters = None, 0, 0
    if n_split > 1:
        ws = tokens * num_q_heads * n_split * (head_dim + 1) * 4
        if fuse_reduce:
            counters = tokens * num_kv_heads
        else:
            red = Launch("paged_attention", f"attn_reduce_{dtype_tag(dtype)}",
                         (tokens * num_q_heads, 1, 1), (head_dim, 1, 1))
    return AttentionPlan(_kv_write(tokens, dtype, write_kv, e4m3), main, red, n_split, chunk,
                         ws, window=window, softcap=softcap, e4m3=e4m3, counters=counters)


def token_keys(seq_starts, context_lens) -> tuple[np.ndarray, np.ndarray]:
    """Each token's own context (its position + 1: the keys it attends to without a window)
    and its sequence, in a ragged batch. A decode step's (a token a sequence) are its
    context_lens and 0 .. B - 1."""
    ss, cl = np.asarray(seq_starts, np.int64), np.asarray(context_lens, np.int64)
    lens = np.diff(ss)
    if lens.size == ss[-1] and lens.min() == 1:
        return cl, np.arange(lens.size)
    seq = np.repeat(np.arange(lens.size), lens)
    return cl[seq] - lens[seq] + np.arange(ss[-1]) - ss[seq] + 1, seq


def _pieces(keys, longest: int):
    """(length, count) of the items a token's keys make: the fewest pieces of at most
    `longest` keys, as even as whole key tiles allow. ints or numpy arrays alike."""
    per = (-(-keys // -(-keys // longest)) + ATTN_BN - 1) // ATTN_BN * ATTN_BN
    return per, -(-keys // per)


# A scheduled decode's row: the item (token, first key, end key, slot), then what its CTA
# needs of the token (sequence, position, first slot, items), all read at once.
SCHEDULE_ROW = 8


def decode_schedule(context_lens, plan: AttentionPlan, seq_starts=None) -> np.ndarray:
    """The work list of a scheduled decode (decode_plan's schedule) for one step: int32
    [plan.items, SCHEDULE_ROW], what its `sched` argument points at. context_lens: the step's
    (a sequence's keys after it); seq_starts: the step's, None for a token a sequence (a
    decode step).

    One row a grid row: (token, first key, end key, slot, the token's sequence, its position,
    its first slot, its items); rows past the step's items have token -1. A token's keys (from
    the key tile holding its window's first key to its position) are cut into whole key tiles
    no longer than the balanced share of a CTA slot (all keys x Hkv / plan.slots), as evenly
    as the tiles allow; its items take consecutive slots (the rows of its partial results in
    the workspace). The items are listed longest first, so the GPU, which starts CTAs in grid
    order, starts the long ones first and fills the end with short ones
    (longest-processing-time-first scheduling). Everything a CTA needs is in its own row, so
    it starts its loads after one read, not after a search of seq_starts. Host time, on the
    critical path of every decode step: 8-20 us of numpy on a 2-core VM (8 at batch 1, 9-11
    where every token is one item)."""
    if seq_starts is None:
        end = np.asarray(context_lens, np.int64)
        seq = np.arange(end.size)
    else:
        end, seq = token_keys(seq_starts, context_lens)
    t, bn = end.size, ATTN_BN
    first = np.maximum(end - plan.window, 0) // bn * bn if plan.window else np.zeros_like(end)
    keys = np.maximum(end - first, 1)
    share = -(-int(keys.sum()) * plan.main.grid[0] // plan.slots)
    longest = max(bn, -(-share // bn) * bn)
    out = np.zeros((plan.items, SCHEDULE_ROW), np.int32)
    if t == 1:   # batch 1, where host time counts most: its items are in order already
        per, n = _pieces(int(keys[0]), longest)
        k0 = int(first[0]) + per * np.arange(n)
        rows = out[:n]
        rows[:, 1], rows[:, 2], rows[:, 3] = k0, np.minimum(k0 + per, int(end[0])), np.arange(n)
        rows[:, 5], rows[:, 7] = int(end[0]) - 1, n
        out[n:, 0] = -1
        return out
    if keys.max() <= longest:   # one item a token (a large batch): its slot is its index
        order = np.argsort(-keys, kind="stable")
        rows = out[:t].T
        rows[0], rows[1], rows[2], rows[3] = order, first[order], end[order], order
        rows[4], rows[5], rows[6], rows[7] = seq[order], end[order] - 1, order, 1
        out[t:, 0] = -1
        return out
    per, n = _pieces(keys, longest)
    base = np.cumsum(n) - n
    tok = np.repeat(np.arange(t), n)
    i = np.arange(tok.size) - base[tok]
    k0 = first[tok] + i * per[tok]
    k1 = np.minimum(k0 + per[tok], end[tok])
    order = np.argsort(k0 - k1, kind="stable")
    if tok.size > plan.items:   # cannot happen (decode_plan sizes items), but never overrun
        raise ValueError(f"{tok.size} decode items, over the plan's {plan.items}")
    tt = tok[order]
    rows = out[:tok.size].T   # an item's slot: its index in token order, base[tok] + i
    rows[0], rows[1], rows[2], rows[3] = tt, k0[order], k1[order], order
    rows[4], rows[5], rows[6], rows[7] = seq[tt], end[tt] - 1, base[tt], n[tt]
    out[tok.size:, 0] = -1
    return out


def prefill_plan(tokens: int, batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int, dtype: str, write_kv: bool = True,
                 variant: str | None = None, pack: int | None = None, *, max_smem: int,
                 window: int = 0, softcap: float = 0.0, e4m3: bool = False,
                 sm90: bool = False) -> AttentionPlan:
    """One CTA per (tile of one sequence's tokens, group of `pack` q heads of one kv head).

    A tile has 16 * warps rows (128 for sm90): tokens x the pack heads (pack defaults to the
    whole GQA group, so each K/V tile feeds every q head that reads it). Tiles are found on
    the device from seq_starts; the grid's y extent bounds their count for any ragged split.
    variant None: sm90 where `sm90` (an sm_90a device) allows it (a 16-bit pool) and it fits
    max_smem, else PREFILL_VARIANT, or the first of PREFILL_WARPS whose shared memory fits
    max_smem.
    e4m3: the pool holds E4M3 bytes (the _e4m3 entries)."""
    check_attention(num_q_heads, num_kv_heads, head_dim, block_size, window, softcap)
    if variant == SM90_VARIANT and e4m3:
        raise ValueError("the sm90 prefill kernel reads 16-bit pools, not E4M3 ones")
    if variant is None:
        order = [PREFILL_VARIANT] + [v for v in PREFILL_WARPS if v != PREFILL_VARIANT]
        if sm90 and not e4m3:
            order.insert(0, SM90_VARIANT)
        variant = next((v for v in order if prefill_smem(head_dim, v, e4m3) <= max_smem), None)
        if variant is None:
            raise ValueError(f"no attention kernel at head_dim {head_dim} fits max_smem "
                             f"{max_smem} bytes of shared memory per block")
    elif prefill_smem(head_dim, variant, e4m3) > max_smem:
        raise ValueError(f"prefill {variant} needs {prefill_smem(head_dim, variant, e4m3)} "
                         f"bytes of shared memory, over max_smem {max_smem}")
    group = num_q_heads // num_kv_heads
    pack = group if pack is None else pack
    if group % pack:
        raise ValueError(f"pack {pack} must divide the GQA group {group}")
    rows, threads = prefill_rows_threads(variant)
    tpt = rows // pack  # tokens per tile
    tiles = math.ceil(tokens / tpt) + batch  # each sequence adds at most one partial tile
    if tiles > MAX_GRID_Y:
        raise ValueError(f"{tokens} tokens need {tiles} query tiles, over {MAX_GRID_Y}")
    tma = variant == SM90_VARIANT
    main = Launch(SM90_MODULE if tma else attention_module(softcap, e4m3),
                  f"attn_prefill_{dtype_tag(dtype)}_d{head_dim}_{variant}"
                  f"{_suffix(softcap, e4m3)}",
                  (num_q_heads // pack, tiles, 1), (threads, 1, 1),
                  prefill_smem(head_dim, variant, e4m3))
    return AttentionPlan(_kv_write(tokens, dtype, write_kv, e4m3), main, None, 1, 0, 0, pack,
                         window=window, softcap=softcap, e4m3=e4m3,
                         pool_map=dtype if tma else "")


def attention_plan(tokens: int, batch: int, num_q_heads: int, num_kv_heads: int,
                   head_dim: int, max_blocks: int, block_size: int, dtype: str,
                   sm_count: int, write_kv: bool = True, *, max_smem: int,
                   window: int = 0, softcap: float = 0.0, e4m3: bool = False,
                   sm90: bool = False, fuse_reduce: bool = False,
                   schedule: bool = False) -> AttentionPlan:
    """Kernels of one PagedAttention step, from shapes alone (what TensorRT knows at enqueue).

    tokens == batch means every sequence brings one new token (a pure decode step): the
    decode kernel reads each K/V byte once per kv head and splits long contexts over CTAs.
    Otherwise one prefill-tile launch covers prefill chunks and decode tokens together.
    Both kernels are correct for any ragged batch; the choice is only about speed, and about
    max_smem (the device's per-block opt-in shared memory; llmc.devices.MAX_SMEM_OPTIN without
    a device): decode drops to 2 K/V stages where 3 do not fit, and to the prefill kernel
    where 2 do not.
    window: sliding window (HF Mistral `sliding_window`), 0 = none.
    softcap: logit soft-cap (Gemma 2 `attn_logit_softcapping`), 0 = none.
    e4m3: the pool holds E4M3 bytes with a K and a V scale (--kv-cache-dtype fp8), written by
    the rope kernel (write_kv must be False), read by the _e4m3 entries.
    sm90: the device is sm_90a, so prefill steps may take the TMA + wgmma kernel (whose
    launch takes a PoolMap of the pool).
    fuse_reduce, schedule: decode_plan's (split decode combines in its last CTA; the caller
    writes the decode's schedule, decode_schedule, before each launch)."""
    if tokens == batch and decode_stages(head_dim, max_smem, e4m3) is not None:
        return decode_plan(tokens, num_q_heads, num_kv_heads, head_dim, max_blocks,
                           block_size, dtype, sm_count, write_kv, max_smem=max_smem,
                           window=window, softcap=softcap, e4m3=e4m3, fuse_reduce=fuse_reduce,
                           schedule=schedule)
    return prefill_plan(tokens, batch, num_q_heads, num_kv_heads, head_dim, block_size, dtype,
                        write_kv, max_smem=max_smem, window=window, softcap=softcap,
                        e4m3=e4m3, sm90=sm90)


# ---- the PagedAttention plugin: attributes, sizes, launches -------------------------------

def paged_attention_attrs(fields: dict) -> dict:
    """PagedAttention record from TensorRT plugin fields: either our serialized record (field
    'record', the runtime path) or the ONNX node's attributes (the build path; names as
    passes/attention.py writes them, values scalars or 1-element arrays)."""
    if "record" in fields:
        return deserialize("PagedAttention", bytes(fields["record"]))

    def one(name, default=None):
        if name not in fields:
            if default is None:
                raise ValueError(f"PagedAttention: attribute {name!r} missing")
            return default
        v = fields[name]
        return v[0] if hasattr(v, "__len__") else v
    attrs = dict(num_q_heads=int(one("num_heads")), num_kv_heads=int(one("num_kv_heads")),
                 head_dim=int(one("head_dim")), block_size=int(one("block_size")))
    attrs["scale"] = float(one("scale", attrs["head_dim"] ** -0.5))
    attrs["write_kv"] = int(one("write_kv", 1))
    attrs["sliding_window"] = int(one("sliding_window", 0))
    softcap = float(one("softcap", 0.0))   # the node carries it (Gemma 2); the record has none
    if softcap != 0.0:
        raise ValueError(f"the PagedAttention TensorRT plugin does not carry a logit soft-cap "
                         f"(softcap={softcap}): its record has no field for it; the cuda "
                         "backend's kernels have it")
    check_attention(attrs["num_q_heads"], attrs["num_kv_heads"], attrs["head_dim"],
                    attrs["block_size"], attrs["sliding_window"])
    return attrs


def paged_attention_dims(q_dims, cache_dims, table_dims) -> dict:
    """Run-time sizes from the input shapes (TensorRT's input descs at enqueue)."""
    t, hq, d = q_dims
    two, nb, hkv, bs, d2 = cache_dims
    b, mb = table_dims
    if two != 2 or d2 != d:
        raise ValueError(f"kv_cache {tuple(cache_dims)} does not match q {tuple(q_dims)}")
    return dict(tokens=t, batch=b, hq=hq, hkv=hkv, d=d, max_blocks=mb, block_size=bs,
                num_blocks=nb)


def attention_workspace_bound(max_tokens: int, max_batch: int, num_q_heads: int,
                              num_kv_heads: int, head_dim: int, max_blocks: int,
                              block_size: int, sm_count: int, *, max_smem: int,
                              window: int = 0, e4m3: bool = False,
                              schedule: bool = False) -> int:
    """Workspace bytes that cover every step up to these limits (TensorRT asks once, for the
    profile's max shapes). Only decode steps (tokens == batch) use a workspace, and its size
    is not monotonic in tokens (fewer tokens -> more splits), so take the max over them."""
    best = 0
    for t in range(1, min(max_tokens, max_batch) + 1):
        plan = attention_plan(t, t, num_q_heads, num_kv_heads, head_dim, max_blocks,
                              block_size, "float16", sm_count, write_kv=False,
                              max_smem=max_smem, window=window, e4m3=e4m3,
                              fuse_reduce=schedule, schedule=schedule)
        best = max(best, plan.workspace_bytes)
    return best


def workspace_lse_offset(plan: AttentionPlan, tokens: int, num_q_heads: int,
                         head_dim: int) -> int:
    """Byte offset of the lse part of the workspace (partial O first, fp32)."""
    rows = plan.items if plan.items else tokens * plan.n_split
    return rows * num_q_heads * head_dim * 4


def attention_launches(plan: AttentionPlan, dims: dict, scale: float, ptr: dict,
                       kv_scales: tuple[float, float] | None = None) -> list:
    """(Launch, args) of one step, in order. `ptr` maps q, k, v, seq_starts, context_lens,
    block_tables, cache (the KV pool), out, ws_o, ws_lse, arrived (plan.counters zeroed
    int32s, or a null pointer where plan.counters is 0) and sched (a scheduled decode's
    decode_schedule, else a null pointer) to device pointers of the caller's kind; ints in
    args are int32 scalars. The torch launcher (launch.py) and the TensorRT glue both
    build their launches here, so the GPU tests check the argument order TensorRT uses.
    kv_scales: (K, V) scales of an E4M3 pool, given exactly when the plan reads one."""
    if plan.e4m3 != (kv_scales is not None):
        raise ValueError("an E4M3 pool's attention takes its (K, V) scales, and only it does")
    t, b, hq, hkv, d = (dims[k] for k in ("tokens", "batch", "hq", "hkv", "d"))
    mb, bs, nb = dims["max_blocks"], dims["block_size"], dims["num_blocks"]
    meta = [ptr[contract.SEQ_STARTS], ptr[contract.CONTEXT_LENS], ptr[contract.BLOCK_TABLES]]
    out = []
    if plan.kv_write:
        out.append((plan.kv_write, [ptr["k"], ptr["v"], *meta, t, b, hkv, d, mb, bs, nb,
                                    ptr["cache"]]))
    sc = [t, b, hq, hkv, mb, bs, nb, float_bits(scale), plan.window]
    sc += [float_bits(x) for x in kv_scales] if plan.e4m3 else []   # the _e4m3 entries
    sc += [float_bits(plan.softcap)] if plan.softcap else []         # the _softcap entries
    head = [ptr["q"], *meta, ptr["cache"], *sc]
    if not plan.decode:
        pool = [PoolMap(ptr["cache"], 2 * nb * hkv * bs, d, bs, plan.pool_map)] \
            if plan.pool_map else []
        out.append((plan.main, head + [plan.pack, ptr["out"], *pool]))
        return out
    out.append((plan.main, head + [plan.n_split, plan.chunk, ptr["out"], ptr["ws_o"],
                                   ptr["ws_lse"], ptr["arrived"], ptr["sched"]]))
    if plan.reduce:
        out.append((plan.reduce, [ptr["ws_o"], ptr["ws_lse"], t * hq, d, plan.n_split,
                                  ptr["out"]]))
    return out
