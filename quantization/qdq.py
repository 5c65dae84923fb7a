"""Quantization as graph rewrites: each weight GEMM ``MatMul(x, W)`` of the fused graph gets
Q/DQ nodes that onnxruntime runs and TensorRT(-RTX) turns into a packed-weight GEMM.

    int4 (RTN, AWQ)   MatMul([Mul(x, 1/s)], DequantizeLinear(W_int4, scale, axis=0,
                                                            block_size=B))
                      (AWQ's 1/s goes into the RMSNorm weight instead where x is a norm's
                      output that only this GEMM reads: the fused QKV and gate-up GEMMs)
                      + MatMul(MatMul(x, E), offsets): a zero-point checkpoint's
                      (8 - z) s per block, E the 0/1 [K, K / B] block-sum matrix
    fp8 (W8A8)        MatMul(DequantizeLinear(QuantizeLinear(x, s_x)),
                             DequantizeLinear(W_e4m3, scale[N], axis=1))
                      (first_token: x' = Where(position_ids == 0, x rounded to E4M3 with a
                      scale of its own row's |max| / 448, the Q/DQ above): a sequence's first
                      token, whose activations reach far past every other token's, takes a
                      scale of its own)
    fp8-block (W8A16) MatMul(x, DequantizeLinear(W_e4m3, scale, axis=0, block_size=B))
                      (a scale per block of B k and output column, as INT4's); a mixture of
                      experts' stacked [E, K, N] weights too (axis=1, a scale [E, K / B, N])

A rewrite is a Pass (passes/pattern.py): the pattern is a MatMul whose second input is a 2-D
weight (fp8-block: or a stack of experts), which does not route tokens to experts (the router
and Qwen2-MoE's shared-expert gate stay 16-bit, as vLLM and the FP8 releases keep them: a
rounded logit can send a token to another expert) and which is not the LM head (by default
it stays 16-bit: its error lands on every logit, and it is the one GEMM the embedding table
may share; with_lm_head: quantized too, a tied table first given a transposed copy of its
own by untie_lm_head); the check is
that the format fits (an INT4 block divides K; FP8 has a calibrated scale for x); the
replacement swaps in the Q/DQ form.
The quantized weights stay lazy: one loader quantizes a weight once, at save time, and hands
out its parts (values, scale, AWQ's 1/s), which sit next to each other in the streaming
order, so memory still holds one weight at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection

import numpy as np
import onnx
from onnx import NodeProto

from llmc import contract
from llmc.arrays import transposed
from llmc.dtypes import np_dtype, onnx_type
from llmc.graph import Weight
from llmc.passes.ir import Graph
from llmc.passes.manager import run_passes
from llmc.passes.pattern import Pass
from llmc.quantization import numerics

FP8 = "float8e4m3fn"


@dataclass(frozen=True)
class Site:
    """A weight GEMM the quantizer may rewrite: ``node`` computes ``x @ weights[weight]``."""

    node: NodeProto
    x: str
    weight: str
    is_lm_head: bool = False


def lm_head(g: Graph) -> NodeProto | None:
    """The GEMM that makes the logits: walking back from the graph output through ops with
    one non-constant input (Cast, Identity, Gemma 2's cap * tanh(x / cap)), and through a
    zero-point format's Add to the INT4 GEMM beside its offsets' (int4_pass)."""
    if "lm_head" not in g.memo:
        node = g.producer(contract.LOGITS)
        while node is not None and node.op_type not in ("MatMul", "Gemm"):
            live = [v for v in node.input if v and g.const(v) is None and not g.is_weight(v)]
            if node.op_type == "Add" and len(live) == 2:
                live = [v for v in live if _reads_dequantized(g, g.producer(v))]
            node = g.producer(live[0]) if len(live) == 1 else None
        g.memo["lm_head"] = node
    return g.memo["lm_head"]


def _reads_dequantized(g: Graph, node: NodeProto | None) -> bool:
    dq = g.producer(node.input[1]) if node is not None and node.op_type == "MatMul" else None
    return dq is not None and dq.op_type == "DequantizeLinear"


def match_site(g: Graph, node: NodeProto, with_lm_head: bool = False,
               experts: bool = False) -> Site | None:
    """The site of a weight GEMM: a 2-D weight, or with ``experts`` also a stack of experts'
    [E, K, N]."""
    w = g.weights.get(node.input[1]) if len(node.input) == 2 else None
    if w is None or len(w.shape) not in ((2, 3) if experts else (2,)) or _routes(g, node):
        return None
    is_head = node is lm_head(g)
    if is_head and not with_lm_head:
        return None
    return Site(node, node.input[0], node.input[1], is_head)


def _routes(g: Graph, node: NodeProto) -> bool:
    """Whether the GEMM decides a mixture of experts' routing: the router (its logits'
    softmax feeds a TopK, model_zoo/layers.py routed_experts) or Qwen2-MoE's shared-expert
    gate (one column, through a Sigmoid)."""
    for user in g.consumers(node.output[0]):
        if user.op_type == "Sigmoid" and g.weights[node.input[1]].shape[-1] == 1:
            return True
        if user.op_type == "Cast" and any(
                s.op_type == "Softmax" and any(t.op_type == "TopK"
                                               for t in g.consumers(s.output[0]))
                for s in g.consumers(user.output[0])):
            return True
    return False


def sites(model: onnx.ModelProto, weights: list[Weight], with_lm_head: bool = False,
          experts: bool = False) -> list[Site]:
    """Every GEMM a quantizer may rewrite, in graph order (what calibration observes);
    ``experts``: the stacked experts' GEMMs too (fp8-block)."""
    g = Graph(model, weights)
    return [s for n in g.nodes.values() if n.op_type == "MatMul"
            if (s := match_site(g, n, with_lm_head, experts)) is not None]


