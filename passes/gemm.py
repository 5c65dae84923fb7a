"""Sibling GEMM fusion: q/k/v projections -> one GEMM + Split; likewise gate/up.

Siblings are MatMuls that read the same activation with [in, out] weights of one dtype (and
each with a bias Add, or none of them). The fused weight is a new lazy ``Weight`` whose
loader concatenates the parts' loaders along the output axis, so memory still streams one
(fused) tensor at a time when the graph is saved; the part weights drop out of the list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from llmc.graph import Weight
from llmc.passes.ir import Graph
from llmc.passes.pattern import Pass


@dataclass
class SiblingMatch:
    x: str
    matmuls: list[NodeProto]
    biases: list[NodeProto]          # the bias Adds, one per MatMul, or empty
    outs: list[str]


def _weight_2d(g: Graph, node: NodeProto) -> Weight | None:
    w = g.weights.get(node.input[1])
    return w if w is not None and len(w.shape) == 2 else None


def _bias_of(g: Graph, mm: NodeProto) -> NodeProto | None:
    users = g.consumers(mm.output[0])
    if len(users) != 1 or users[0].op_type != "Add" or mm.output[0] in g.outputs:
        return None
    add = users[0]
    bias = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
    w = g.weights.get(bias)
    return add if w is not None and w.shape == (_weight_2d(g, mm).shape[1],) else None


def match_siblings(g: Graph, first: NodeProto, n: int) -> SiblingMatch | None:
    """Anchor: the first of ``n`` MatMuls reading one activation."""
    w0 = _weight_2d(g, first)
    if w0 is None:
        return None
    group = [c for c in g.consumers(first.input[0]) if c.op_type == "MatMul"
             and c.input[0] == first.input[0] and (w := _weight_2d(g, c)) is not None
             and w.dtype == w0.dtype and w.shape[0] == w0.shape[0]]
    group = list({id(c): c for c in group}.values())
    if len(group) != n or group[0] is not first:
        return None
    biases = [_bias_of(g, mm) for mm in group]
    if any(b is None for b in biases):
        if not all(b is None for b in biases):
            return None  # some with bias, some without: leave them alone
        biases = []
    outs = [b.output[0] for b in biases] or [mm.output[0] for mm in group]
    return SiblingMatch(first.input[0], group, biases, outs)


def fused_name(names: list[str]) -> str:
    """model.l.0.q_proj.weight, ..k_proj.weight, ..v_proj.weight -> model.l.0.q_proj+k_proj+
    v_proj.weight: still readable, and unique because the parts were."""
    head = os.path.commonprefix(names)
    head = head[: head.rfind(".") + 1]
    tail = os.path.commonprefix([n[len(head):][::-1] for n in names])[::-1]
    tail = tail[tail.find("."):] if "." in tail else ""
    return head + "+".join(n[len(head): len(n) - len(tail)] for n in names) + tail


def fused_parts(name: str) -> list[str]:
    """The inverse of fused_name: model.l.0.q_proj+k_proj+v_proj.weight -> the three names
    (a name that is not fused is its only part)."""
    if "+" not in name:
        return [name]
    head = name[: name.rfind(".", 0, name.find("+")) + 1]
    middle_and_tail = name[len(head):]
    last = middle_and_tail.rsplit("+", 1)[1]
    tail = last[last.find("."):] if "." in last else ""
    middle = middle_and_tail[: len(middle_and_tail) - len(tail)]
    return [head + part + tail for part in middle.split("+")]


def concat_weight(g: Graph, names: list[str]) -> str:
    parts = [g.weights[n] for n in names]
    loads = [w.read for w in parts]   # each part checked against its shape first

    def load() -> np.ndarray:          # one fused tensor at a time, parts freed right after
        return np.concatenate([f() for f in loads], axis=-1)

    shape = (*parts[0].shape[:-1], sum(w.shape[-1] for w in parts))
    return g.add_weight(Weight(fused_name(names), parts[0].dtype, shape, load), before=names[0])


def replace_siblings(g: Graph, m: SiblingMatch) -> None:
    weights = [mm.input[1] for mm in m.matmuls]
    sizes = [g.weights[w].shape[1] for w in weights]
    g.remove(m.matmuls + m.biases)
    y = g.add("MatMul", [m.x, concat_weight(g, weights)], 1, name="FusedGemm").output[0]
    if m.biases:
        bias = [b.input[1] if b.input[0] == mm.output[0] else b.input[0]
                for b, mm in zip(m.biases, m.matmuls)]
        y = g.add("Add", [y, concat_weight(g, bias)], 1, name="FusedBias").output[0]
    g.add("Split", [y, g.add_const(np.array(sizes))], m.outs, name="FusedSplit", axis=-1)


QKV_GEMM = Pass("qkv_gemm", "MatMul", lambda g, n: match_siblings(g, n, 3), replace_siblings)
GATE_UP_GEMM = Pass("gate_up_gemm", "MatMul", lambda g, n: match_siblings(g, n, 2),
                    replace_siblings)
