"""The launches of one step of a plan, for T tokens in B sequences with block tables W wide.

One function turns the plan's ops into kernel launches (plugins/launch_rules.py,
plugins/attention_plan.py) and GEMM calls; the session runs them, and the lowering runs the
same function over every shape the limits allow with made-up pointers, so a plan that builds
is a plan whose every launch rule accepts its shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from llmc import contract
from llmc.backends.cuda.plan import Op, Plan, int4_block_offsets, itemsize, numel
from llmc.plugins import attention_plan as ap
from llmc.plugins import launch_rules as lr
from llmc.plugins.launch import DevPtr

ATTN_WORKSPACE = "attention workspace"
QGEMM_WORKSPACE = "quantized GEMM workspace"   # a prefill's dequantized INT4 weight or FP8 x,
#                                                 or the INT4 small-M GEMM's split-K partials
W4G_COUNTERS = "INT4 GEMM tile counters"        # zeroed once; each launch leaves them zero
ATTN_COUNTERS = "attention split counters"      # the same, for split decode's combine
ATTN_SCHEDULE = "attention decode schedule"     # + " w{window} h{kv heads}": a decode step's
#                                                 work list (attention_plan.decode_schedule),
#                                                 which the session writes before each step
FP8_UNIT_SCALES = "fp8 unit scales"   # fp32 1.0 per token: cuBLASLt's x-side channel scales
FIRST_TOKENS = "first tokens"         # int32 per token: nonzero at a sequence's first position
#                                       (a step input the session writes: FP8 GEMMs whose
#                                       first tokens take scales of their own)
FP8_ROW_SCALES = "fp8 row scales"     # fp32 per token: such a GEMM's x-side channel scales


@dataclass(frozen=True)
class Step:
    tokens: int          # T
    batch: int           # B
    width: int           # W: block-table columns
    num_blocks: int      # the KV pools' blocks (scratch block included)
    sm_count: int
    max_smem: int
    sm90: bool = False   # prefill attention may take the sm_90a kernel (the engine holds it)
    fuse_reduce: bool = True   # split decode combines in its last CTA (False: attn_reduce)
    w4_sm90: bool = False   # the INT4 small-M GEMM runs its wgmma kernel (the engine holds it)
    schedule: bool = True   # decode attention takes its splits from a host-written schedule
                            # (needs fuse_reduce; False: each token's context over the grid's)
    moe_sm90: bool = False   # the MoE GEMMs past decode run on wgmma (the engine holds it)
    moe_grid_route: bool = False   # steps of many routed rows group over a grid (the same)
    moe_fp8b_wide: bool = False   # ... both GEMMs over FP8 experts: 256-position tiles (the same)


def _attention(op: Op, s: Step, t: int, b: int, width: int, dt: str) -> ap.AttentionPlan:
    a = op.attrs
    return ap.attention_plan(t, b, a["hq"], a["hkv"], a["d"], width, a["block_size"], dt,
                             s.sm_count, write_kv=False, max_smem=s.max_smem,
                             window=a["window"], softcap=a.get("softcap", 0.0),
                             e4m3="kv_scale" in a, sm90=s.sm90, fuse_reduce=s.fuse_reduce,
                             schedule=s.schedule and s.fuse_reduce)


def schedule_name(op: Op) -> str:
    """The buffer of an attention op's decode schedule: ops of one window and kv-head
    count share it (their keys, and so their items, are the same)."""
    return f"{ATTN_SCHEDULE} w{op.attrs['window']} h{op.attrs['hkv']}"


def decode_schedules(plan: Plan, s: Step) -> dict[str, ap.AttentionPlan]:
    """The schedules a step's attention reads, by buffer name: the plan each is written for
    (attention_plan.decode_schedule). Empty unless the step is a scheduled decode."""
    out = {}
    for op in plan.ops:
        if op.op == "attention":
            att = _attention(op, s, s.tokens, s.batch, s.width, plan.dtype)
            if att.items:
                out[schedule_name(op)] = att
    return out


def gemm_key(op: Op) -> tuple:
    """GEMMs of one shape share a cuBLASLt plan (the weight pointer is a call argument). An
    INT4 GEMM's prefill runs cuBLASLt on its dequantized weight: a 16-bit plan."""
    a = op.attrs
    fp8 = ("fp8",) if a.get("quant") == "fp8" else ()
    return (a["n"], a["k"], a["trans_b"], a["out_dtype"], op.inputs[2] is not None, *fp8)