def lm_head_quantized(model: onnx.ModelProto, weights: list[Weight]) -> bool:
    """Whether the LM head reads a DequantizeLinear (a quantizer took it)."""
    g = Graph(model, weights)
    return _reads_dequantized(g, lm_head(g))


def untie_lm_head() -> Pass:
    """A tied LM head, Gemm(x, E, transB=1) on the embedding table, as MatMul(x, E^T) on a
    transposed copy of the table (the same numbers), so the quantizers may take it while the
    table stays 16-bit for the embedding lookup."""
    def match(g: Graph, node: NodeProto) -> NodeProto | None:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = g.weights.get(node.input[1]) if len(node.input) == 2 else None
        if node is not lm_head(g) or w is None or len(w.shape) != 2 or attrs.get(
                "transB") != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            return None
        return node

    def replace(g: Graph, node: NodeProto) -> None:
        table = g.weights[node.input[1]]
        head = g.add_weight(Weight(f"{table.name}.lm_head", table.dtype, table.shape[::-1],
                                   lambda: transposed(table.read())), table.name)
        g.remove([node])
        g.add("MatMul", [node.input[0], head], list(node.output), name=node.name)
        g.memo.pop("lm_head", None)

    return Pass("untie-lm-head", "Gemm", match, replace)


class _Parts:
    """One quantization, computed on the first read of any of its parts and forgotten once
    every part has been read (the parts are saved one after another)."""

    def __init__(self, compute: Callable[[], tuple[np.ndarray, ...]], n: int):
        self.compute, self.n, self.parts = compute, n, None

    def loader(self, k: int) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            if self.parts is None:
                self.parts = list(self.compute())
            part, self.parts[k] = self.parts[k], None
            if all(p is None for p in self.parts):
                self.parts = None
            return part
        return load


_NORM_WEIGHT_INPUT = {"RMSNormalization": 1, "AddRMSNorm": 2}


def _sole_norm_weight(g: Graph, x: str) -> str | None:
    """The weight of the RMSNorm whose output x is, when x feeds nothing but the GEMM being
    quantized and the weight nothing but the norm: AWQ's 1/s then goes into that weight
    (rounded once more, as AutoAWQ and ModelOpt fold it) instead of a Mul on every step.
    Layers whose norm feeds several GEMMs (q, k, v unfused), or a weight shared, keep the
    Mul."""
    norm = g.producer(x)
    at = _NORM_WEIGHT_INPUT.get(norm.op_type) if norm is not None else None
    if at is None or norm.output[0] != x or len(g.consumers(x)) != 1:
        return None
    weight = norm.input[at]
    return weight if g.is_weight(weight) and len(g.consumers(weight)) == 1 else None


def _swap(g: Graph, site: Site, x: str, w: str) -> None:
    """Replace the site's MatMul by MatMul(x, w), same name and output."""
    g.remove([site.node])
    g.add("MatMul", [x, w], list(site.node.output), name=site.node.name)


# --- INT4 weight-only ---------------------------------------------------------------------


