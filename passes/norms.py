"""RMSNorm -> ONNX RMSNormalization; residual Add + RMSNormalization -> llmc AddRMSNorm;
LayerNorm -> ONNX LayerNormalization; residual Add + LayerNormalization -> llmc AddLayerNorm.

The chain model_zoo emits (HF semantics: normalise in float32, cast back, scale):

    x32 = Cast(x, f32); var = ReduceMean(x32 * x32, [-1]); inv = 1 / Sqrt(var + eps)
    y = Cast(x32 * inv, dtype) * weight

Also accepted: no Casts (an fp32 graph from elsewhere), Pow(x, 2) for the square and
Div(x32, Sqrt(..)) for the scaling. RMSNormalization(stash_type=float) computes the same
thing in float32; only the rounding point of the final scale moves (fp16: one ulp).

LayerNorm (GPT-2) is the same chain on the centred input, then a bias:

    x32 = Cast(x, f32); c = x32 - ReduceMean(x32, [-1]); var = ReduceMean(c * c, [-1])
    y = Cast(c / Sqrt(var + eps), dtype) * weight + bias
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import AttributeProto, NodeProto, TensorProto, helper

from llmc.passes.ir import (
    LLMC_DOMAIN,
    Graph,
    attr,
    const_and_other,
    make_function,
    ref,
)
from llmc.passes.pattern import Pass


@dataclass
class RmsMatch:
    x: str
    weight: str
    eps: float
    nodes: list[NodeProto]
    out: str


def _strip_cast(g: Graph, value: str, to: int | None = None) -> tuple[str, NodeProto | None]:
    node = g.producer(value, "Cast")
    if node is not None and (to is None or attr(node, "to") == to):
        return node.input[0], node
    return value, None


def match_rms_norm(g: Graph, mul_w: NodeProto) -> RmsMatch | None:
    """Anchor: the Mul by the norm weight."""
    for k in (0, 1):
        weight, y = mul_w.input[k], mul_w.input[1 - k]
        if g.is_weight(weight) and len(g.weights[weight].shape) == 1:
            break
    else:
        return None
    elem = g.elem_type(weight)
    y32, cast_out = _strip_cast(g, y)
    if cast_out is not None and attr(cast_out, "to") != elem:
        return None
    scaled = g.producer(y32)
    if scaled is None or scaled.op_type not in ("Mul", "Div"):
        return None
    found = _scale_of(g, scaled)
    if found is None:
        return None
    x32, inv_nodes, sqrt = found
    add = g.producer(sqrt.input[0], "Add")
    eps, var = const_and_other(g, add) if add is not None else (None, None)
    mean = _mean_last(g, var) if var is not None else None
    if eps is None or mean is None:
        return None
    square = g.producer(mean.input[0])
    if not _is_square_of(g, square, x32) or _centred(g, x32) is not None:
        return None     # the mean square of a centred input is a LayerNorm's variance
    x, cast_in = _strip_cast(g, x32, TensorProto.FLOAT)
    nodes = [n for n in (cast_in, square, mean, add, *inv_nodes, scaled, cast_out, mul_w) if n]
    if not g.private(nodes, keep=[mul_w.output[0]]):
        return None
    return RmsMatch(x, weight, eps, nodes, mul_w.output[0])


def _mean_last(g: Graph, value: str) -> NodeProto | None:
    """The ReduceMean over the last axis (kept) that makes `value`, if it does."""
    mean = g.producer(value, "ReduceMean")
    if mean is None or attr(mean, "keepdims", 1) != 1:
        return None
    axes = g.ints(mean.input[1]) if len(mean.input) > 1 else attr(mean, "axes")
    return mean if list(axes or []) == [-1] else None


def _centred(g: Graph, value: str) -> tuple[NodeProto, NodeProto] | None:
    """value = x - ReduceMean(x, [-1]) -> (the Sub, the ReduceMean)."""
    sub = g.producer(value, "Sub")
    mean = _mean_last(g, sub.input[1]) if sub is not None else None
    if mean is None or mean.input[0] != sub.input[0]:
        return None
    return sub, mean


def _scale_of(g: Graph, scaled: NodeProto):
    """x32 * Reciprocal(Sqrt(s)) or x32 / Sqrt(s) -> (x32, [Reciprocal?, Sqrt], Sqrt)."""
    if scaled.op_type == "Div":
        sqrt = g.producer(scaled.input[1], "Sqrt")
        return (scaled.input[0], [sqrt], sqrt) if sqrt is not None else None
    for k in (0, 1):
        recip = g.producer(scaled.input[k], "Reciprocal")
        sqrt = g.producer(recip.input[0], "Sqrt") if recip is not None else None
        if sqrt is not None:
            return scaled.input[1 - k], [recip, sqrt], sqrt
    return None


def _is_square_of(g: Graph, node: NodeProto | None, x: str) -> bool:
    if node is None:
        return False
    if node.op_type == "Mul":
        return list(node.input) == [x, x]
    return node.op_type == "Pow" and node.input[0] == x and g.scalar(node.input[1]) == 2.0


def replace_rms_norm(g: Graph, m: RmsMatch) -> None:
    g.remove(m.nodes)
    g.add("RMSNormalization", [m.x, m.weight], [m.out], name="RMSNorm", axis=-1,
          epsilon=m.eps, stash_type=TensorProto.FLOAT)


RMS_NORM = Pass("rms_norm", "Mul", match_rms_norm, replace_rms_norm)


# --- LayerNorm ------------------------------------------------------------------------------

@dataclass
class LayerNormMatch:
    x: str
    weight: str
    bias: str
    eps: float
    nodes: list[NodeProto]
    out: str


def _vector_weight(g: Graph, node: NodeProto) -> tuple[str, str] | None:
    """(the 1-D weight operand, the other operand) of a binary node, if one is a weight."""
    for k in (0, 1):
        w = node.input[k]
        if g.is_weight(w) and len(g.weights[w].shape) == 1:
            return w, node.input[1 - k]
    return None


def match_layer_norm(g: Graph, add_b: NodeProto) -> LayerNormMatch | None:
    """Anchor: the Add of the bias (after the Mul by the weight)."""
    found = _vector_weight(g, add_b)
    mul_w = g.producer(found[1], "Mul") if found else None
    scale = _vector_weight(g, mul_w) if mul_w is not None else None
    if scale is None:
        return None
    bias, (weight, y) = found[0], scale
    elem = g.elem_type(weight)
    if g.elem_type(bias) != elem:
        return None
    y32, cast_out = _strip_cast(g, y)
    if cast_out is not None and attr(cast_out, "to") != elem:
        return None
    scaled = g.producer(y32)
    found = _scale_of(g, scaled) if scaled is not None and scaled.op_type in ("Mul", "Div") \
        else None
    if found is None:
        return None
    centred, inv_nodes, sqrt = found
    add = g.producer(sqrt.input[0], "Add")
    eps, var = const_and_other(g, add) if add is not None else (None, None)
    var_mean = _mean_last(g, var) if var is not None else None
    centring = _centred(g, centred)
    if eps is None or var_mean is None or centring is None:
        return None
    square = g.producer(var_mean.input[0])
    if not _is_square_of(g, square, centred):
        return None
    sub, mean = centring
    x, cast_in = _strip_cast(g, sub.input[0], TensorProto.FLOAT)
    nodes = [n for n in (cast_in, mean, sub, square, var_mean, add, *inv_nodes, scaled,
                         cast_out, mul_w, add_b) if n]
    if not g.private(nodes, keep=[add_b.output[0]]):
        return None
    return LayerNormMatch(x, weight, bias, eps, nodes, add_b.output[0])


def replace_layer_norm(g: Graph, m: LayerNormMatch) -> None:
    g.remove(m.nodes)
    g.add("LayerNormalization", [m.x, m.weight, m.bias], [m.out], name="LayerNorm", axis=-1,
          epsilon=m.eps, stash_type=TensorProto.FLOAT)


LAYER_NORM = Pass("layer_norm", "Add", match_layer_norm, replace_layer_norm)


# --- residual add + RMSNorm / LayerNorm ------------------------------------------------------

@dataclass
class AddNormMatch:
    add: NodeProto
    norm: NodeProto


def match_add_norm(g: Graph, norm: NodeProto) -> AddNormMatch | None:
    """Anchor: an RMSNormalization or LayerNormalization (with its bias) over the last axis
    whose input is a residual Add (two computed operands; a bias Add has a weight operand
    and is not a residual)."""
    add = g.producer(norm.input[0], "Add")
    weights = 2 if norm.op_type == "RMSNormalization" else 3
    if add is None or attr(norm, "axis", -1) != -1 or len(norm.input) != weights:
        return None
    if any(g.const(v) is not None or g.is_weight(v) or v in g.inits for v in add.input):
        return None
    # The sum stays an output of the fused node, so the Add may have other consumers.
    return AddNormMatch(add, norm)


def replace_add_rms_norm(g: Graph, m: AddNormMatch) -> None:
    g.remove([m.add, m.norm])
    g.use_function(add_rms_norm_function)
    g.add("AddRMSNorm", [m.add.input[0], m.add.input[1], m.norm.input[1]],
          [m.norm.output[0], m.add.output[0]], name="AddRMSNorm", domain=LLMC_DOMAIN,
          epsilon=attr(m.norm, "epsilon", 1e-5))


def add_rms_norm_function():
    """AddRMSNorm(x, residual, weight) -> (normed, sum); sum = x + residual."""
    return make_function("AddRMSNorm", ["x", "residual", "weight"], ["normed", "sum"], [
        helper.make_node("Add", ["x", "residual"], ["sum"]),
        ref(helper.make_node("RMSNormalization", ["sum", "weight"], ["normed"], axis=-1,
                             stash_type=TensorProto.FLOAT), "epsilon", AttributeProto.FLOAT),
    ], attributes=["epsilon"], doc="normed = RMSNormalization(x + residual) * weight")


ADD_RMS_NORM = Pass("add_rms_norm", "RMSNormalization", match_add_norm,
                    replace_add_rms_norm)


def replace_add_layer_norm(g: Graph, m: AddNormMatch) -> None:
    g.remove([m.add, m.norm])
    g.use_function(add_layer_norm_function)
    g.add("AddLayerNorm", [m.add.input[0], m.add.input[1], *m.norm.input[1:]],
          [m.norm.output[0], m.add.output[0]], name="AddLayerNorm", domain=LLMC_DOMAIN,
          epsilon=attr(m.norm, "epsilon", 1e-5))


def add_layer_norm_function():
    """AddLayerNorm(x, residual, weight, bias) -> (normed, sum); sum = x + residual."""
    return make_function("AddLayerNorm", ["x", "residual", "weight", "bias"],
                         ["normed", "sum"], [
        helper.make_node("Add", ["x", "residual"], ["sum"]),
        ref(helper.make_node("LayerNormalization", ["sum", "weight", "bias"], ["normed"],
                             axis=-1, stash_type=TensorProto.FLOAT), "epsilon",
            AttributeProto.FLOAT),
    ], attributes=["epsilon"], doc="normed = LayerNormalization(x + residual) * weight + bias")


ADD_LAYER_NORM = Pass("add_layer_norm", "LayerNormalization", match_add_norm,
                      replace_add_layer_norm)
