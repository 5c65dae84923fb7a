"""Scatter into the paged KV pool + gather + masked softmax attention -> llmc PagedAttention.

The node takes the raw engine I/O tensors (block tables, sequence starts, context lengths,
positions) rather than the per-step index tensors model_zoo derives from them, so a kernel
can implement it directly (docs/passes.md has the contract). Its ONNX function body
recomputes those indices from the same inputs, the way model_zoo/llama.py does, so the
reference backend and TensorRT's function inlining run exactly the unfused math.

Matched chain (model_zoo/llama.py ``attention``), per layer:

    cache' = ScatterND(cache, write_index, Concat(Unsqueeze(k), Unsqueeze(v)))
    keys, values = Gather(Reshape(Transpose(Gather(cache', token_blocks, axis=1))), 0 | 1)
    probs = Cast(Softmax(Cast(Reshape(q) @ keys^T, f32) * scale + mask))
    out = probs @ values                                        # then Reshape to [T, Hq*D]

Gemma 2 soft-caps the logits between the scale and the mask, ``cap * Tanh(scores / cap)``
with a constant cap (``scores * (1/cap)`` accepted for the divide); the node's ``softcap``
attribute carries it, 0 when there is none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import AttributeProto, NodeProto, TensorProto, helper, numpy_helper

from llmc import contract
from llmc.passes.ir import LLMC_DOMAIN, Graph, attr, close, make_function, ref
from llmc.passes.pattern import Pass

CONTRACT = contract.ATTENTION_INPUTS


@dataclass
class AttentionMatch:
    q: str
    k: str
    v: str
    cache_in: str
    cache_out: str
    out: str
    attrs: dict
    nodes: list[NodeProto]


def _user(g: Graph, value: str, op_type: str) -> NodeProto | None:
    users = g.consumers(value)
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def match_paged_attention(g: Graph, scatter: NodeProto) -> AttentionMatch | None:
    """Anchor: the ScatterND writing a graph-input KV pool."""
    cache_in, cache = scatter.input[0], scatter.output[0]
    pool = g.input_shape(cache_in)
    if pool is None or len(pool) != 5 or not all(n in g.inputs for n in CONTRACT):
        return None
    concat = g.producer(scatter.input[2], "Concat")
    if concat is None or len(concat.input) != 2 or attr(concat, "axis") != 0:
        return None
    unsq = [g.producer(v, "Unsqueeze") for v in concat.input]
    if None in unsq or any(g.ints(u.input[1]) != [0] for u in unsq):
        return None
    gathers = [c for c in g.consumers(cache) if c.op_type == "Gather" and attr(c, "axis") == 1]
    if len(gathers) != 1:
        return None
    tr = _user(g, gathers[0].output[0], "Transpose")
    rs = _user(g, tr.output[0], "Reshape") if tr is not None else None
    if rs is None or list(attr(tr, "perm")) != [0, 1, 3, 2, 4, 5]:
        return None
    sides = {g.scalar(c.input[1]): c for c in g.consumers(rs.output[0])
             if c.op_type == "Gather" and attr(c, "axis", 0) == 0}
    if set(sides) != {0.0, 1.0} or len(g.consumers(rs.output[0])) != 2:
        return None
    keys, values = sides[0.0], sides[1.0]
    tk = _user(g, keys.output[0], "Transpose")
    qk = _user(g, tk.output[0], "MatMul") if tk is not None else None
    if qk is None or qk.input[1] != tk.output[0]:
        return None
    qg = g.producer(qk.input[0], "Reshape")
    dims = g.ints(qg.input[1]) if qg is not None else None
    cast1 = _user(g, qk.output[0], "Cast")
    mul = _user(g, cast1.output[0], "Mul") if cast1 is not None else None
    scale = g.scalar(next(v for v in mul.input if v != cast1.output[0])) if mul else None
    scores = mul.output[0] if mul is not None else None
    cap_nodes, softcap = _softcap(g, scores) if scores else ([], 0.0)     # Gemma 2
    scores = cap_nodes[-1].output[0] if cap_nodes else scores
    add = _user(g, scores, "Add") if scores else None
    soft = _user(g, add.output[0], "Softmax") if add is not None else None
    cast2 = _user(g, soft.output[0], "Cast") if soft is not None else None
    pv = _user(g, cast2.output[0], "MatMul") if cast2 is not None else None
    if (pv is None or pv.input[1] != values.output[0] or not dims or len(dims) != 4
            or scale is None or attr(soft, "axis") != -1):
        return None
    mask = next(v for v in add.input if v != scores)
    if not all(c.op_type == "Reshape" for c in g.consumers(pv.output[0])):
        return None   # the output changes from [T, Hkv, G, D] to [T, Hq, D]
    _, hkv, group, d = dims
    nodes = [concat, *unsq, scatter, gathers[0], tr, rs, keys, values, tk, qk, qg, cast1, mul,
             *cap_nodes, add, soft, cast2, pv]
    if not g.private(nodes, keep=[cache, pv.output[0]]):
        return None
    attrs = dict(num_heads=hkv * group, num_kv_heads=hkv, head_dim=d, block_size=pool[3],
                 scale=scale, sliding_window=_sliding_window(g, mask), softcap=softcap)
    if pool[2] != hkv or pool[4] != d or not isinstance(pool[3], int):
        return None
    return AttentionMatch(qg.input[0], unsq[0].input[0], unsq[1].input[0], cache_in, cache,
                          pv.output[0], attrs, nodes)


def _softcap(g: Graph, scores: str) -> tuple[list[NodeProto], float]:
    """Mul(Tanh(scores / cap), cap), one constant cap > 0 -> (its three nodes, cap).

    ([], 0.0) for anything else, capped or not: the caller then needs the mask Add right
    after the scale, so a Tanh without its divide and multiply, or a cap that is not a
    constant, declines there.
    """
    div = _user(g, scores, "Div") or _user(g, scores, "Mul")
    tanh = _user(g, div.output[0], "Tanh") if div is not None else None
    mul = _user(g, tanh.output[0], "Mul") if tanh is not None else None
    if mul is None or (div.op_type == "Div" and div.input[0] != scores):   # not cap / x
        return [], 0.0
    inner = g.scalar(next((v for v in div.input if v != scores), scores))
    cap = g.scalar(next((v for v in mul.input if v != tanh.output[0]), tanh.output[0]))
    if inner is None or cap is None or cap <= 0 or inner <= 0:
        return [], 0.0
    if not close(inner, cap if div.op_type == "Div" else 1 / cap):
        return [], 0.0
    return [div, tanh, mul], cap


def _sliding_window(g: Graph, mask: str, limit: int = 64) -> int:
    """model_zoo masks keys j <= p - W with Greater(j, Sub(p, W)); 0 when there is none."""
    todo, seen = [mask], set()
    while todo and len(seen) < limit:
        node = g.producer(todo.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Greater":
            sub = g.producer(node.input[1], "Sub")
            w = g.scalar(sub.input[1]) if sub is not None else None
            if w is not None:
                return int(w)
        todo.extend(node.input)
    return 0


def replace_paged_attention(g: Graph, m: AttentionMatch) -> None:
    g.remove(m.nodes)
    g.use_function(paged_attention_function)
    out = g.fresh("PagedAttention_out")
    g.add("PagedAttention", [m.q, m.k, m.v, m.cache_in, *CONTRACT], [out, m.cache_out],
          name="PagedAttention", domain=LLMC_DOMAIN, **m.attrs)
    g.rename_uses(m.out, out)


PAGED_ATTENTION = Pass("paged_attention", "ScatterND", match_paged_attention,
                       replace_paged_attention)


# --- the function body: the unfused math, from the node's own inputs -------------------------

class _Body:
    """Nodes of a function body; constants are Constant nodes (functions have no
    initializers)."""

    def __init__(self):
        self.nodes: list[NodeProto] = []

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **attrs: self.op(op_type, *inputs, **attrs)

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.int64) -> str:
        t = numpy_helper.from_array(np.asarray(value, dtype=dtype))
        return self.op("Constant", value=t)

    def attr(self, name: str, kind: str) -> str:
        """A scalar Constant holding the function attribute ``name`` (kind int or float)."""
        node_attr = "value_int" if kind == "int" else "value_float"
        out = self.op("Constant")
        ref(self.nodes[-1], name, getattr(AttributeProto, kind.upper()), node_attr)
        return out


def paged_attention_function():
    b = _Body()
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    bs, scale, window = b.attr("block_size", "int"), b.attr("scale", "float"), \
        b.attr("sliding_window", "int")
    # The same index math as the model's step values (llmc/contract.py), from the node's own
    # inputs: each token's sequence and block table, and where its K/V row goes.
    seq, n_tok = contract.token_sequences(b, contract.POSITION_IDS, contract.SEQ_STARTS)
    blocks = contract.token_block_tables(b, contract.BLOCK_TABLES, seq)      # [T, MB]
    pos = b.Cast(contract.POSITION_IDS, to=i64)
    k_shape = b.Shape("k")                                                   # [T, Hkv, D]
    hkv, d = b.Slice(k_shape, b.const([1]), b.const([2])), b.Slice(k_shape, b.const([2]),
                                                                  b.const([3]))
    index = contract.kv_write_index(b, blocks, pos, n_tok, hkv, bs)         # [2, T, Hkv, 4]
    new_kv = b.Concat(b.Unsqueeze("k", b.const([0])), b.Unsqueeze("v", b.const([0])), axis=0)
    cache = b.ScatterND("cache", index, new_kv, out="cache_out")
    # Every token reads its sequence's blocks back: [2, T, Hkv, C, D].
    ctx = b.Transpose(b.Gather(cache, blocks, axis=1), perm=[0, 1, 3, 2, 4, 5])
    ctx = b.Reshape(ctx, b.Concat(b.const([2]), n_tok, hkv, b.const([-1]), d, axis=0))
    keys, values = b.Gather(ctx, b.const(0), axis=0), b.Gather(ctx, b.const(1), axis=0)
    qg = b.Reshape("q", b.Concat(n_tok, hkv, b.const([-1]), d, axis=0))     # [T, Hkv, G, D]
    scores = b.Mul(b.Cast(b.MatMul(qg, b.Transpose(keys, perm=[0, 1, 3, 2])), to=f32), scale)
    # A window W > 0 hides keys j <= p - W; without one the lowest hidden key is -1.
    lowest = b.Where(b.Greater(window, b.const(0)),
                     b.Sub(b.Unsqueeze(pos, b.const([1])), window), b.const(-1))
    mask = contract.key_mask(b, contract.BLOCK_TABLES, contract.CONTEXT_LENS, seq, pos, bs,
                             lowest)
    # Logit soft-cap (Gemma 2), before the mask: cap * tanh(scores / cap); 0 = none.
    cap = b.attr("softcap", "float")
    scores = b.Where(b.Greater(cap, b.const(0.0, np.float32)),
                     b.Mul(b.Tanh(b.Div(scores, cap)), cap), scores)
    probs = b.CastLike(b.Softmax(b.Add(scores, mask), axis=-1), "q")
    b.Reshape(b.MatMul(probs, values), b.Shape("q"), out="out")             # [T, Hq, D]
    return make_function(
        "PagedAttention",
        ["q", "k", "v", "cache", *contract.ATTENTION_INPUTS],
        ["out", "cache_out"], b.nodes,
        attributes=["num_heads", "num_kv_heads", "head_dim", "block_size", "scale",
                    "sliding_window", "softcap"],
        doc="Write k/v into their paged blocks, then causal GQA attention per token over its "
            "own sequence's cache (docs/passes.md).")
