"""Rotate-half RoPE -> the ONNX opset-23 RotaryEmbedding op (TensorRT: one ROTARY_EMBEDDING).

The chain model_zoo emits for q and k, x [T, H, D], cos/sin [T, 1, D]:

    x1 = x[..., :D/2];  x2 = x[..., D/2:D]
    out = x * cos + Concat(-x2, x1) * sin

x comes from the Reshape to [T, H, D], or (Qwen3, Gemma 3) from a per-head q/k RMSNorm
after it, so D is read from the Slice bounds, not from x's producer: the halves [0, h) and
[h, 2h), concatenated, must broadcast against x * cos, which a last axis of 2h allows (a
shorter one would clamp the slices; the fused op then refuses cos of width h != D/2 at run
time rather than compute something else). An open end (``x[..., h:]``, as torch exports it)
says nothing about D, so it is taken only where x's producer is a Reshape that names D.

RotaryEmbedding takes cos/sin of half width, so the pass checks that cos and sin are
Cos/Sin of ``Concat(f, f)`` (each half the same angles; llama3 scaling is already folded
into f) and slices their first halves once per step. The 4-D form of the op reads
[batch, heads, seq, D] with cos [batch, seq, D/2]; we feed x as [T, H, 1, D] and cos as
[T, 1, D/2] (each token is its own "batch" of one position), so no position gather is
needed and ragged batches need nothing special.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from llmc.passes.ir import Graph, attr
from llmc.passes.pattern import Pass

OPEN_ENDS = (2**31 - 1, 2**63 - 1)  # Slice ends meaning "to the end of the axis"


@dataclass
class RopeMatch:
    x: str
    cos: str
    sin: str
    half: int
    nodes: list[NodeProto]
    out: str


def _slice(g: Graph, value: str) -> tuple[str, int, int] | None:
    """Slice(x, [start], [end], [-1]) -> (x, start, end)."""
    node = g.producer(value, "Slice")
    if node is None or len(node.input) < 4 or g.ints(node.input[3]) not in ([-1],):
        return None
    if len(node.input) > 4 and g.ints(node.input[4]) != [1]:
        return None
    start, end = g.ints(node.input[1]), g.ints(node.input[2])
    return (node.input[0], start[0], end[0]) if start and end else None


def match_rope(g: Graph, add: NodeProto) -> RopeMatch | None:
    muls = [g.producer(v, "Mul") for v in add.input]
    if None in muls:
        return None
    for a, b in ((muls[0], muls[1]), (muls[1], muls[0])):
        for k in (0, 1):
            for j in (0, 1):
                m = _match(g, add, a, k, b, j)
                if m is not None:
                    return m
    return None


def _match(g, add, mul_cos, k, mul_sin, j) -> RopeMatch | None:
    x, cos = mul_cos.input[k], mul_cos.input[1 - k]
    rotated, sin = mul_sin.input[j], mul_sin.input[1 - j]
    concat = g.producer(rotated, "Concat")
    if concat is None or len(concat.input) != 2 or attr(concat, "axis") not in (-1, 2):
        return None
    neg = g.producer(concat.input[0], "Neg")
    s1, s2 = _slice(g, concat.input[1]), _slice(g, neg.input[0]) if neg else None
    if s1 is None or s2 is None or s1[:2] != (x, 0) or s1[2] <= 0:
        return None
    half = s1[2]
    known = _reshaped_last_dim(g, x)
    if (s2[:2] != (x, half) or known not in (None, 2 * half)
            or not (s2[2] == 2 * half or (s2[2] in OPEN_ENDS and known is not None))
            or _angles(g, cos, "Cos") is None
            or _angles(g, cos, "Cos") != _angles(g, sin, "Sin")):
        return None
    nodes = [add, mul_cos, mul_sin, concat, neg, g.producer(concat.input[1]),
             g.producer(neg.input[0])]
    if not g.private(nodes, keep=[add.output[0]]):
        return None
    return RopeMatch(x, cos, sin, half, nodes, add.output[0])


def _reshaped_last_dim(g: Graph, x: str) -> int | None:
    """D when x is Reshape(.., [0, H, D]) (the form without a per-head norm), else None."""
    shape = g.producer(x, "Reshape")
    dims = g.ints(shape.input[1]) if shape is not None else None
    return dims[-1] if dims and len(dims) == 3 and dims[-1] > 0 else None


def _angles(g: Graph, value: str, op_type: str) -> str | None:
    """cos/sin = [Cast](op([Unsqueeze](Concat(f, f)))) -> the name of that Concat's output."""
    cast = g.producer(value, "Cast")
    node = g.producer(cast.input[0] if cast else value, op_type)
    if node is None:
        return None
    emb = node.input[0]
    unsq = g.producer(emb, "Unsqueeze")
    concat = g.producer(unsq.input[0] if unsq else emb, "Concat")
    if concat is None or len(concat.input) != 2 or concat.input[0] != concat.input[1]:
        return None
    return concat.output[0]


def _half(g: Graph, value: str, half: int) -> str:
    """value[..., :half], made once per cos/sin tensor and shared by every layer."""
    key = ("rope_half", value, half)
    if key not in g.memo:
        node = g.add("Slice", [value, g.add_const(np.array([0])), g.add_const(np.array([half])),
                               g.add_const(np.array([-1]))], 1, name=f"{value}_half")
        g.memo[key] = node.output[0]
    return g.memo[key]


def replace_rope(g: Graph, m: RopeMatch) -> None:
    g.remove(m.nodes)
    axis = g.memo.setdefault("rope_axis", g.add_const(np.array([2])))
    x4 = g.add("Unsqueeze", [m.x, axis], 1, name="RoPE_in").output[0]      # [T, H, 1, D]
    rot = g.add("RotaryEmbedding", [x4, _half(g, m.cos, m.half), _half(g, m.sin, m.half)], 1,
                name="RoPE", interleaved=0).output[0]
    g.add("Squeeze", [rot, axis], [m.out], name="RoPE_out")               # [T, H, D]


ROPE = Pass("rope", "Add", match_rope, replace_rope)