def first_tokens(plan: Plan) -> bool:
    """Whether the plan's FP8 GEMMs scale first tokens on their own (and so read the
    FIRST_TOKENS input and write FP8_ROW_SCALES)."""
    return any(op.attrs.get("first_token") for op in plan.ops)


def uses_gemv(op: Op, m: int) -> bool:
    """A GEMM of m rows runs as llmc's GEMV (kernels/gemv.cu, qgemv.cu) rather than
    cuBLASLt: decode steps of up to GEMV_MS[-1] rows (QGEMV_MS[-1] quantized), on a weight
    stored [N, K] (engines before the transposed layout keep cuBLASLt)."""
    if op.attrs.get("quant"):
        return m <= lr.QGEMV_MS[-1]
    return (op.attrs["trans_b"] and m <= lr.GEMV_MS[-1] and op.attrs["k"] % 8 == 0)


def uses_w4_gemm(op: Op, m: int) -> bool:
    """An INT4 GEMM of m rows past the GEMV's runs llmc's small-M GEMM (kernels/qgemv.cuh:
    w4_gemm) up to W4_GEMM_MAX_M rows, and cuBLASLt on the dequantized weight beyond."""
    return op.attrs.get("quant") == "int4" and lr.QGEMV_MS[-1] < m <= lr.W4_GEMM_MAX_M


def fuses_act(op: Op, m: int) -> bool:
    """The GEMM's kernel applies a gated activation itself (llmc's GEMV and INT4 GEMM do)."""
    return uses_gemv(op, m) or uses_w4_gemm(op, m)


def _w4_gemm_launch(op: Op, m: int, dt: str, sm_count: int, sm90: bool):
    a = op.attrs
    n = a["inter"] if a.get("act") else a["n"]
    return n, lr.w4_gemm_launch(m, n, a["k"], dt, a["out_dtype"], a.get("act"), a["group"],
                                sm_count=sm_count, offsets=_int4_offsets(op), sm90=sm90)


def _int4_offsets(op: Op) -> str:
    """What the op's input 5 holds for the INT4 kernels (launch_rules.INT4_OFFSETS)."""
    if not int4_block_offsets(op):
        return "none"
    return "offsets" if op.attrs.get("offsets") else "zero_points"


def qgemm_scratch(plan: Plan, max_tokens: int, max_batch: int, sm_count: int,
                  w4_sm90: bool = False) -> tuple[int, int]:
    """(bytes, counters) the quantized GEMMs need: the workspace holds an INT4 weight
    dequantized (steps past W4_GEMM_MAX_M rows), a block-wise FP8 one (past the GEMV's), x in
    FP8, or the small-M GEMM's split-K partials; the counters are its tiles'. A GEMM over the
    step's sequences (the LM head) has at most max_batch rows, the others max_tokens.
    w4_sm90: Step.w4_sm90."""
    need = counters = 0
    seen = set()   # (N, K, act, rows): the layers repeat a handful of GEMM shapes
    for op in plan.ops:
        q, a = op.attrs.get("quant"), op.attrs
        rows = max_batch if plan.values[op.inputs[0]].shape[0] == "B" else max_tokens
        if q == "int4":
            if rows > lr.W4_GEMM_MAX_M:
                need = max(need, a["n"] * a["k"] * itemsize(plan.dtype))
            if (a["n"], a["k"], a.get("act"), rows) in seen:
                continue
            seen.add((a["n"], a["k"], a.get("act"), rows))
            for m in range(lr.QGEMV_MS[-1] + 1, min(rows, lr.W4_GEMM_MAX_M) + 1):
                n, launch = _w4_gemm_launch(op, m, plan.dtype, sm_count, w4_sm90)
                nbytes, tiles = lr.w4_gemm_scratch(launch, m, n, a.get("act"))
                need, counters = max(need, nbytes), max(counters, tiles)
        elif q == "fp8":
            need = max(need, rows * a["k"])
        elif q == "fp8-block" and rows > lr.QGEMV_MS[-1]:
            need = max(need, a["n"] * a["k"] * itemsize(plan.dtype))
    return need, counters