@dataclass(frozen=True)
class GivenInt4:
    """A weight already in INT4 (a pre-quantized checkpoint's), in the graph's [in, out]."""

    values: Callable[[], np.ndarray]    # int4 [K, N]
    scale: np.ndarray                   # float32 [K / block, N]
    pre_scale: np.ndarray | None        # [K]: the GEMM reads x * it (AWQ's 1 / s)
    offset: np.ndarray | None = None    # float32 [K / block, N]: W = q * scale + offset
    # offset = (8 - z) scale for integer zero points z (AutoAWQ, GPTQ), or any value (a GGUF
    # Q4_1 block's m + 8 d): the graph names the GEMMs apart (Int4ZeroPoints, Int4Offsets),
    # and the cuda kernels take z as a byte where it is one
    integer_zero_points: bool = True


def int4_pass(awq: dict[str, np.ndarray] | None = None,
              given: dict[str, GivenInt4] | None = None, with_lm_head: bool = False,
              largest_block: int = numerics.INT4_BLOCKS[0], only_given: bool = False,
              zero_point: bool = False, skip: Collection[str] = ()) -> Pass:
    """RTN, or AWQ when ``awq`` maps each weight to its calibration rows of x [M, K]; a
    weight in ``given`` takes those values and scales as they are; the others (with
    ``only_given``, the LM head alone) take the largest block up to ``largest_block`` that
    divides their K (numerics.int4_block), with a zero point a block where ``zero_point``
    (their graph then that of a zero-point checkpoint: the offset GEMM below). Weights in
    ``skip`` stay as they are (--quant-exclude)."""
    given = given or {}

    def match(g: Graph, node: NodeProto) -> Site | None:
        site = match_site(g, node, with_lm_head)
        if site is None or site.weight in skip or (site.weight not in given and (
                (only_given and node is not lm_head(g)) or numerics.int4_block(
                    g.weights[site.weight].shape[0], largest_block) is None)):
            return None
        return site

    def replace(g: Graph, site: Site) -> None:
        w = g.weights[site.weight]
        rows = awq.get(site.weight) if awq is not None else None
        have = given.get(site.weight)
        (k, n) = w.shape
        block = k // have.scale.shape[0] if have else numerics.int4_block(k, largest_block)

        zp = zero_point and have is None   # a given weight keeps its own format
        quantize = numerics.quantize_int4_zp if zp else numerics.quantize_int4

        def compute():
            """(q, scale[, AWQ's 1 / s][, the zero points' offsets])"""
            if have is not None:
                scale = have.scale.astype(np_dtype(w.dtype))
                pre = () if have.pre_scale is None else (have.pre_scale.astype(scale.dtype),)
                return (have.values(), scale, *pre)
            data = w.read().astype(np.float32)
            if rows is None:
                return quantize(data, block, w.dtype)
            s, _ = numerics.awq_scales(data, rows, block, w.dtype, zero_point=zp)
            clip = numerics.awq_clip(data * s[:, None], rows / s, block, w.dtype, zero_point=zp)
            q, scale, *offset = quantize(data * s[:, None], block, w.dtype, clip)
            return (q, scale, (1 / s).astype(np_dtype(w.dtype)), *offset)

        scaled = rows is not None or (have is not None and have.pre_scale is not None)
        parts = _Parts(compute, (3 if scaled else 2) + zp)
        q = g.add_weight(Weight(f"{w.name}.int4", "int4", (k, n), parts.loader(0)), w.name)
        scale = g.add_weight(Weight(f"{w.name}.int4_scale", w.dtype, (k // block, n),
                                    parts.loader(1)), w.name)
        x = site.x
        norm_weight = _sole_norm_weight(g, x) if scaled else None
        if norm_weight is not None:   # x / s folded into the norm that makes x
            gamma, inv = g.weights[norm_weight], parts.loader(2)
            folded = Weight(f"{norm_weight}.awq", gamma.dtype, gamma.shape, lambda: (
                gamma.read().astype(np.float32) * inv().astype(np.float32)
            ).astype(np_dtype(gamma.dtype)))
            g.rename_uses(norm_weight, g.add_weight(folded, norm_weight))
        elif scaled:   # x / s: an elementwise Mul that TensorRT fuses before the GEMM
            inv = g.add_weight(Weight(f"{w.name}.awq_inv_scale", w.dtype, (k,),
                                      parts.loader(2)), w.name)
            x = g.add("Mul", [x, inv], 1, name="AwqScale").output[0]
        dq = g.add("DequantizeLinear", [q, scale], 1, name="DequantizeInt4", axis=0,
                   block_size=block).output[0]
        if zp:
            offsets, integer = parts.loader(3 if scaled else 2), True
        elif have is not None and have.offset is not None:
            offsets, integer = (lambda: have.offset), have.integer_zero_points
        else:
            _swap(g, site, x, dq)
            return
        # A zero-point format's (8 - z) s: x's sums over each block of K, [T, K / B], times
        # the offsets [K / B, N], added to the symmetric GEMM. The sums are a GEMM with a 0/1
        # block matrix (exact; one a shape, which the layers share), so every backend runs
        # the offset as two small GEMMs.
        sums = f"int4_block_sums.{k}x{block}"
        if sums not in g.weights:
            g.add_weight(Weight(sums, w.dtype, (k, k // block), lambda: np.kron(
                np.eye(k // block), np.ones((block, 1))).astype(np_dtype(w.dtype))), w.name)
        offset = g.add_weight(Weight(f"{w.name}.int4_offset", w.dtype, (k // block, n),
                                     lambda: offsets().astype(np_dtype(w.dtype))), w.name)
        g.remove([site.node])
        xs = g.add("MatMul", [x, sums], 1, name="Int4BlockSums").output[0]
        y0 = g.add("MatMul", [x, dq], 1, name=site.node.name).output[0]
        y1 = g.add("MatMul", [xs, offset], 1, name="Int4ZeroPoints" if integer
                   else "Int4Offsets").output[0]
        g.add("Add", [y0, y1], list(site.node.output), name="Int4ZeroPointAdd")

    return Pass("int4-awq" if awq is not None else "int4-gguf" if only_given else "int4-rtn",
                "MatMul", match, replace)


# --- FP8 W8A8 -------------------------------------------------------------------------------


def fp8_pass(act_amax: dict[str, float],
             weight_scale: dict[str, np.ndarray] | None = None,
             with_lm_head: bool = False, first_token: bool = False) -> Pass:
    """FP8 weights and activations; ``act_amax`` maps each weight to its input's calibrated
    |max| (a GEMM without one is left alone); ``weight_scale``, where given, each weight's
    scale per output column (a pre-quantized checkpoint's) instead of its |max| / 448.
    ``first_token``: the rows of a sequence's first position take a scale of their own
    (first_token_input; not the LM head's, whose rows are the sequences' last tokens)."""
    weight_scale = weight_scale or {}

    def match(g: Graph, node: NodeProto) -> Site | None:
        site = match_site(g, node, with_lm_head)
        return site if site is not None and site.weight in act_amax else None

    def replace(g: Graph, site: Site) -> None:
        w = g.weights[site.weight]
        given = weight_scale.get(site.weight)
        parts = _Parts(lambda: numerics.quantize_fp8_weight(w.read(), w.dtype, given), 2)
        q = g.add_weight(Weight(f"{w.name}.fp8", FP8, w.shape, parts.loader(0)), w.name)
        scale = g.add_weight(Weight(f"{w.name}.fp8_scale", w.dtype, (w.shape[1],),
                                    parts.loader(1)), w.name)
        # the zero point only says the quantized type (TensorRT takes zero zero points only)
        zero = g.add_const(np.zeros((), np_dtype(FP8)), "fp8_zero")
        xs = g.add_const(numerics.fp8_activation_scale(act_amax[site.weight], w.dtype),
                         "fp8_x_scale")
        xq = g.add("QuantizeLinear", [site.x, xs, zero], 1, name="QuantizeFp8").output[0]
        x = g.add("DequantizeLinear", [xq, xs, zero], 1, name="DequantizeFp8").output[0]
        if first_token and not site.is_lm_head and contract.POSITION_IDS in g.inputs:
            x = first_token_input(g, site.x, x, w.dtype)
        dq = g.add("DequantizeLinear", [q, scale], 1, name="DequantizeFp8Weight",
                   axis=1).output[0]
        _swap(g, site, x, dq)

    return Pass("fp8", "MatMul", match, replace)


FIRST_TOKEN = "Fp8FirstToken"   # the names of first_token_input's nodes begin so
# Where x's |max| is 0 the scale is this instead (x / it is 0 all the same): the smallest
# normal float32, as the kernels take it (kernels/qgemv.cuh: fp8_row_scale)
FIRST_TOKEN_MIN_SCALE = np.float32(2.0 ** -126)


def first_token_input(g: Graph, x: str, x_qdq: str, dtype: str) -> str:
    """Where(position_ids == 0, x rounded to E4M3 with s = max(|max| of its row / 448,
    FIRST_TOKEN_MIN_SCALE), x_qdq): the row of a sequence's first token takes a scale of its
    own, computed in float32 as the kernels compute it. A first token's activations (an
    attention sink's) go far past what the other tokens reach (SmolLM2: 300x in a layer),
    and a calibrated per-tensor scale either clips them or, spanning them, rounds every other
    token coarsely (bench/results/quantization.md, "A sequence's first token"). The mask
    [T, 1] is made once a graph."""
    if "fp8_first_token" not in g.memo:   # the mask and the constants, shared by the sites
        zero = g.add_const(np.zeros((), np.int32), "position_zero")
        last = g.add_const(np.array([-1], np.int64), "last_axis")
        eq = g.add("Equal", [contract.POSITION_IDS, zero], 1, name=f"{FIRST_TOKEN}Mask")
        mask = g.add("Unsqueeze", [eq.output[0], last], 1, name=f"{FIRST_TOKEN}Mask").output[0]
        g.memo["fp8_first_token"] = (mask, last,
                                     g.add_const(np.float32(numerics.FP8_MAX), "fp8_max"),
                                     g.add_const(FIRST_TOKEN_MIN_SCALE, "fp8_min_scale"))
    mask, last, fp8_max, min_scale = g.memo["fp8_first_token"]

    def op(op_type: str, *inputs: str, **attrs) -> str:
        return g.add(op_type, list(inputs), 1, name=FIRST_TOKEN, **attrs).output[0]
    x32 = op("Cast", x, to=onnx.TensorProto.FLOAT)
    amax = op("ReduceMax", op("Abs", x32), last, keepdims=1)
    s = op("Max", op("Div", amax, fp8_max), min_scale)
    q = op("Cast", op("Div", x32, s), to=onnx.TensorProto.FLOAT8E4M3FN, saturate=1)
    own = op("Cast", op("Mul", op("Cast", q, to=onnx.TensorProto.FLOAT), s),
             to=onnx_type(dtype))
    return op("Where", mask, own, x_qdq)


# --- FP8 weight-only, in blocks ---------------------------------------------------------------


@dataclass(frozen=True)
class GivenFp8Blocks:
    """A weight already in block-wise FP8 (a checkpoint's), in the graph's [in, out] (a stack
    of experts: [E, in, out])."""

    values: Callable[[], np.ndarray]    # float8e4m3fn [[E,] K, N]
    scale: np.ndarray                   # float32 [[E,] K / block, N]


def fp8_block_pass(given: dict[str, GivenFp8Blocks] | None = None, with_lm_head: bool = False,
                   skip: Collection[str] = ()) -> Pass:
    """E4M3 weights with a scale per block of K and output column, x left 16-bit: a weight in
    ``given`` keeps its values and scales; the others are rounded to nearest in the largest
    block of numerics.FP8_BLOCKS that divides their K (none: left 16-bit), a scale each
    block's |max| / 448; a mixture's stacked experts [E, K, N] likewise, each expert on its
    own. Weights in ``skip`` stay as they are (--quant-exclude)."""
    given = given or {}

    def match(g: Graph, node: NodeProto) -> Site | None:
        site = match_site(g, node, with_lm_head, experts=True)
        if site is None or site.weight in skip or (
                site.weight not in given and
                numerics.fp8_block(g.weights[site.weight].shape[-2]) is None):
            return None
        return site

    def replace(g: Graph, site: Site) -> None:
        w = g.weights[site.weight]
        have = given.get(site.weight)
        *stack, k, n = w.shape
        block = k // have.scale.shape[-2] if have else numerics.fp8_block(k)

        def compute():
            if have is not None:
                return have.values(), have.scale.astype(np_dtype(w.dtype))
            return numerics.quantize_fp8_blocks(w.read(), block, w.dtype)

        parts = _Parts(compute, 2)
        q = g.add_weight(Weight(f"{w.name}.fp8", FP8, w.shape, parts.loader(0)), w.name)
        scale = g.add_weight(Weight(f"{w.name}.fp8_block_scale", w.dtype,
                                    (*stack, k // block, n), parts.loader(1)), w.name)
        dq = g.add("DequantizeLinear", [q, scale], 1, name="DequantizeFp8Block",
                   axis=len(stack), block_size=block).output[0]
        _swap(g, site, site.x, dq)

    return Pass("fp8-block", "MatMul", match, replace)


def quantize_graph(model: onnx.ModelProto, weights: list[Weight], p: Pass,
                   log: Callable[[str], None] | None = None
                   ) -> tuple[onnx.ModelProto, list[Weight], dict]:
    """Run one quantization pass (or untie_lm_head) through the pass manager (the same
    report and counters)."""
    return run_passes(model, weights, passes=[p], log=log)
