"""Activation chains: GELU (erf and tanh forms) -> ONNX Gelu; SwiGLU and GeGLU -> llmc nodes.

Products are matched as a flat list of factors (``_factors``), so ``x * 0.5 * (1 + erf)`` and
``(0.5 * x) * (1 + erf)`` are one pattern, not two. A Mul is only looked through when its
result has one consumer: an intermediate used elsewhere must survive, so the chain declines.

    gelu_erf(x)  = 0.5 * x * (1 + Erf(x / sqrt(2)))
    gelu_tanh(x) = 0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
    swiglu(g, u) = g * Sigmoid(g) * u                       (model_zoo's MLP)
    geglu(g, u)  = Gelu(g) * u
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from onnx import AttributeProto, NodeProto, helper

from llmc.passes.ir import (
    LLMC_DOMAIN,
    Graph,
    attr,
    close,
    const_and_other,
    make_function,
    ref,
)
from llmc.passes.pattern import Pass

# The chains' constants are written in the graph's dtype: in bf16 (8 bits of mantissa)
# 0.044715 and sqrt(2/pi) are 2-3e-3 off, so they match within a bf16 rounding.
CONST_RTOL = 2.0 ** -8


def _factors(g: Graph, value: str, nodes: list[NodeProto], top: bool = True) -> list[str]:
    """The factors of a product rooted at ``value``; the Muls walked are added to ``nodes``."""
    node = g.producer(value, "Mul")
    if node is None or (not top and len(g.consumers(value)) != 1):
        return [value]
    nodes.append(node)
    return [f for v in node.input for f in _factors(g, v, nodes, top=False)]


def _split_consts(g: Graph, factors: list[str]) -> tuple[float, list[str]]:
    """(product of the scalar-constant factors, the other factors)."""
    scale, rest = 1.0, []
    for f in factors:
        c = g.scalar(f)
        if c is None:
            rest.append(f)
        else:
            scale *= c
    return scale, rest


def _one_plus(g: Graph, value: str, op_type: str) -> NodeProto | None:
    """``1 + op(..)`` -> the op node."""
    add = g.producer(value, "Add")
    one, other = const_and_other(g, add) if add is not None else (None, None)
    return g.producer(other, op_type) if one == 1.0 else None


@dataclass
class GeluMatch:
    x: str
    approximate: str
    nodes: list[NodeProto]
    out: str


def match_gelu(g: Graph, top: NodeProto) -> GeluMatch | None:
    nodes: list[NodeProto] = []
    half, rest = _split_consts(g, _factors(g, top.output[0], nodes))
    if not close(half, 0.5, CONST_RTOL) or len(rest) != 2:
        return None
    for k in (0, 1):
        x, gate = rest[k], rest[1 - k]
        for op, inner in (("Erf", _erf_arg), ("Tanh", _tanh_arg)):
            fn = _one_plus(g, gate, op)
            inner_nodes = inner(g, fn, x) if fn is not None else None
            if inner_nodes is None:
                continue
            chain = nodes + [g.producer(gate), fn] + inner_nodes
            if g.private(chain, keep=[top.output[0]]):
                return GeluMatch(x, "none" if op == "Erf" else "tanh", chain, top.output[0])
    return None


def _erf_arg(g: Graph, erf: NodeProto, x: str) -> list[NodeProto] | None:
    """Erf(x / sqrt(2)) or Erf(x * (1/sqrt(2)))."""
    node = g.producer(erf.input[0])
    if node is None:
        return None
    if node.op_type == "Div" and node.input[0] == x and close(g.scalar(node.input[1]),
                                                               math.sqrt(2), CONST_RTOL):
        return [node]
    c, other = const_and_other(g, node) if node.op_type == "Mul" else (None, None)
    return [node] if other == x and close(c, 1 / math.sqrt(2), CONST_RTOL) else None


def _tanh_arg(g: Graph, tanh: NodeProto, x: str) -> list[NodeProto] | None:
    """Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)), x^3 as Pow(x, 3) or x * x * x."""
    nodes: list[NodeProto] = []
    c, rest = _split_consts(g, _factors(g, tanh.input[0], nodes, top=False))
    add = g.producer(rest[0], "Add") if len(rest) == 1 else None
    if add is None or not close(c, math.sqrt(2 / math.pi), CONST_RTOL) or x not in add.input:
        return None
    cube_nodes: list[NodeProto] = []
    other = add.input[1] if add.input[0] == x else add.input[0]
    k, cube = _split_consts(g, _factors(g, other, cube_nodes, top=False))
    pow3 = g.producer(cube[0], "Pow") if len(cube) == 1 else None
    if pow3 is not None and pow3.input[0] == x and g.scalar(pow3.input[1]) == 3.0:
        cube_nodes.append(pow3)
    elif cube != [x, x, x]:
        return None
    return nodes + [add] + cube_nodes if close(k, 0.044715, CONST_RTOL) else None


def replace_gelu(g: Graph, m: GeluMatch) -> None:
    g.remove(m.nodes)
    g.add("Gelu", [m.x], [m.out], name="Gelu", approximate=m.approximate)


GELU = Pass("gelu", "Mul", match_gelu, replace_gelu)


# --- gated activations ----------------------------------------------------------------------

@dataclass
class GatedMatch:
    gate: str
    up: str
    nodes: list[NodeProto]
    out: str
    approximate: str = ""


def match_swiglu(g: Graph, top: NodeProto) -> GatedMatch | None:
    nodes: list[NodeProto] = []
    factors = _factors(g, top.output[0], nodes)
    if len(factors) != 3:
        return None
    for f in factors:
        sig = g.producer(f, "Sigmoid")
        if sig is None:
            continue
        rest = list(factors)
        rest.remove(f)
        if sig.input[0] in rest:
            rest.remove(sig.input[0])
            m = GatedMatch(sig.input[0], rest[0], nodes + [sig], top.output[0])
            return m if g.private(m.nodes, keep=[m.out]) else None
    return None


def replace_swiglu(g: Graph, m: GatedMatch) -> None:
    g.remove(m.nodes)
    g.use_function(swiglu_function)
    g.add("SwiGLU", [m.gate, m.up], [m.out], name="SwiGLU", domain=LLMC_DOMAIN)


def swiglu_function():
    return make_function("SwiGLU", ["gate", "up"], ["out"], [
        helper.make_node("Sigmoid", ["gate"], ["sig"]),
        helper.make_node("Mul", ["gate", "sig"], ["silu"]),
        helper.make_node("Mul", ["silu", "up"], ["out"]),
    ], doc="out = gate * Sigmoid(gate) * up")


SWIGLU = Pass("swiglu", "Mul", match_swiglu, replace_swiglu)


def match_geglu(g: Graph, top: NodeProto) -> GatedMatch | None:
    for k in (0, 1):
        gelu = g.producer(top.input[k], "Gelu")
        if (gelu is not None and top.input[0] != top.input[1]
                and g.private([top, gelu], keep=[top.output[0]])):
            return GatedMatch(gelu.input[0], top.input[1 - k], [top, gelu], top.output[0],
                              attr(gelu, "approximate", b"none").decode())
    return None


def replace_geglu(g: Graph, m: GatedMatch) -> None:
    g.remove(m.nodes)
    g.use_function(geglu_function)
    g.add("GeGLU", [m.gate, m.up], [m.out], name="GeGLU", domain=LLMC_DOMAIN,
          approximate=m.approximate)


def geglu_function():
    return make_function("GeGLU", ["gate", "up"], ["out"], [
        ref(helper.make_node("Gelu", ["gate"], ["gelu"]), "approximate",
            AttributeProto.STRING),
        helper.make_node("Mul", ["gelu", "up"], ["out"]),
    ], attributes=["approximate"], doc="out = Gelu(gate, approximate) * up")


GEGLU = Pass("geglu", "Mul", match_geglu, replace_geglu)


# --- the gated activation on the fused gate-up GEMM output --------------------------------
# After gate_up_gemm, SwiGLU/GeGLU read the two halves of one Split. Reading the GEMM output
# [T, 2I] directly (gate = first half, up = second) is the form the kernels and their
# TensorRT plugins take (docs/kernels.md): no Split, one read of the GEMM output.

@dataclass
class SplitGatedMatch:
    split: NodeProto
    gated: NodeProto


def match_gated_split(g: Graph, split: NodeProto) -> SplitGatedMatch | None:
    """Anchor: a Split into two equal halves of the last axis whose outputs are exactly the
    (gate, up) inputs of one SwiGLU or GeGLU."""
    if len(split.output) != 2 or attr(split, "axis") != -1 or len(split.input) != 2:
        return None
    sizes = g.ints(split.input[1])
    users = [g.consumers(v) for v in split.output]
    if sizes is None or sizes[0] != sizes[1] or any(len(u) != 1 for u in users):
        return None
    gated = users[0][0]
    if (gated is not users[1][0] or gated.domain != LLMC_DOMAIN
            or gated.op_type not in ("SwiGLU", "GeGLU")
            or list(gated.input) != list(split.output)):
        return None
    return SplitGatedMatch(split, gated)


def replace_gated_split(g: Graph, m: SplitGatedMatch) -> None:
    g.remove([m.split, m.gated])
    if m.gated.op_type == "SwiGLU":
        g.use_function(fused_swiglu_function)
        g.add("FusedSwiGLU", [m.split.input[0]], [m.gated.output[0]], name="FusedSwiGLU",
              domain=LLMC_DOMAIN)
    else:
        g.use_function(fused_geglu_function)
        g.add("FusedGeGLU", [m.split.input[0]], [m.gated.output[0]], name="FusedGeGLU",
              domain=LLMC_DOMAIN, approximate=attr(m.gated, "approximate", b"none").decode())


def _halves() -> NodeProto:
    return helper.make_node("Split", ["gate_up"], ["gate", "up"], axis=-1, num_outputs=2)


def fused_swiglu_function():
    return make_function("FusedSwiGLU", ["gate_up"], ["out"], [
        _halves(),
        helper.make_node("Sigmoid", ["gate"], ["sig"]),
        helper.make_node("Mul", ["gate", "sig"], ["silu"]),
        helper.make_node("Mul", ["silu", "up"], ["out"]),
    ], doc="gate, up = halves of gate_up's last axis; out = gate * Sigmoid(gate) * up")


def fused_geglu_function():
    return make_function("FusedGeGLU", ["gate_up"], ["out"], [
        _halves(),
        ref(helper.make_node("Gelu", ["gate"], ["gelu"]), "approximate",
            AttributeProto.STRING),
        helper.make_node("Mul", ["gelu", "up"], ["out"]),
    ], attributes=["approximate"],
        doc="gate, up = halves of gate_up's last axis; out = Gelu(gate, approximate) * up")


GATED_SPLIT = Pass("gated_split", "Split", match_gated_split, replace_gated_split)