def _qgemm(op: Op, m: int, dt: str, s: Step, P) -> Iterator[tuple]:
    """A quantized GEMM's launches up to its output (the caller adds the activation)."""
    a, ins, outs = op.attrs, op.inputs, op.outputs
    act, quant, k = a.get("act"), a["quant"], a["k"]
    bias = P(ins[2]) if ins[2] else DevPtr(0)
    pre = P(ins[4]) if ins[4] else DevPtr(0)     # INT4: AWQ's 1 / s
    zp = int4_block_offsets(op)
    zargs = [P(zp)] if zp else []
    if fuses_act(op, m):
        n, y = (a["inter"], outs[1]) if act else (a["n"], outs[0])
        scratch = []
        if uses_w4_gemm(op, m):
            _, launch = _w4_gemm_launch(op, m, dt, s.sm_count, s.w4_sm90)
            scratch = [P(QGEMM_WORKSPACE), P(W4G_COUNTERS)]
        else:
            launch = lr.qgemv_launch(m, n, k, dt, quant, a["out_dtype"], act,
                                     a.get("group", 0), s.sm_count, offsets=_int4_offsets(op))
        if quant == "int4":
            args = [P(ins[0]), P(ins[1]), P(ins[3]), pre, bias, m, n, k,
                    lr.int4_group_shift(a["group"]), P(y), *scratch, *zargs]
        elif quant == "fp8-block":
            args = [P(ins[0]), P(ins[1]), P(ins[3]), bias, m, n, k,
                    lr.fp8b_group_shift(a["group"]), P(y)]
        else:
            args = [P(ins[0]), P(ins[1]), P(ins[3]), lr.float_bits(a["x_scale"]), bias, m, n,
                    k, P(y), P(FIRST_TOKENS) if a.get("first_token") else DevPtr(0)]
        yield "kernel", launch, args
        return
    ws = P(QGEMM_WORKSPACE)
    if quant in ("int4", "fp8-block"):   # cuBLASLt on the weight dequantized
        if quant == "int4":
            yield "kernel", lr.dequant_int4_launch(a["n"], k, dt, _int4_offsets(op)), [
                P(ins[1]), P(ins[3]), pre, a["n"], k, lr.int4_group_shift(a["group"]), ws,
                *zargs]
        else:
            yield "kernel", lr.dequant_fp8b_launch(a["n"], k, dt), [
                P(ins[1]), P(ins[3]), a["n"], k, lr.fp8b_group_shift(a["group"]), ws]
        yield "gemm", gemm_key(op), (int(P(ins[0])), int(ws), int(P(outs[0])), m,
                                     int(bias) or None)
    elif a.get("first_token"):   # first tokens' rows scaled on their own (qgemv.cuh)
        yield "kernel", lr.quantize_fp8_rows_launch(m, k, dt), [
            P(ins[0]), lr.float_bits(a["x_scale"]), k, P(FIRST_TOKENS), ws, P(FP8_ROW_SCALES)]
        yield "gemm", gemm_key(op), (int(ws), int(P(ins[1])), int(P(outs[0])), m,
                                     int(bias) or None, int(P(ins[3])),
                                     int(P(FP8_ROW_SCALES)))
    else:
        yield "kernel", lr.quantize_fp8_launch(m * k, dt), [
            P(ins[0]), lr.float_bits(a["x_scale"]), m * k, ws]
        yield "gemm", gemm_key(op), (int(ws), int(P(ins[1])), int(P(outs[0])), m,
                                     int(bias) or None, int(P(ins[3])),
                                     int(P(FP8_UNIT_SCALES)))


def _gemm(op: Op, m: int, dt: str, s: Step, P) -> Iterator[tuple]:
    a, ins, outs = op.attrs, op.inputs, op.outputs
    act = a.get("act")
    bias = P(ins[2]) if ins[2] else DevPtr(0)
    if a.get("quant"):
        yield from _qgemm(op, m, dt, s, P)
        if act and not fuses_act(op, m):
            yield "kernel", lr.gated_launch(m, a["inter"], dt, act, s.sm_count), [
                P(outs[0]), m, a["inter"], P(outs[1])]
        return
    if uses_gemv(op, m):
        n, y = (a["inter"], outs[1]) if act else (a["n"], outs[0])
        yield "kernel", lr.gemv_launch(m, n, a["k"], dt, a["out_dtype"], act, s.sm_count), [
            P(ins[0]), P(ins[1]), bias, m, n, a["k"], P(y)]
        return
    yield "gemm", gemm_key(op), (int(P(ins[0])), int(P(ins[1])), int(P(outs[0])), m,
                                 int(bias) or None)
    if act:
        yield "kernel", lr.gated_launch(m, a["inter"], dt, act, s.sm_count), [
            P(outs[0]), m, a["inter"], P(outs[1])]


def _moe(op: Op, s: Step, t: int, dt: str, P) -> Iterator[tuple]:
    """A mixture of experts over T tokens (kernels/moe.cu): route and group on the GPU, the
    grouped gate-up (SwiGLU fused) and down GEMMs over grids that bound the step's tiles,
    then the weighted combine [+ the gated shared expert]. No size comes back to the host."""
    a = op.attrs
    e, k, h, i = a["experts"], a["top_k"], a["hidden"], a["inter"]
    logits, x, gate_up, down, gate, shared, *scales = op.inputs
    out, ids, wts, pos_of, perm, meta, act, y = op.outputs
    lr.moe_check(e, k, h, i)
    # block-wise FP8 experts (lower.py: attrs gate_up_group / down_group): + (scale, log2 B)
    groups = [a.get(f"{w}_group", 0) for w in ("gate_up", "down")]
    fp8b = [[P(sc), lr.fp8b_group_shift(b)] if b else []
            for sc, b in zip(scales or [None, None], groups)]
    # both GEMMs on wgmma or neither: their tiles are the routing's (moe_block_m), wider
    # where both are over FP8 experts and the engine has those tiles
    wg = s.moe_sm90
    wide = wg and s.moe_fp8b_wide and all(groups)
    for launch, args in lr.moe_route_launches(t, e, k, dt, a["renormalise"], P(logits), P(ids),
                                              P(wts), P(pos_of), P(perm), P(meta), sm90=wg,
                                              grid=s.moe_grid_route, fp8b=wide):
        yield "kernel", launch, args
    yield "kernel", lr.moe_gemm_launch(t, e, k, i, h, dt, act=True, fp8b_group=groups[0],
                                       sm90=wg, fp8b_layer=wide), [
        P(x), P(gate_up), P(perm), P(meta), e, i, h, P(act), *fp8b[0]]
    yield "kernel", lr.moe_gemm_launch(t, e, k, h, i, dt, act=False, fp8b_group=groups[1],
                                       sm90=wg, fp8b_layer=wide), [
        P(act), P(down), DevPtr(0), P(meta), e, h, i, P(y), *fp8b[1]]
    yield "kernel", lr.moe_combine_launch(t, h, k, dt, shared is not None), [
        P(y), P(pos_of), P(wts), P(gate) if gate else DevPtr(0),
        P(shared) if shared else DevPtr(0), t, h, k, P(out)]


def _rope_cache(op: Op, s: Step, b: int, width: int, dt: str, P) -> tuple:
    """RoPE (+ QKV bias, + the per-head q/k norm) and the K/V cache write: (Launch, args).
    rot 0 (learned positions, GPT-2): no rotation and no inv_freq table. kv_scale: the pool
    is E4M3, written as x / scale."""
    a, (qkv, bias, pos, freq, starts, tables, *norms) = op.attrs, op.inputs
    qk_norm, e4m3 = "qk_norm_eps" in a, "kv_scale" in a
    launch = lr.rope_launch(s.tokens, a["hq"], a["hkv"], a["d"], a["rot"], dt, False,
                            bias is not None, True, qk_norm, e4m3)
    return launch, [
        P(qkv), *([P(bias)] if bias is not None else []), *map(P, norms if qk_norm else ()),
        P(pos), P(freq) if freq is not None else DevPtr(0), P(starts), P(tables),
        s.tokens, a["hq"], a["hkv"], a["d"], a["rot"], b, width, a["block_size"], s.num_blocks,
        *([lr.float_bits(a["qk_norm_eps"])] if qk_norm else []),
        *(map(lr.float_bits, a["kv_scale"]) if e4m3 else ()),
        *map(P, op.outputs), P(contract.kv_cache_input(a["layer"]))]


def launches(plan: Plan, s: Step, ptr: Callable[[str], int]) -> Iterator[tuple]:
    """("kernel", Launch, args) and ("gemm", key, (x, w, y, m, bias[, w_scale, x_scale]))
    in execution order (the scales: an FP8 GEMM's).
    ptr(name) gives the device address of a value, of kv_cache_{l}, of ATTN_WORKSPACE, of
    ATTN_COUNTERS, of a schedule_name, of QGEMM_WORKSPACE, of W4G_COUNTERS, of
    FP8_UNIT_SCALES, of FIRST_TOKENS and of FP8_ROW_SCALES."""
    t, b, width, dt = s.tokens, s.batch, s.width, plan.dtype
    rows_of = {"T": t, "B": b}

    def P(name):
        return DevPtr(ptr(name))

    def rows(name):
        return rows_of[plan.values[name].shape[0]]

    for op in plan.ops:
        a, ins, outs, kind = op.attrs, op.inputs, op.outputs, op.op
        if kind == "gemm":
            yield from _gemm(op, rows(ins[0]), dt, s, P)
        elif kind == "embedding":
            vocab, scaled = plan.values[ins[0]].shape[0], "scale" in a
            yield "kernel", lr.embedding_launch(t, a["hidden"], dt, scaled), [
                P(ins[1]), P(ins[0]), t, a["hidden"], vocab,
                *([lr.float_bits(a["scale"])] if scaled else []), P(outs[0])]
        elif kind in ("rmsnorm", "add_rmsnorm", "layernorm", "add_layernorm"):
            # inputs (x, [residual], weight, [bias]): the kernels' own order
            n, norm = rows(ins[0]), kind.removeprefix("add_")
            yield "kernel", lr.norm_launch(n, a["n"], dt, norm, kind.startswith("add_")), [
                *map(P, ins), n, a["n"], lr.float_bits(a["eps"]), *map(P, outs)]
        elif kind == "gelu":
            n = numel(plan.values[ins[0]].shape, t, b)
            yield "kernel", lr.gelu_launch(n, dt, a["approximate"], s.sm_count), [
                P(ins[0]), n, P(outs[0])]
        elif kind == "moe":
            yield from _moe(op, s, rows(ins[1]), dt, P)
        elif kind == "swiglu2":
            n = rows(ins[0])
            yield "kernel", lr.swiglu2_launch(n, a["inter"], dt), [
                P(ins[0]), P(ins[1]), n, a["inter"], P(outs[0])]
        elif kind in ("swiglu", "geglu"):
            n = rows(ins[0])
            yield "kernel", lr.gated_launch(n, a["inter"], dt, kind, s.sm_count), [
                P(ins[0]), n, a["inter"], P(outs[0])]
        elif kind == "rope_cache":
            yield "kernel", *_rope_cache(op, s, b, width, dt, P)
        elif kind == "attention":
            att = _attention(op, s, t, b, width, dt)
            lse = ap.workspace_lse_offset(att, t, a["hq"], a["d"])
            dims = dict(tokens=t, batch=b, hq=a["hq"], hkv=a["hkv"], d=a["d"],
                        max_blocks=width, block_size=a["block_size"], num_blocks=s.num_blocks)
            ws = ptr(ATTN_WORKSPACE)
            ptrs = {"q": P(ins[0]), contract.SEQ_STARTS: P(ins[1]),
                    contract.CONTEXT_LENS: P(ins[2]), contract.BLOCK_TABLES: P(ins[3]),
                    "cache": P(contract.kv_cache_input(a["layer"])), "out": P(outs[0]),
                    "ws_o": DevPtr(ws), "ws_lse": DevPtr(ws + lse),
                    "arrived": DevPtr(ptr(ATTN_COUNTERS) if att.counters else 0),
                    "sched": DevPtr(ptr(schedule_name(op)) if att.items else 0)}
            for launch, args in ap.attention_launches(att, dims, a["scale"], ptrs,
                                                      a.get("kv_scale")):
                yield "kernel", launch, args
        elif kind == "gather_rows":
            yield "kernel", lr.gather_rows_launch(b, a["hidden"], dt), [
                P(ins[0]), P(ins[1]), b, a["hidden"], rows(ins[0]), P(outs[0])]
        elif kind == "add":
            n = rows(ins[0]) * a["n"]
            yield "kernel", lr.add_launch(n, dt, s.sm_count), [P(ins[0]), P(ins[1]), n,
                                                               P(outs[0])]
        elif kind == "softcap":
            n = numel(plan.values[ins[0]].shape, t, b)
            yield "kernel", lr.softcap_launch(n, s.sm_count), [
                P(ins[0]), n, lr.float_bits(a["cap"]), P(outs[0])]
        elif kind == "cast_f32":
            n = numel(plan.values[ins[0]].shape, t, b)
            yield "kernel", lr.cast_launch(n, dt, s.sm_count), [P(ins[0]), n, P(outs[0])]
        else:
            raise ValueError(f"no launcher for op {kind!r}")
