"""Lowering for the cuda backend: the fused ONNX graph -> an execution plan (plan.py).

Every node of the fused graph maps to a kernel, a view, or nothing at all:

    Gather(embedding table, input_ids)            embedding            glue.cu
      [-> Mul(constant): Gemma's sqrt(hidden)]    (embedding_scale)
    Gather(position table, position_ids)          embedding            glue.cu (GPT-2)
    RMSNormalization / llmc AddRMSNorm            rmsnorm / add_rmsnorm norm.cu
    LayerNormalization / llmc AddLayerNorm        layernorm /          norm.cu (GPT-2)
                                                  add_layernorm
    Gelu (not gated)                              gelu                 activation.cu (GPT-2)
    MatMul(x, W) / Gemm(x, E, transB=1)           gemm                 gemv.cu (1-8 rows),
      [-> FusedSwiGLU / FusedGeGLU]                                    cuBLASLt (more); the
                                                                       gated activation fused
    MatMul(x', DequantizeLinear(W_q, scale))     gemm, attr quant     qgemv.cu (1-16 rows),
      x' = x, AWQ's Mul(x, 1/s), or FP8 Q/DQ(x)                        cuBLASLt (more) on a
      (quantization/qdq.py's forms)                                    dequantized INT4
      [+ MatMul(MatMul(x', E), offsets): INT4    (input 5: the zero    weight / FP8 x;
      zero points]                               points)               qgemv_zp.cu
      FP8 in blocks (W8A16: x' = x, the DQ's     quant fp8-block       qgemv_fp8b.cu (1-16
      block_size along K)                                              rows), cuBLASLt on
                                                                       the dequantized weight
      FP8 with first tokens' own scales: x' =     attr first_token     the same kernels read
      Where(position_ids == 0, x rounded with                          the step's first-token
      its row's |max| / 448, the Q/DQ)                                 flags and scale those
                                                                       rows themselves
    llmc FusedSwiGLU / FusedGeGLU                 swiglu / geglu       activation.cu
    llmc SwiGLU (gate, up apart)                  swiglu2              activation.cu
    a mixture of experts (routed_experts: the     moe                  moe.cu (routing and
      router logits' Cast, Softmax, TopK [, Div],                      grouping on the GPU,
      ScatterElements, the stacked gate-up                             grouped GEMMs over
      MatMul, FusedSwiGLU, the down MatMul, the                        the routed rows,
      weighted ReduceSum, its Cast [, Qwen2-MoE's                      weighted combine)
      Add of Sigmoid(gate) * shared expert])
    llmc PagedAttention with its q/k/v chain:     rope_cache           rope.cu (RoPE, QKV bias,
      MatMul [+ Add bias] -> Split -> Reshape                          q/k norms, K/V written
      [-> RMSNormalization per head (q, k)]                            into the layer's pool
      -> RotaryEmbedding (q, k)                                        in place; no RoPE, as
                                                                       in GPT-2: rot 0)
                                                  attention            paged_attention.cu
                                                                       (+ logit soft-cap)
    an FP8 pool's Q/DQ (quantization/kv.py):      attr kv_scale of     rope.cu writes E4M3
      Unsqueeze(k), Unsqueeze(v) -> Concat ->     rope_cache and       bytes of x / scale,
      QuantizeLinear -> kv_rows_out_l,            attention            the *_e4m3 attention
      DequantizeLinear -> Gather(0 | 1) -> k, v;                       modules read them back
      DequantizeLinear(kv_cache_l)                                     times the scale
    Gather(h, last_token_rows)                    gather_rows          glue.cu
    Cast(logits, float32)                         the LM-head GEMM writes fp32 (or cast_f32)
    Div(logits, cap) -> Tanh -> Mul(cap)          softcap              glue.cu (Gemma 2's
                                                                       final-logit soft-cap)
    Reshape / Squeeze / Unsqueeze / Split         views of one buffer
    Identity to kv_cache_out_{l}                  nothing: the pool is updated in place
      (an FP8 graph's kv_rows_out_{l} outputs     nothing either: the rope kernel writes the
      instead)                                    same bytes into the pool itself)
    the RoPE angle chain (Cos/Sin of positions    nothing: the rope kernel computes angles
      times inv_freq)                             from positions and the inv_freq table

A node with no mapping is a build error that names it. Memory: every activation gets an
offset in one arena, reusing space once a value is dead (first fit over live intervals,
sizes at the build limits); weights keep the offsets `save_onnx` gave them in weights.bin,
which becomes the engine's weights section, GEMM weights rewritten in place from the graph's
[in, out] to [out, in] (rewrite_weights; stacked experts each), the layout a decode GEMV
streams row by row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmc import contract
from llmc.arrays import transposed
from llmc.backends.cuda.plan import (
    ALIGN,
    Op,
    Plan,
    Value,
    align,
    int4_block_offsets,
    itemsize,
    live_intervals,
    numel,
)
from llmc.dtypes import ONNX_TYPES, np_dtype
from llmc.errors import LlmcError
from llmc.limits import BuildLimits
from llmc.plugins import launch_rules as lr
from llmc.plugins.attention_plan import SM90_MODULE, attention_module
from llmc.quantization.numerics import FP8_MAX
from llmc.quantization.qdq import FIRST_TOKEN, FIRST_TOKEN_MIN_SCALE

DTYPES = ("float16", "bfloat16")
MODULES = ("norm", "activation", "gemv", "rope", "paged_attention", "glue", "sampling")
_ONNX_FLOAT = 1
FP8 = "float8e4m3fn"


_DTYPE_OF = {onnx: name for name, onnx in ONNX_TYPES.items()}


class UnsupportedGraph(LlmcError):
    """The fused graph holds something the cuda backend has no kernel for."""


class _Graph:
    """Producer/consumer maps and initializers of a ModelProto (weights not loaded)."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.outputs = [o.name for o in model.graph.output]
        self._np = numpy_helper

    def weight(self, name: str):
        t = self.inits.get(name)
        return t if t is not None and t.data_location == 1 else None  # EXTERNAL: a weight

    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        if t is not None and t.data_location != 1:
            return self._np.to_array(t)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return self._np.to_array(node.attribute[0].t)
        return None

    def only(self, value: str, op_type: str):
        node = self.producer.get(value)
        if node is None or node.op_type != op_type:
            raise UnsupportedGraph(f"expected {value!r} to come from {op_type}, got "
                                   f"{node.op_type if node else 'a graph input'}")
        return node


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return {1: a.f, 2: a.i, 3: a.s.decode(), 7: list(a.ints)}.get(a.type, default)
    return default


class Lowering:
    def __init__(self, model, limits: BuildLimits, arch: str):
        self.g = _Graph(model)
        self.limits = limits
        self.arch = arch
        self.values: dict[str, Value] = {}
        self.ops: list[Op] = []
        self.done: set[int] = set()   # ids of nodes consumed by a mapping
        self.dtype = None
        self.quantized: dict[int, dict] = {}   # id(MatMul) -> its quantized form
        self.e4m3: dict[int, dict] = {}        # id(PagedAttention) -> its FP8 pool's k, v, scales
        self.moe_sites: dict[int, dict] = {}   # id(last node of an MoE layer) -> its match

    # --- values --------------------------------------------------------------------------

    def _weight(self, name: str, shape: list | None = None, dtype: str | None = None) -> str:
        """The weight's value; shape, dtype: how the engine stores it, if not as the graph
        does."""
        t = self.g.weight(name)
        if t is None:
            raise UnsupportedGraph(f"{name!r} is not a weight of the graph")
        if name not in self.values:
            info = {e.key: e.value for e in t.external_data}
            offset = int(info["offset"])
            if offset % ALIGN:   # llmc.graph.SMALL_ALIGN keeps every tensor so
                raise UnsupportedGraph(f"{name!r} is stored at byte {offset} of the weights, "
                                       f"not on a {ALIGN}-byte boundary")
            self.values[name] = Value("weight", dtype or _DTYPE_OF[t.data_type],
                                      shape or list(t.dims), offset)
        return name

    def _arena(self, name: str, shape: list, dtype: str | None = None) -> str:
        self.values[name] = Value("arena", dtype or self.dtype, shape)
        return name

    def _view(self, name: str, base: str, shape: list) -> str:
        b = self.values[base]
        self.values[name] = Value("view", b.dtype, shape, base=base)
        return name

    # --- the walk ------------------------------------------------------------------------

    def run(self) -> Plan:
        g = self.g
        for name, dims in contract.CONTROL_INPUTS.items():
            self.values[name] = Value("input", "int32", list(dims))
        # Each mixture of experts (from the router's logits to the Cast of its weighted sum,
        # with Qwen2-MoE's gated shared-expert sum; block-wise FP8 experts' DequantizeLinear)
        # becomes one moe op, emitted where its last node stands; checked first, so a layer
        # the kernels cannot take is named as one.
        for node in g.nodes:
            if node.op_type == "TopK":
                site = self._claim_moe(node)
                self.moe_sites[id(site["anchor"])] = site
        for node in g.nodes:
            if node.op_type == "MatMul" and id(node) not in self.done:
                self._claim_quantized(node)
            elif node.op_type == "PagedAttention":
                self._claim_e4m3_pool(node)
        qdq = [n.name for n in g.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")
               and id(n) not in self.done]
        if qdq:
            raise UnsupportedGraph(f"Q/DQ node {qdq[0]!r} is not in a form the cuda backend "
                                   "lowers (quantization/qdq.py's INT4 weight-only, FP8 W8A8 "
                                   "and block-wise FP8 GEMMs, quantization/kv.py's FP8 KV "
                                   "cache)")
        attn = [n for n in g.nodes if n.op_type == "PagedAttention"]
        if not attn:
            raise UnsupportedGraph("the graph has no fused PagedAttention node; the cuda "
                                   "backend needs the fused graph (do not disable the "
                                   "paged_attention pass)")
        self.dtype = self._dtype_of(attn[0])
        # The attention blocks' q/k/v chains and the RoPE angle chain become part of the
        # rope_cache op, emitted where the PagedAttention node stands.
        for node in attn:
            self._claim_attention_chain(node)
        for node in g.nodes:
            if id(node) in self.moe_sites:
                self._moe(self.moe_sites[id(node)])
            elif id(node) not in self.done:
                self._lower(node)
        logits = self._logits()
        arena = self._assign_arena()
        weights = [v for v in self.values.values() if v.where == "weight"]
        weights_end = max((v.offset + align(numel(v.shape, 1, 1) * itemsize(v.dtype))
                           for v in weights if v.offset >= 0), default=0)
        for v in weights:   # tensors the build derives and appends (offset -1 until here)
            if v.offset == -1:
                v.offset = weights_end
                weights_end += align(numel(v.shape, 1, 1) * itemsize(v.dtype))
        # the quantized GEMMs' kernels and the soft-capped or E4M3-pool attention's are
        # compiled only for the models that have them
        quant = any(op.attrs.get("quant") in ("int4", "fp8") for op in self.ops
                    if op.op == "gemm")
        fp8_blocks = any(op.attrs.get("quant") == "fp8-block" for op in self.ops
                         if op.op == "gemm")
        zero_points = any(int4_block_offsets(op) for op in self.ops)
        attention = sorted({attention_module(op.attrs["softcap"], "kv_scale" in op.attrs)
                            for op in self.ops if op.op == "attention"} - set(MODULES))
        moe = any(op.op == "moe" for op in self.ops)
        moe_fp8b = any(op.op == "moe" and any(a.endswith("_group") for a in op.attrs)
                       for op in self.ops)
        # sm_90a's prefill kernel (TMA + wgmma) serves the 16-bit pools
        sm90 = self.arch == "sm_90a" and any(
            "kv_scale" not in op.attrs for op in self.ops if op.op == "attention")
        modules = list(MODULES) + (["qgemv"] if quant else []) + \
            (["qgemv_zp"] if zero_points else []) + (["qgemv_fp8b"] if fp8_blocks else []) + \
            attention + \
            (["moe"] if moe else []) + (["moe_fp8b"] if moe_fp8b else []) + \
            ([SM90_MODULE] if sm90 else [])
        return Plan(self.arch, self.dtype, modules, self.values, self.ops, arena,
                    weights_end, logits, len(attn))

    def _dtype_of(self, attention) -> str:
        q = attention.input[0]
        # the q/k/v GEMM's weight carries the model dtype
        node = self.g.producer.get(q)
        while node is not None and node.op_type != "MatMul":
            node = self.g.producer.get(node.input[0])
        w = node.input[1] if node is not None else ""
        dq = self.g.producer.get(w)
        if dq is not None and dq.op_type == "DequantizeLinear":
            w = dq.input[1]    # a quantized weight: its scales carry the dtype
        t = self.g.weight(w) if w else None
        dtype = _DTYPE_OF.get(t.data_type) if t else None
        if dtype not in DTYPES:
            raise UnsupportedGraph(f"the cuda backend computes in fp16 or bf16, not {dtype}; "
                                   "build with --dtype fp16 or --dtype bf16")
        return dtype

    def _lower(self, node) -> None:
        kind = node.op_type
        handler = getattr(self, f"_op_{kind}", None)
        if handler is None:
            raise UnsupportedGraph(f"the cuda backend has no kernel for {kind} (node "
                                   f"{node.name!r}); supported: {', '.join(self._supported())}")
        handler(node)

    @classmethod
    def _supported(cls) -> list[str]:
        return sorted(k[4:] for k in dir(cls) if k.startswith("_op_"))

    def _emit(self, op: str, node, inputs, outputs, **attrs) -> None:
        self.ops.append(Op(op, list(inputs), list(outputs), attrs, node.name))
        self.done.add(id(node))

    # --- one method per op type: a kernel, a view, or nothing --------------------------------

    def _op_Gather(self, node) -> None:
        data, index = node.input
        # the token embedding, or GPT-2's learned positions: a row of the table each token
        if index in (contract.INPUT_IDS, contract.POSITION_IDS) \
                and self.g.weight(data) is not None:
            table = self._weight(data)
            hidden = self.values[table].shape[1]
            out = self._arena(node.output[0], ["T", hidden])
            self._emit("embedding", node, [table, index], [out], hidden=hidden)
        elif index == contract.LAST_TOKEN_ROWS and _attr(node, "axis", 0) == 0:
            hidden = self.values[data].shape[-1]
            out = self._arena(node.output[0], ["B", hidden])
            self._emit("gather_rows", node, [data, index], [out], hidden=hidden)
        else:
            raise UnsupportedGraph(f"Gather node {node.name!r} is neither an embedding "
                                   "lookup (of token ids or positions) nor the last-token "
                                   "gather")

    def _op_RMSNormalization(self, node) -> None:
        x, w = node.input[:2]
        shape = self.values[x].shape
        out = self._arena(node.output[0], list(shape))
        self._emit("rmsnorm", node, [x, self._weight(w)], [out],
                   eps=float(_attr(node, "epsilon", 1e-5)), n=shape[-1])

    def _op_AddRMSNorm(self, node) -> None:
        x, res, w = node.input
        shape = self.values[x].shape
        out = self._arena(node.output[0], list(shape))
        total = self._arena(node.output[1], list(shape))
        self._emit("add_rmsnorm", node, [x, res, self._weight(w)], [out, total],
                   eps=float(_attr(node, "epsilon", 1e-5)), n=shape[-1])

    def _op_LayerNormalization(self, node) -> None:
        x, w, b = (list(node.input) + [""])[:3]
        shape = self.values[x].shape
        if (_attr(node, "axis", -1) not in (-1, len(shape) - 1) or not b
                or any(node.output[1:])):
            raise UnsupportedGraph(f"LayerNormalization node {node.name!r}: only a LayerNorm "
                                   "over the last axis with a bias and one output is lowered")
        out = self._arena(node.output[0], list(shape))
        self._emit("layernorm", node, [x, self._weight(w), self._weight(b)], [out],
                   eps=float(_attr(node, "epsilon", 1e-5)), n=shape[-1])

    def _op_AddLayerNorm(self, node) -> None:
        x, res, w, b = node.input
        shape = self.values[x].shape
        out = self._arena(node.output[0], list(shape))
        total = self._arena(node.output[1], list(shape))
        self._emit("add_layernorm", node, [x, res, self._weight(w), self._weight(b)],
                   [out, total], eps=float(_attr(node, "epsilon", 1e-5)), n=shape[-1])

    def _op_Gelu(self, node) -> None:
        """A plain GELU (GPT-2's MLP; a gated one is FusedGeGLU)."""
        x = node.input[0]
        approximate = _attr(node, "approximate", "none")
        if approximate not in ("tanh", "none"):
            raise UnsupportedGraph(f"Gelu node {node.name!r}: approximate={approximate!r}")
        out = self._arena(node.output[0], list(self.values[x].shape))
        self._emit("gelu", node, [x], [out], approximate=approximate)

    def _op_MatMul(self, node) -> None:
        x, w = node.input
        if id(node) in self.quantized:
            self._quantized_gemm(node, self.quantized[id(node)])
            return
        t = self.g.weight(w)
        if t is None:
            raise UnsupportedGraph(f"MatMul node {node.name!r} multiplies two activations; "
                                   "only activation x weight GEMMs are lowered")
        # The engine stores a linear weight [out, in] (rewrite_weights rewrites it so): a
        # decode GEMV then reads each output's weights as one contiguous row.
        others = [c.name for c in self.g.consumers[w] if c.op_type != "MatMul"]
        if others:
            raise UnsupportedGraph(f"weight {w!r} of MatMul node {node.name!r} is also read "
                                   f"by {others}; a GEMM weight must serve GEMMs only")
        k, n = t.dims
        self._weight(w, shape=[n, k])
        self._gemm(node, x, w, n, k, trans_b=True)
        self.ops[-1].attrs["transposed"] = True

    def _op_Gemm(self, node) -> None:
        x, w = node.input[:2]
        if (len(node.input) > 2 or _attr(node, "transB", 0) != 1 or _attr(node, "transA", 0)
                or _attr(node, "alpha", 1.0) != 1.0 or self.g.weight(w) is None):
            raise UnsupportedGraph(f"Gemm node {node.name!r}: only Y = X @ W^T (the tied LM "
                                   "head) is lowered")
        n, k = self.values[self._weight(w)].shape
        self._gemm(node, x, w, n, k, trans_b=True)

    def _gemm(self, node, x, w, n, k, trans_b: bool, qinputs: tuple = (), out: str = "",
              **attrs) -> None:
        """qinputs: the quantized weight's scale and its other inputs (INT4: AWQ's 1 / s or
        None, its zero points or None; FP8: x's scale), after x, w and the bias. out: the
        value the GEMM computes, if not the node's output (an INT4 zero-point sum's)."""
        rows = self.values[x].shape[0]
        out_name, out_dtype, bias = out or node.output[0], self.dtype, None
        users = self.g.consumers.get(out_name, [])
        if len(users) == 1 and users[0].op_type == "Add" and id(users[0]) not in self.done:
            other = next(i for i in users[0].input if i != out_name)
            t = self.g.weight(other)
            if t is not None and list(t.dims) == [n]:   # a linear's bias: the GEMM epilogue
                bias = self._weight(other)
                self.done.add(id(users[0]))
                out_name = users[0].output[0]
                users = self.g.consumers.get(out_name, [])
        # The LM head: the graph casts the logits to float32; cuBLASLt writes them so. (Not
        # an MoE router's: the moe op took that Cast, and reads the logits as rounded. Nor a
        # quantized head's with a bias: its fp32-output kernels take an fp32 bias.)
        if (len(users) == 1 and users[0].op_type == "Cast" and id(users[0]) not in self.done
                and _attr(users[0], "to") == _ONNX_FLOAT and not (qinputs and bias)):
            self.done.add(id(users[0]))
            out_name, out_dtype = users[0].output[0], "float32"
        out = self._arena(out_name, [rows, n], out_dtype)
        self._emit("gemm", node, [x, w if qinputs else self._weight(w), bias, *qinputs], [out],
                   n=n, k=k, trans_b=trans_b, out_dtype=out_dtype, **attrs)

    # --- quantized GEMMs (quantization/qdq.py) ----------------------------------------------

    def _claim_quantized(self, node) -> None:
        """MatMul(x', DequantizeLinear(q, scale)) as the quantizer writes it. INT4: x' is x or
        AWQ's Mul(x, 1 / s); FP8: x' = DequantizeLinear(QuantizeLinear(x, sx), sx). Its Q/DQ
        nodes and the Mul become part of the GEMM op, emitted where the MatMul stands."""
        g = self.g
        dq = g.producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            return
        q, scale = dq.input[:2]
        t = g.weight(q)
        if t is None or g.weight(scale) is None:
            raise UnsupportedGraph(f"DequantizeLinear node {dq.name!r} does not read a stored "
                                   "weight and its scale")
        kind = _DTYPE_OF.get(t.data_type)
        x, claimed, site = node.input[0], [dq], {}
        if kind == "int4":
            block, axis = int(_attr(dq, "block_size", 0)), int(_attr(dq, "axis", 1))
            k, n = t.dims
            if axis != 0 or not lr.INT4_K <= block <= lr.INT4_MAX_GROUP or \
                    block & (block - 1) or k % block:
                raise UnsupportedGraph(
                    f"{dq.name!r}: the INT4 kernels take scales in blocks of a power of two "
                    f"from {lr.INT4_K} to {lr.INT4_MAX_GROUP} along K (block_size {block}, "
                    f"axis {axis}, K = {k})")
            mul = g.producer.get(x)
            if mul is not None and mul.op_type == "Mul" and \
                    any(g.weight(i) is not None for i in mul.input):
                pre = next(i for i in mul.input if g.weight(i) is not None)
                x = next(i for i in mul.input if i != pre)
                claimed.append(mul)
                site["pre"] = pre
            site.update(kind="int4", group=block)
            zero_points = self._int4_block_offsets(node, k, n, block)
            if zero_points is not None:
                site.update(offset=zero_points[0], out=zero_points[1],
                            offsets=zero_points[3])
                claimed += zero_points[2]
        elif kind == FP8 and _attr(dq, "block_size", 0):   # weight-only, a scale a block
            block, axis = int(_attr(dq, "block_size", 0)), int(_attr(dq, "axis", 1))
            k, n = t.dims
            if axis != 0 or not _fp8b_block_fits(block, k):
                raise UnsupportedGraph(
                    f"{dq.name!r}: the block-wise FP8 kernels take scales in blocks of a power "
                    f"of two from {lr.FP8B_MIN_GROUP} along K (block_size {block}, axis "
                    f"{axis}, K = {k})")
            site.update(kind="fp8-block", group=block)
        elif kind == FP8:
            where = g.producer.get(x)
            first = where is not None and where.op_type == "Where" and \
                where.name.startswith(FIRST_TOKEN)
            if first:   # --fp8-first-token dynamic: the Q/DQ is the Where's third input
                own_x, branch = self._first_token_branch(where)
                x = where.input[2]
                claimed += branch
            xdq = g.producer.get(x)
            xq = g.producer.get(xdq.input[0]) if xdq is not None and \
                xdq.op_type == "DequantizeLinear" else None
            if xq is None or xq.op_type != "QuantizeLinear":
                raise UnsupportedGraph(f"the FP8 weight of {node.name!r} multiplies an "
                                       "activation that is not quantized to FP8 (W8A8 only)")
            sx, sx2 = g.const(xq.input[1]), g.const(xdq.input[1])
            if sx is None or sx.size != 1 or sx2 is None or float(sx) != float(sx2):
                raise UnsupportedGraph(f"{xq.name!r}: the cuda backend takes one constant "
                                       "per-tensor FP8 activation scale")
            if _attr(dq, "axis", 1) != 1 or len(g.inits[scale].dims) != 1:
                raise UnsupportedGraph(f"{dq.name!r}: FP8 weights take one scale per output "
                                       "channel")
            if self.arch not in lr.FP8_ARCHS:
                raise UnsupportedGraph(f"FP8 engines are built for Hopper (sm_90a), not "
                                       f"{self.arch}; build with --quant int4-awq")
            x = xq.input[0]
            claimed += [xdq, xq]
            site.update(kind="fp8", x_scale=float(np.asarray(sx, np.float32)))
            if first:
                if own_x != x:
                    raise UnsupportedGraph(f"{where.name!r}: a first token's own scale and the "
                                           "Q/DQ read different GEMM inputs")
                site["first_token"] = True
        else:
            raise UnsupportedGraph(f"{dq.name!r} dequantizes {kind} weights; the cuda backend "
                                   "takes INT4 and FP8")
        site.update(x=x, q=q, scale=scale)
        self.quantized[id(node)] = site
        self.done.update(id(c) for c in claimed)

    def _first_token_branch(self, where) -> tuple[str, list]:
        """quantization/qdq.py first_token_input's Where(mask, own, Q/DQ): (the GEMM input
        the first tokens' own rounding reads, the nodes the GEMM op takes over: the Where,
        that rounding and the mask). The kernels compute the rounding itself
        (kernels/qgemv.cuh: fp8_row_scale) and take the mask from the positions."""
        g = self.g
        bad = UnsupportedGraph(f"{where.name!r}: a first token's FP8 scale in a form other "
                               "than quantization/qdq.py's first_token_input")

        def node(value: str, op_type: str, **attrs):
            n = g.producer.get(value)
            if n is None or n.op_type != op_type or not n.name.startswith(FIRST_TOKEN) or \
                    any(_attr(n, a) != v for a, v in attrs.items()):
                raise bad
            taken.append(n)
            return n

        def const(value: str, want) -> None:
            c = g.const(value)
            if c is None or c.size != 1 or float(c) != float(want):
                raise bad

        taken = [where]
        out = node(where.input[1], "Cast")
        if _DTYPE_OF.get(_attr(out, "to")) not in DTYPES:
            raise bad
        mul = node(out.input[0], "Mul")
        q = node(node(mul.input[0], "Cast", to=_ONNX_FLOAT).input[0], "Cast",
                 to=ONNX_TYPES[FP8], saturate=1)
        div = node(q.input[0], "Div")
        s = div.input[1]
        if mul.input[1] != s:
            raise bad
        floor = node(s, "Max")
        const(floor.input[1], FIRST_TOKEN_MIN_SCALE)
        over = node(floor.input[0], "Div")
        const(over.input[1], FP8_MAX)
        amax = node(over.input[0], "ReduceMax", keepdims=1)
        if g.const(amax.input[1]) is None or [int(a) for a in g.const(amax.input[1])] != [-1]:
            raise bad
        x32 = node(amax.input[0], "Abs").input[0]
        if div.input[0] != x32:
            raise bad
        x = node(x32, "Cast", to=_ONNX_FLOAT).input[0]
        mask = node(where.input[0], "Unsqueeze")
        eq = node(mask.input[0], "Equal")
        if eq.input[0] != contract.POSITION_IDS or g.const(eq.input[1]) is None or \
                int(g.const(eq.input[1])) != 0:
            raise bad
        return x, taken

    def _int4_block_offsets(self, node, k: int, n: int, block: int):
        """A zero-point checkpoint's INT4 GEMM (qdq.int4_pass): the MatMul's output added to
        MatMul(MatMul(x', E), offsets), E the 0/1 block-sum weight [K, K / B] and the offsets
        (8 - z) s [K / B, N], or any offsets (Int4Offsets: a GGUF file's Q4_1). (offsets, the
        sum's output, the three nodes, whether they are any offsets) or None. The kernels
        take z itself (rewrite_weights recovers it from the offsets and scales), or the
        offsets as they are."""
        g = self.g
        users = g.consumers.get(node.output[0], [])
        add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
        other = next((i for i in add.input if i != node.output[0]), None) if add else None
        zp = g.producer.get(other) if other else None
        sums = g.producer.get(zp.input[0]) if zp is not None and zp.op_type == "MatMul" \
            else None
        if sums is None or sums.op_type != "MatMul" or sums.input[0] != node.input[0]:
            return None
        e, offsets = g.weight(sums.input[1]), g.weight(zp.input[1])
        if e is None or offsets is None or list(e.dims) != [k, k // block] or \
                list(offsets.dims) != [k // block, n] or \
                not sums.input[1].startswith("int4_block_sums.") or \
                len(g.consumers.get(other, [])) != 1 or len(g.consumers[sums.output[0]]) != 1:
            raise UnsupportedGraph(f"{add.name!r}: an INT4 GEMM's zero points are not the "
                                   "quantizer's form (x's block sums times the offsets)")
        return zp.input[1], add.output[0], [sums, zp, add], zp.name.startswith("Int4Offsets")

    def _quantized_gemm(self, node, site: dict) -> None:
        k, n = self.g.weight(site["q"]).dims
        if self.g.weight(site["scale"]).data_type != ONNX_TYPES[self.dtype]:
            raise UnsupportedGraph(f"the scales of {site['q']!r} are not {self.dtype}")
        if site["kind"] == "int4":
            # [out, in] packed for the kernels (pack_int4), the scales [out, in / block]
            w = self._weight(site["q"], shape=[n, k // 2], dtype="uint8")
            scale = self._weight(site["scale"], shape=[n, k // site["group"]])
            pre = self._weight(site["pre"]) if "pre" in site else None
            # the zero points, a byte each, where the offsets were, or the offsets transposed
            # (rewrite_weights)
            zp = None if "offset" not in site else self._weight(
                site["offset"], shape=[n, k // site["group"]],
                **({} if site["offsets"] else {"dtype": "uint8"}))
            self._gemm(node, site["x"], w, n, k, trans_b=True, qinputs=(scale, pre, zp),
                       out=site.get("out", ""), quant="int4", group=site["group"],
                       **({"offsets": True} if site.get("offsets") else {}))
        elif site["kind"] == "fp8-block":
            # [out, in] E4M3 bytes and the scales [out, in / block], both transposed
            w = self._weight(site["q"], shape=[n, k], dtype=FP8)
            scale = self._weight(site["scale"], shape=[n, k // site["group"]])
            self._gemm(node, site["x"], w, n, k, trans_b=True, qinputs=(scale, None),
                       quant="fp8-block", group=site["group"])
        else:
            w = self._weight(site["q"], shape=[n, k], dtype=FP8)
            # The kernel and cuBLASLt scale each output channel by x_scale * w_scale[n] in
            # fp32: a copy the build appends (cuBLASLt's x-side scale is then a vector of ones).
            src = self._weight(site["scale"])
            scale = f"{src}.f32"
            self.values[scale] = Value("weight", "float32", [n], -1)
            self._gemm(node, site["x"], w, n, k, trans_b=True, qinputs=(scale, None),
                       quant="fp8", x_scale=site["x_scale"], scale_from=src,
                       **({"first_token": True} if site.get("first_token") else {}))
        self.ops[-1].attrs["transposed"] = True

    def _op_Add(self, node) -> None:
        a, b = node.input
        va, vb = self.values.get(a), self.values.get(b)
        if va is None or vb is None or va.where == "weight" or vb.where == "weight" \
                or va.shape != vb.shape:
            raise UnsupportedGraph(f"Add node {node.name!r}: only the sum of two activations "
                                   "of one shape (a residual) is lowered")
        out = self._arena(node.output[0], list(va.shape))
        self._emit("add", node, [a, b], [out], n=va.shape[-1])

    def _op_Mul(self, node) -> None:
        """The embedding times a constant (Gemma's sqrt(hidden), a constant of the dtype):
        folded into the lookup, which writes the product."""
        x, c = node.input
        scale = self.g.const(c)
        op = next((o for o in self.ops if o.outputs == [x]), None)
        if (scale is None or scale.size != 1 or op is None or op.op != "embedding"
                or "scale" in op.attrs or len(self.g.consumers.get(x, [])) != 1):
            raise UnsupportedGraph(f"Mul node {node.name!r}: only the embedding times a "
                                   "constant (Gemma's sqrt(hidden)) is lowered")
        op.outputs = [self._arena(node.output[0], list(self.values.pop(x).shape))]
        op.attrs["scale"] = float(scale.reshape(-1)[0].astype(np.float32))
        op.node += f" * {node.name}"
        self.done.add(id(node))

    def _op_Div(self, node) -> None:
        """Gemma 2's final-logit soft-cap, cap * tanh(logits / cap) on the fp32 logits:
        Div(x, cap) -> Tanh -> Mul(., cap), one kernel."""
        g = self.g
        x, c = node.input
        cap = g.const(c)
        users = g.consumers.get(node.output[0], [])
        tanh = users[0] if len(users) == 1 and users[0].op_type == "Tanh" else None
        after = g.consumers.get(tanh.output[0], []) if tanh is not None else []
        mul = after[0] if len(after) == 1 and after[0].op_type == "Mul" else None
        other = [i for i in mul.input if i != tanh.output[0]] if mul is not None else []
        cap2 = g.const(other[0]) if len(other) == 1 else None
        v = self.values.get(x)
        if (cap is None or cap2 is None or cap.size != 1 or cap2.size != 1
                or float(cap.reshape(-1)[0]) != float(cap2.reshape(-1)[0])
                or not float(cap.reshape(-1)[0]) > 0 or v is None or v.dtype != "float32"):
            raise UnsupportedGraph(f"Div node {node.name!r}: only a soft-cap of the fp32 "
                                   "logits, cap * tanh(x / cap) (Gemma 2), is lowered")
        out = self._arena(mul.output[0], list(v.shape), "float32")
        self._emit("softcap", node, [x], [out], cap=float(cap.reshape(-1)[0]))
        self.ops[-1].node += f" + {tanh.name} + {mul.name}"
        self.done.update({id(tanh), id(mul)})

    def _op_Cast(self, node) -> None:
        x = node.input[0]
        if _attr(node, "to") != _ONNX_FLOAT or self.values.get(x) is None:
            raise UnsupportedGraph(f"Cast node {node.name!r}: only a cast of the logits to "
                                   "float32 is lowered")
        out = self._arena(node.output[0], list(self.values[x].shape), "float32")
        self._emit("cast_f32", node, [x], [out])

    def _op_FusedSwiGLU(self, node) -> None:
        self._gated(node, "swiglu")

    def _op_SwiGLU(self, node) -> None:
        """silu(gate) * up of two GEMM outputs the gate_up_gemm pass left apart (Qwen2-MoE's
        shared expert: its x feeds four GEMMs, so the sibling pass declines)."""
        gate, up = node.input
        vg, vu = self.values.get(gate), self.values.get(up)
        if vg is None or vu is None or vg.shape != vu.shape or len(vg.shape) != 2:
            raise UnsupportedGraph(f"SwiGLU node {node.name!r}: only gate and up of one "
                                   "shape [rows, I] are lowered")
        out = self._arena(node.output[0], list(vg.shape))
        self._emit("swiglu2", node, [gate, up], [out], inter=vg.shape[1])

    def _op_FusedGeGLU(self, node) -> None:
        if _attr(node, "approximate", "tanh") != "tanh":
            raise UnsupportedGraph(f"FusedGeGLU node {node.name!r}: the kernel has the tanh "
                                   "form only")
        self._gated(node, "geglu")

    def _gated(self, node, act: str) -> None:
        gu = node.input[0]
        rows, two_i = self.values[gu].shape
        out = self._arena(node.output[0], [rows, two_i // 2])
        gemm = self.ops[-1] if self.ops else None
        if (gemm is not None and gemm.op == "gemm" and gemm.outputs == [gu]
                and gemm.attrs["trans_b"] and gemm.inputs[2] is None
                and len(self.g.consumers.get(gu, [])) == 1):
            # The gate-up GEMM and its activation are one op: a decode step runs them as one
            # GEMV with the activation fused; larger steps run cuBLASLt, then the kernel.
            gemm.outputs.append(out)
            gemm.attrs.update(act=act, inter=two_i // 2)
            gemm.node += f" + {node.name}"
            self.done.add(id(node))
            return
        self._emit(act, node, [gu], [out], inter=two_i // 2)

    def _op_Reshape(self, node) -> None:
        src = self.values[node.input[0]]
        shape = self.g.const(node.input[1])
        if shape is None:
            raise UnsupportedGraph(f"Reshape node {node.name!r} has a computed shape")
        rows = src.shape[0]
        tail = [int(d) for d in shape[1:]]
        if -1 in tail:   # one inferred dim: what the fixed ones leave of a row
            row = numel(src.shape[1:], 1, 1)
            known = int(np.prod([d for d in tail if d != -1]))
            tail[tail.index(-1)] = row // known
        self._view(node.output[0], node.input[0], [rows, *tail])
        self.done.add(id(node))

    def _op_Identity(self, node) -> None:
        if contract.is_kv_output(node.output[0]):
            self.done.add(id(node))   # the pool was written in place by rope_cache
            return
        self._view(node.output[0], node.input[0], list(self.values[node.input[0]].shape))
        self.done.add(id(node))

    # --- mixtures of experts (model_zoo/layers.py routed_experts) ----------------------------

    def _claim_moe(self, topk) -> dict:
        """Match the routed-experts subgraph around a TopK node and claim its nodes:

            logits -> Cast(f32) -> Softmax -> TopK(k) [-> Div(top, ReduceSum(top))]
                   -> ScatterElements(ConstantOfShape(Shape(probs)), chosen, top) [T, E]
                   -> Transpose -> Unsqueeze ------------------------------------.
            x -> MatMul(gate_up [E, H, 2I]) -> FusedSwiGLU -> MatMul(down [E, I, H])
                   (each stack as it is, or DequantizeLinear(E4M3 [E, K, N], scale
                    [E, K / B, N], axis 1, block_size B): --quant fp8-block)
                   -> Cast(f32) -> Mul(., weights) -> ReduceSum(axis 0) -> Cast(dtype)
              [-> Add(., Mul(Sigmoid(shared gate [T, 1]), shared expert [T, H]))]

        The router's GEMM (logits = x @ W) and the shared expert's GEMMs stay ordinary ops;
        the rest becomes the moe op, emitted at the last node (the Cast or the shared Add)."""
        g = self.g

        def fail(why: str):
            raise UnsupportedGraph(
                f"the graph routes tokens to experts (TopK node {topk.name!r}: a mixture-of-"
                f"experts layer) in a form the cuda backend's MoE kernels do not take: {why} "
                "(the form model_zoo/layers.py routed_experts builds, after the swiglu and "
                "gated_split passes); build with --backend tensorrt-rtx or reference")

        def one(value: str, op_type: str, users: bool = True):
            """The only consumer (users) or the producer of value, of op_type."""
            nodes = g.consumers.get(value, []) if users else [g.producer.get(value)]
            if len(nodes) != 1 or nodes[0] is None or nodes[0].op_type != op_type:
                found = [n.op_type for n in nodes if n is not None] or ["a graph input"]
                fail(f"{value!r} should {'go to' if users else 'come from'} one {op_type}, "
                     f"not {found}")
            return nodes[0]

        def axes(node, at: int = 1):
            c = g.const(node.input[at]) if len(node.input) > at and node.input[at] else None
            return None if c is None else [int(v) for v in np.asarray(c).reshape(-1)]

        softmax = one(topk.input[0], "Softmax", users=False)
        cast_in = one(softmax.input[0], "Cast", users=False)
        logits = cast_in.input[0]
        k = axes(topk)
        if (k is None or len(k) != 1 or _attr(softmax, "axis", -1) not in (-1, 1)
                or _attr(cast_in, "to") != _ONNX_FLOAT or _attr(topk, "axis", -1) not in (-1, 1)
                or _attr(topk, "largest", 1) != 1 or _attr(topk, "sorted", 1) != 1):
            fail("the top-k of a softmax over the last axis of the fp32 logits")
        top, chosen = topk.output
        scatter = one(chosen, "ScatterElements")
        nodes = [cast_in, softmax, topk, scatter]
        renormalise = scatter.input[2] != top
        if renormalise:
            div = one(scatter.input[2], "Div", users=False)
            rsum = g.producer.get(div.input[1])
            if (div.input[0] != top or rsum is None or rsum.op_type != "ReduceSum"
                    or rsum.input[0] != top or axes(rsum) not in ([-1], [1])
                    or _attr(rsum, "keepdims", 1) != 1):
                fail("top-k weights other than top or top / ReduceSum(top)")
            nodes += [div, rsum]
        base = one(scatter.input[0], "ConstantOfShape", users=False)
        shape = one(base.input[0], "Shape", users=False)
        fill = next((a.t for a in base.attribute if a.name == "value"), None)
        if (shape.input[0] != softmax.output[0] or _attr(scatter, "axis", 0) not in (1, -1)
                or scatter.input[1] != chosen or (fill is not None and np.any(
                    g._np.to_array(fill)))):
            fail("the weights scattered into zeros of the probabilities' shape")
        nodes += [base, shape]
        transpose = one(scatter.output[0], "Transpose")
        unsqueeze = one(transpose.output[0], "Unsqueeze")
        mul = one(unsqueeze.output[0], "Mul")
        if _attr(transpose, "perm") != [1, 0] or axes(unsqueeze) != [2]:
            fail("the [T, E] weights as [E, T, 1]")
        y32 = next(i for i in mul.input if i != unsqueeze.output[0])
        cast_y = one(y32, "Cast", users=False)
        down_mm = one(cast_y.input[0], "MatMul", users=False)
        swiglu = one(down_mm.input[0], "FusedSwiGLU", users=False)
        gu_mm = one(swiglu.input[0], "MatMul", users=False)
        reduce = one(mul.output[0], "ReduceSum")
        end = one(reduce.output[0], "Cast")
        if (_attr(cast_y, "to") != _ONNX_FLOAT or axes(reduce) != [0]
                or _attr(reduce, "keepdims", 1) != 0):
            fail("the experts' fp32 outputs times their weights, summed over the experts")
        x = gu_mm.input[0]
        router = g.producer.get(logits)
        if router is None or router.op_type != "MatMul" or router.input[0] != x:
            fail("the router's logits are not a GEMM of the experts' input")

        def stack(mm) -> tuple[str, str | None, int]:
            """(the stacked weight, its block scales or None, the block) a GEMM reads."""
            dq = g.producer.get(mm.input[1])
            if dq is None or dq.op_type != "DequantizeLinear":
                return mm.input[1], None, 0
            q, scale = dq.input[0], dq.input[1] if len(dq.input) > 1 else ""
            t, st = g.weight(q), g.weight(scale)
            block = int(_attr(dq, "block_size", 0))
            if (t is None or st is None or _DTYPE_OF.get(t.data_type) != FP8
                    or len(t.dims) != 3 or _attr(dq, "axis", 1) != 1
                    or (len(dq.input) > 2 and dq.input[2])
                    or not _fp8b_block_fits(block, t.dims[1])
                    or list(st.dims) != [t.dims[0], t.dims[1] // block, t.dims[2]]):
                fail(f"the experts' weights {mm.input[1]!r} are dequantized other than from "
                     "E4M3 with a scale a block of a power of two from "
                     f"{lr.FP8B_MIN_GROUP} k (--quant fp8-block)")
            nodes.append(dq)
            return q, scale, block

        (gu_w, gu_s, gu_b), (down_w, down_s, down_b) = stack(gu_mm), stack(down_mm)
        gu_t, down_t = g.weight(gu_w), g.weight(down_w)
        if gu_t is None or down_t is None or len(gu_t.dims) != 3 or len(down_t.dims) != 3:
            fail("the experts' weights are not stacked [E, in, out] weights")
        experts, hidden, two_i = (int(d) for d in gu_t.dims)
        inter = two_i // 2
        if list(down_t.dims) != [experts, inter, hidden]:
            fail(f"down weights {list(down_t.dims)} do not match gate-up {list(gu_t.dims)}")
        nodes += [transpose, unsqueeze, mul, cast_y, down_mm, swiglu, gu_mm, reduce, end]
        for w in (gu_mm.input[1], down_mm.input[1], gu_w, down_w):
            if len(g.consumers.get(w, [])) != 1:
                fail(f"the expert weight {w!r} is read by more than its GEMM")
        site = dict(topk=topk, router_out=logits, x=x, gate_up=gu_w, down=down_w,
                    gate_up_scale=gu_s, down_scale=down_s, gate_up_group=gu_b,
                    down_group=down_b, experts=experts, hidden=hidden, inter=inter,
                    top_k=k[0], renormalise=renormalise, gate=None, shared=None, anchor=end)
        # Qwen2-MoE: routed + sigmoid(shared gate) * shared expert, as the combine's epilogue
        users = g.consumers.get(end.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add":
            add = users[0]
            other = g.producer.get(next((i for i in add.input if i != end.output[0]), ""))
            sig = None
            if other is not None and other.op_type == "Mul":
                sig = next((g.producer[i] for i in other.input if i in g.producer
                            and g.producer[i].op_type == "Sigmoid"), None)
            if sig is not None and len(g.consumers[sig.output[0]]) == 1 \
                    and len(g.consumers[other.output[0]]) == 1:
                shared = next(i for i in other.input if i != sig.output[0])
                gate_mm = g.producer.get(sig.input[0])
                gate_w = g.weight(gate_mm.input[1]) if gate_mm is not None \
                    and gate_mm.op_type == "MatMul" else None
                if gate_w is not None and list(gate_w.dims) == [hidden, 1]:
                    site.update(gate=sig.input[0], shared=shared, anchor=add)
                    nodes += [sig, other, add]
        claimed = {id(n) for n in nodes}
        for n in nodes:
            for o in n.output:
                stray = [c.name for c in g.consumers.get(o, []) if id(c) not in claimed]
                if stray and n is not site["anchor"]:
                    fail(f"{o!r} is also read by {stray}")
        self.done.update(claimed)
        return site

    def _moe(self, site: dict) -> None:
        """The moe op: routing, the grouped gate-up (SwiGLU fused) and down GEMMs over the
        routed rows, the weighted combine [+ the gated shared expert] (kernels/moe.cu). The
        experts' weights are stored [E, out, in] (rewrite_weights), each expert as a GEMV
        reads a linear weight."""
        e, h, i, k = (site[a] for a in ("experts", "hidden", "inter", "top_k"))
        try:
            lr.moe_check(e, k, h, i)
        except ValueError as err:
            raise UnsupportedGraph(f"TopK node {site['topk'].name!r}: {err}") from None
        for name, scale in ((site["gate_up"], site["gate_up_scale"]),
                            (site["down"], site["down_scale"])):
            want = self.dtype if scale is None else FP8
            if _DTYPE_OF.get(self.g.weight(name).data_type) != want or (
                    scale is not None and
                    _DTYPE_OF.get(self.g.weight(scale).data_type) != self.dtype):
                raise UnsupportedGraph(f"the expert weights {name!r} are not {want}" + (
                    f" with {self.dtype} scales" if scale is not None else ""))
        x, logits = site["x"], site["router_out"]
        for v in (x, logits, site["gate"], site["shared"]):
            if v is not None and (v not in self.values or self.values[v].shape[0] != "T"):
                raise UnsupportedGraph(f"the MoE layer of {site['topk'].name!r} reads {v!r}, "
                                       "which is not a per-token value lowered before it")
        gate_up = self._weight(site["gate_up"], shape=[e, 2 * i, h])
        down = self._weight(site["down"], shape=[e, h, i])
        # block-wise FP8 experts: + their scales, [E, K / B, N] as the graph holds them (inputs
        # 6 and 7, None for a 16-bit stack; a 16-bit layer's op has none)
        scales = [None if site[f"{w}_scale"] is None else self._weight(site[f"{w}_scale"])
                  for w in ("gate_up", "down")]
        scales = scales if any(s is not None for s in scales) else []
        anchor = site["anchor"]
        p = f"{site['topk'].name}/moe"
        out = self._arena(anchor.output[0], ["T", h])
        scratch = [self._arena(f"{p}/ids", ["T", k], "int32"),
                   self._arena(f"{p}/weights", ["T", k], "float32"),
                   self._arena(f"{p}/pos_of", ["T", k], "int32"),
                   self._arena(f"{p}/perm", ["T", k], "int32"),
                   self._arena(f"{p}/meta", ["T", lr.moe_meta_ints(e, k)], "int32"),
                   self._arena(f"{p}/act", ["T", k * i]),
                   self._arena(f"{p}/y", ["T", k * h])]
        node = f"{site['topk'].name} .. {anchor.name} (top {k} of {e} experts" + \
            (", shared expert)" if site["shared"] else ")")
        fp8b = {f"{w}_group": site[f"{w}_group"] for w in ("gate_up", "down")
                if site[f"{w}_scale"] is not None}
        self.ops.append(Op("moe", [logits, x, gate_up, down, site["gate"], site["shared"],
                                   *scales],
                           [out, *scratch],
                           dict(experts=e, top_k=k, hidden=h, inter=i,
                                renormalise=bool(site["renormalise"]), transposed=True,
                                **fp8b), node))

    def _claim_attention_chain(self, node) -> None:
        """Mark the nodes between the QKV GEMM and PagedAttention, and the RoPE angle chain
        feeding them, as taken by the rope_cache op."""
        g = self.g
        q, k, v, _ = self._attention_inputs(node)
        sides = [self._rope_side(q), self._rope_side(k)]
        if (sides[0][2] is None) != (sides[1][2] is None):
            raise UnsupportedGraph(f"PagedAttention node {node.name!r}: RoPE on one of q and "
                                   "k only; the rope kernel rotates both or neither")
        for reshape, split, rope, norm in sides:
            self.done.update(id(n) for n in (reshape, norm) if n)
            if rope is None:    # learned positions (GPT-2): q/k/v only split and cached
                continue
            squeeze, unsqueeze = g.consumers[rope.output[0]][0], g.producer[rope.input[0]]
            self.done.update({id(rope), id(squeeze), id(unsqueeze)})
            for angles in rope.input[1:]:
                self.done.update(id(n) for n in _angle_chain(g, angles))
        v_reshape = g.only(v, "Reshape")
        split = g.only(v_reshape.input[0], "Split")
        self.done.update({id(split), id(v_reshape)})
        bias_add = self._bias_add(split.input[0])
        if bias_add is not None:
            self.done.add(id(bias_add))

    def _bias_add(self, value: str):
        """The Add of a weight (a linear's bias) that makes value, or None (an INT4 zero-point
        GEMM's sum adds two activations)."""
        add = self.g.producer.get(value)
        if add is None or add.op_type != "Add" or \
                not any(self.g.weight(i) is not None for i in add.input):
            return None
        return add

    def _op_PagedAttention(self, node) -> None:
        """The attention block: from the q/k/v GEMM to the attention output."""
        g = self.g
        q, k, v, cache = self._attention_inputs(node)
        layer = contract.kv_layer(cache)
        if layer is None:
            raise UnsupportedGraph(f"PagedAttention node {node.name!r} reads {cache!r}, "
                                   "not a KV pool input")
        chain = [self._rope_side(q), self._rope_side(k)]
        v_reshape = g.only(v, "Reshape")
        split = g.only(v_reshape.input[0], "Split")
        if any(c[1] is not split for c in chain) or list(split.output) != [
                chain[0][0].input[0], chain[1][0].input[0], v_reshape.input[0]]:
            raise UnsupportedGraph(f"PagedAttention node {node.name!r}: q, k and v do not "
                                   "come from one fused QKV GEMM")
        qkv, bias = split.input[0], None
        producer = self._bias_add(qkv)
        if producer is not None:
            mm_out = next(i for i in producer.input if g.weight(i) is None)
            bias = self._weight(next(i for i in producer.input if i != mm_out))
            qkv = mm_out
        if qkv not in self.values:
            raise UnsupportedGraph(f"the QKV GEMM of {node.name!r} was not lowered before it")
        # no RoPE (learned positions): rot 0, no table; the kernel splits q/k/v, caches K/V
        inv_freq = self._inv_freq(chain[0][2]) if chain[0][2] is not None else []
        hq, hkv, d = (int(_attr(node, a)) for a in ("num_heads", "num_kv_heads", "head_dim"))
        names = [f"{node.name}/{x}" for x in ("q", "k", "v")]
        q_out = self._arena(names[0], ["T", hq, d])
        k_out = self._arena(names[1], ["T", hkv, d])
        v_out = self._arena(names[2], ["T", hkv, d])
        freq = f"{node.name}/inv_freq" if len(inv_freq) else None
        if freq is not None:
            self.values[freq] = Value("const", "float32", [len(inv_freq)],
                                      data=[float(x) for x in inv_freq])
        norm_weights, norm_attrs = self._qk_norm(node, chain[0][3], chain[1][3], d)
        # an FP8 pool: both kernels take the layer's (K, V) scales
        pool = {"kv_scale": self.e4m3[id(node)]["scales"]} if id(node) in self.e4m3 else {}
        self._emit("rope_cache", node, [qkv, bias, contract.POSITION_IDS, freq,
                                        contract.SEQ_STARTS, contract.BLOCK_TABLES,
                                        *norm_weights],
                   [q_out, k_out, v_out], hq=hq, hkv=hkv, d=d, rot=2 * len(inv_freq),
                   layer=layer, block_size=int(_attr(node, "block_size")), **norm_attrs,
                   **pool)
        self.ops[-1].node = f"{node.name} ({'RoPE, ' if freq else ''}K/V cache write)"
        out = self._arena(node.output[0], ["T", hq, d])
        self.ops.append(Op("attention", [q_out, contract.SEQ_STARTS, contract.CONTEXT_LENS,
                                         contract.BLOCK_TABLES], [out],
                           dict(hq=hq, hkv=hkv, d=d, layer=layer,
                                block_size=int(_attr(node, "block_size")),
                                scale=float(_attr(node, "scale")),
                                window=int(_attr(node, "sliding_window", 0)),
                                softcap=float(_attr(node, "softcap", 0.0)), **pool), node.name))
        self.done.add(id(node))

    def _attention_inputs(self, node) -> tuple[str, str, str, str]:
        """q, k, v and the pool input of a PagedAttention node; over an FP8 pool, k and v
        before the Q/DQ round trip that _claim_e4m3_pool took."""
        q, k, v, cache = node.input[:4]
        site = self.e4m3.get(id(node))
        return (q, site["k"], site["v"], site["pool"]) if site else (q, k, v, cache)

    def _claim_e4m3_pool(self, node) -> None:
        """A PagedAttention over an FP8 pool, as quantization/kv.py writes it (s = [s_k, s_v]
        on axis 0, zero points 0):

            rows = Concat(Unsqueeze(k), Unsqueeze(v))
            kv_rows_out_l = QuantizeLinear(rows, s)
            k', v' = Gather(DequantizeLinear(kv_rows_out_l, s), 0 | 1)
            PagedAttention(q, k', v', DequantizeLinear(kv_cache_l, s), ...)

        Its Q/DQ nodes become attributes: the rope kernel writes the E4M3 bytes of k / s_k and
        v / s_v into the pool, and attention reads every key, this step's too, back from it
        times the scales. That is the graph's one rounding, so the rows output (which the
        reference session writes into its pool) is not needed here."""
        g = self.g
        pool_dq = g.producer.get(node.input[3])
        if pool_dq is None or pool_dq.op_type != "DequantizeLinear":
            return
        pool = pool_dq.input[0]
        layer = contract.kv_layer(pool)
        bad = f"PagedAttention node {node.name!r} reads an FP8 pool in a form other than " \
              "quantization/kv.py's"
        k_side, v_side = (g.producer.get(x) for x in node.input[1:3])
        if layer is None or pool != contract.kv_cache_input(layer) or any(
                x is None or x.op_type != "Gather" or _attr(x, "axis", 0) != 0
                for x in (k_side, v_side)):
            raise UnsupportedGraph(bad)
        rows_dq = g.producer.get(k_side.input[0])
        sides = [g.const(x.input[1]) for x in (k_side, v_side)]
        if v_side.input[0] != k_side.input[0] or rows_dq is None or \
                rows_dq.op_type != "DequantizeLinear" or any(
                    x is None or x.size != 1 for x in sides) or \
                [int(x.reshape(-1)[0]) for x in sides] != [0, 1]:
            raise UnsupportedGraph(bad)
        quant = g.producer.get(rows_dq.input[0])
        if quant is None or quant.op_type != "QuantizeLinear" or \
                rows_dq.input[0] != contract.kv_rows_output(layer):
            raise UnsupportedGraph(bad)
        concat = g.producer.get(quant.input[0])
        unsq = [g.producer.get(x) for x in concat.input] if concat is not None and \
            concat.op_type == "Concat" and _attr(concat, "axis") == 0 else []
        if len(unsq) != 2 or any(u is None or u.op_type != "Unsqueeze" or g.const(u.input[1])
                                 is None or list(g.const(u.input[1]).reshape(-1)) != [0]
                                 for u in unsq):
            raise UnsupportedGraph(bad)
        scales = self._kv_scales(node, (quant, rows_dq, pool_dq))
        if self.arch not in lr.E4M3_ARCHS:
            raise UnsupportedGraph(f"an FP8 KV cache needs {lr.E4M3_NEEDS}, not {self.arch}; "
                                   "build with --kv-cache-dtype auto")
        self.e4m3[id(node)] = dict(k=unsq[0].input[0], v=unsq[1].input[0], pool=pool,
                                   scales=scales)
        self.done.update(id(n) for n in (pool_dq, k_side, v_side, rows_dq, quant, concat, *unsq))

    def _kv_scales(self, node, qdq) -> list[float]:
        """The one [s_k, s_v] on axis 0, zero points 0, that an FP8 pool's Q/DQ nodes share."""
        g, seen = self.g, set()
        for n in qdq:
            s = g.const(n.input[1])
            zero = g.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if s is None or s.shape != (2,) or _attr(n, "axis", 1) != 0 or \
                    (zero is not None and np.asarray(zero, np.float32).any()):
                raise UnsupportedGraph(f"{n.name!r}: an FP8 pool's Q/DQ take one K and one V "
                                       "scale on axis 0 and zero points 0")
            seen.add(tuple(float(x) for x in np.asarray(s, np.float32)))
        if len(seen) != 1:
            raise UnsupportedGraph(f"PagedAttention node {node.name!r}: the Q/DQ of its FP8 "
                                   "pool disagree on the scales")
        return list(seen.pop())

    def _rope_side(self, value: str):
        """q or k: Squeeze(RotaryEmbedding(Unsqueeze([RMSNorm](Reshape(Split[i]))))), or
        Reshape(Split[i]) in a model without RoPE (GPT-2's learned positions): (reshape,
        split, rope or None, norm or None)."""
        g = self.g
        reshape = g.producer.get(value)
        if reshape is not None and reshape.op_type == "Reshape":
            return reshape, g.only(reshape.input[0], "Split"), None, None
        squeeze = g.only(value, "Squeeze")
        rope = g.only(squeeze.input[0], "RotaryEmbedding")
        if _attr(rope, "interleaved", 0):
            raise UnsupportedGraph(f"{rope.name!r}: interleaved RoPE is not lowered yet")
        unsqueeze = g.only(rope.input[0], "Unsqueeze")
        norm = g.producer.get(unsqueeze.input[0])
        if norm is None or norm.op_type != "RMSNormalization":
            norm = None     # a per-head q/k norm (Qwen3, Gemma 3) sits here if anywhere
        reshape = g.only(norm.input[0] if norm else unsqueeze.input[0], "Reshape")
        split = g.only(reshape.input[0], "Split")
        return reshape, split, rope, norm

    def _qk_norm(self, node, q_norm, k_norm, d: int) -> tuple[list, dict]:
        """The per-head RMSNorms of q and k before RoPE, folded into rope_cache: their two
        weights (inputs) and the epsilon (attribute); nothing when the model has none."""
        if q_norm is None and k_norm is None:
            return [], {}
        if q_norm is None or k_norm is None:
            raise UnsupportedGraph(f"PagedAttention node {node.name!r}: an RMSNorm before "
                                   "RoPE on one of q and k only; the rope kernel norms both")
        eps = {float(_attr(n, "epsilon", 1e-5)) for n in (q_norm, k_norm)}
        for n in (q_norm, k_norm):
            t = self.g.weight(n.input[1])
            if (len(n.input) > 2 and n.input[2]) or t is None or list(t.dims) != [d] \
                    or _attr(n, "axis", -1) not in (-1, 2) or len(eps) != 1:
                raise UnsupportedGraph(f"RMSNormalization node {n.name!r} before RoPE is not a "
                                       f"per-head norm over head_dim {d} with one weight and "
                                       "the same epsilon for q and k")
        return [self._weight(q_norm.input[1]), self._weight(k_norm.input[1])], \
            {"qk_norm_eps": eps.pop()}

    def _inv_freq(self, rope) -> np.ndarray:
        """The RoPE angles are positions x inv_freq: find that constant under cos."""
        g, todo, seen = self.g, [rope.input[1]], set()
        while todo:
            value = todo.pop()
            node = g.producer.get(value)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Mul":
                for i in node.input:
                    c = g.const(i)
                    if c is not None and c.ndim == 2 and c.shape[0] == 1 and _from_positions(
                            g, next(j for j in node.input if j != i)):
                        return c.reshape(-1).astype(np.float64)
            todo.extend(node.input)
        raise UnsupportedGraph(f"{rope.name!r}: its angles are not position_ids x a constant "
                               "inverse-frequency table")

    def _logits(self) -> str:
        if contract.LOGITS not in self.values:
            raise UnsupportedGraph("the graph's logits output was not lowered")
        v = self.values[contract.LOGITS]
        if v.dtype != "float32":
            raise UnsupportedGraph("the logits are not float32")
        return contract.LOGITS

    # --- memory ------------------------------------------------------------------------------

    def _assign_arena(self) -> int:
        """First fit over live intervals, sizes at the build limits (T = max_num_tokens,
        B = max_batch_size); a view keeps its base alive."""
        t_max, b_max = self.limits.max_num_tokens, self.limits.max_batch_size
        intervals = live_intervals(self.values, self.ops, contract.LOGITS)
        live: list[tuple[int, int, int]] = []          # (offset, size, last use)
        top = 0
        for name in sorted(intervals, key=lambda n: intervals[n][0]):
            first, last = intervals[name]
            v = self.values[name]
            size = align(numel(v.shape, t_max, b_max) * itemsize(v.dtype))
            live = [x for x in live if x[2] >= first]
            offset = 0
            for off, sz, _ in sorted(live):
                if offset + size <= off:
                    break
                offset = max(offset, off + sz)
            v.offset = offset
            live.append((offset, size, last))
            top = max(top, offset + size)
        return align(top)


def _fp8b_block_fits(block: int, k: int) -> bool:
    """Whether the block-wise FP8 kernels take scales in blocks of `block` along a K of `k`:
    a power of two from launch_rules.FP8B_MIN_GROUP that divides K."""
    return block >= lr.FP8B_MIN_GROUP and not block & (block - 1) and k % block == 0


def _angle_chain(g: _Graph, value: str) -> list:
    """The nodes computing a RoPE cos/sin table: everything under it must depend on
    position_ids and constants alone, or the rope kernel would not compute the same."""
    nodes, todo = {}, [value]
    while todo:
        v = todo.pop()
        node = g.producer.get(v)
        if node is None:
            if v != contract.POSITION_IDS and v not in g.inits:
                raise UnsupportedGraph(f"the RoPE angles depend on {v!r}, not on position_ids "
                                       "alone")
            continue
        if id(node) not in nodes:
            nodes[id(node)] = node
            todo.extend(node.input)
    return list(nodes.values())


def _from_positions(g: _Graph, value: str) -> bool:
    node = g.producer.get(value)
    while node is not None and node.op_type in ("Cast", "Unsqueeze"):
        if node.input[0] == contract.POSITION_IDS:
            return True
        node = g.producer.get(node.input[0])
    return False


def rewrite_weights(weights: Path, plan: Plan) -> int:
    """Rewrite, in place in the build's weights file, every GEMM weight the plan reads as
    [N, K] from the [K, N] the graph holds it in (op attr `transposed`): 16-bit and FP8
    weights and INT4 scales transposed, INT4 weights packed for the kernels (pack_int4), INT4
    offsets turned into zero points (zero_points); and append the fp32 FP8 channel scales
    (x_scale * w_scale[n]). Returns the bytes written."""
    jobs: dict[str, str] = {}
    zeros: dict[str, str] = {}     # zero points -> their scales
    appended: dict[str, tuple[str, float]] = {}
    fp8_scales: list[str] = []
    for op in plan.ops:
        if op.op == "moe":     # stacked experts: each [in, out] -> [out, in]
            jobs[op.inputs[2]] = jobs[op.inputs[3]] = "experts"
            fp8_scales += [s for s in op.inputs[6:] if s is not None]   # kept [E, K / B, N]
            continue
        if op.op != "gemm" or not op.attrs.get("transposed"):
            continue
        quant = op.attrs.get("quant")
        jobs[op.inputs[1]] = "int4" if quant == "int4" else "transpose"
        if quant == "fp8-block":
            jobs[op.inputs[3]] = "transpose"
            fp8_scales.append(op.inputs[3])
        if quant == "int4":
            jobs[op.inputs[3]] = "transpose"
            if zp := int4_block_offsets(op):
                if op.attrs.get("offsets"):
                    jobs[zp] = "transpose"
                else:
                    zeros[zp] = op.inputs[3]
        elif quant == "fp8":
            appended[op.inputs[3]] = (op.attrs["scale_from"], op.attrs["x_scale"])
    if not jobs:
        return 0
    data = np.memmap(weights, dtype=np.uint8, mode="r+")
    for name in fp8_scales:   # the kernels multiply by scale * 2^120 in bf16 (qgemv_fp8b.cu)
        v = plan.values[name]
        size = numel(v.shape, 1, 1) * itemsize(v.dtype)
        top = float(np.abs(data[v.offset:v.offset + size].view(np_dtype(v.dtype)).astype(
            np.float32)).max())
        if not top < lr.FP8B_MAX_SCALE:
            raise UnsupportedGraph(f"{name}: a block-wise FP8 scale of {top:g}; the cuda "
                                   f"kernels take scales below {lr.FP8B_MAX_SCALE:g} (weights "
                                   f"below {lr.FP8B_MAX_SCALE * 448:g})")
    done = 0
    for name, scale in sorted(zeros.items()):    # before the scales are transposed
        offsets, scales = (_block_graph_layout(data, plan, v) for v in (name, scale))
        z = zero_points(offsets, scales, name)
        data[plan.values[name].offset:][:z.size] = z.reshape(-1)
        done += z.size
    for name in sorted(jobs):
        v = plan.values[name]
        *stack, rows, cols = v.shape
        size = int(np.prod(stack, dtype=np.int64)) * rows * cols * itemsize(v.dtype)
        block = data[v.offset:v.offset + size]
        if jobs[name] == "int4":
            block[:] = pack_int4(block, rows, 2 * cols)
        else:   # one matrix at a time: an expert stack is never copied whole
            words = block.view(f"u{itemsize(v.dtype)}").reshape(-1, rows * cols)
            for word in words:
                word[:] = transposed(word.reshape(cols, rows)).reshape(-1)
        done += size
    tail = {}
    for name, (src, x_scale) in appended.items():
        s = plan.values[src]
        raw = data[s.offset:s.offset + 2 * s.shape[0]].view(np_dtype(s.dtype))
        tail[name] = raw.astype(np.float32) * np.float32(x_scale)
    data.flush()
    del data
    if tail:
        with open(weights, "r+b") as f:
            for name, values in tail.items():
                f.seek(plan.values[name].offset)
                f.write(values.tobytes())
                done += values.nbytes
            f.truncate(max(f.seek(0, 2), plan.weights_bytes))
    return done


def _block_graph_layout(data: np.ndarray, plan: Plan, name: str) -> np.ndarray:
    """An INT4 or block-wise FP8 GEMM's scales (or INT4 offsets) as the graph stores them,
    [K / B, N] in the dtype."""
    v = plan.values[name]
    n, groups = v.shape
    block = data[v.offset:v.offset + n * groups * itemsize(plan.dtype)]
    return block.view(np_dtype(plan.dtype)).reshape(groups, n)


def zero_points(offsets: np.ndarray, scales: np.ndarray, what: str = "") -> np.ndarray:
    """The zero points z [N, K / B] (uint8) of INT4 offsets (8 - z) s [K / B, N] (qdq.py's
    form of a zero-point checkpoint, quantization/prequantized.py) and their scales s: the
    kernels compute (u - z) s, exactly the checkpoint's W. The offsets and scales are 16-bit,
    so 8 - o / s lands within 2^-8 * 8 of an integer; anything farther (a format whose zero
    points are not integers) is an error, as is z outside 0..16."""
    o, s = offsets.astype(np.float32), scales.astype(np.float32)
    ratio = np.divide(o, s, out=np.zeros_like(o), where=s != 0)
    z = np.rint(8 - ratio)
    bad = (np.abs(8 - ratio - z) > 1 / 16) | (z < 0) | (z > 16) | ((s == 0) & (o != 0))
    if bad.any():
        i = np.argwhere(bad)[0]
        raise UnsupportedGraph(
            f"{what}: INT4 offset {o[tuple(i)]:g} with scale {s[tuple(i)]:g} is not (8 - z) * "
            "scale for an integer zero point z in 0..16; the cuda kernels take integer zero "
            "points only (build with --quant int4-rtn to quantize the weights again)")
    return np.ascontiguousarray(z.T).astype(np.uint8)


def pack_int4(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """ONNX's INT4 [K, N] (two's complement, element i in byte i / 2, low nibble first) ->
    the kernels' [N, K / 2]: row-major over [N, K], each 32-bit word 8 consecutive k as
    unsigned nibbles q + 8, in the order k0 k2 k4 k6 k1 k3 k5 k7 (kernels/qgemv.cu says why)."""
    nib = np.empty(2 * packed.size, np.uint8)
    nib[0::2], nib[1::2] = packed & 0xF, packed >> 4
    u = nib[:n * k].reshape(k, n).T ^ 8                           # [N, K]: q + 8
    order = u.reshape(n, k // 8, 8)[:, :, [0, 2, 4, 6, 1, 3, 5, 7]]
    return (order[..., 0::2] | (order[..., 1::2] << 4)).reshape(-1)


def lower(onnx_path: Path, limits: BuildLimits, arch: str) -> Plan:
    """The plan of a fused graph saved by `llmc.graph.save_onnx`."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    plan = Lowering(model, limits, arch).run()
    check_plan(plan)
    check_launches(plan, limits)
    return plan


def check_launches(plan: Plan, limits: BuildLimits) -> None:
    """Evaluate every launch rule at the corners of the limits (a decode step of one and of
    a full batch, a full prefill chunk, narrow and full block tables) with made-up pointers:
    a shape a kernel cannot take is a build error, not a failure at run time."""
    from llmc.backends.cuda.program import Step, launches
    from llmc.devices import max_smem_for_capability

    digits = plan.arch[3:].rstrip("a")
    major, minor = int(digits[:-1]), int(digits[-1])
    smem = max_smem_for_capability(major, minor)
    b_max, t_max, w_max = limits.max_batch_size, limits.max_num_tokens, limits.max_blocks_per_seq
    for t, b, w in {(1, 1, 1), (b_max, b_max, w_max), (t_max, b_max, w_max), (t_max, 1, 1)}:
        step = Step(t, b, w, limits.max_num_blocks + 1, sm_count=132, max_smem=smem,
                    w4_sm90=plan.arch == "sm_90a", moe_sm90=plan.arch == "sm_90a",
                    moe_grid_route=True, moe_fp8b_wide=plan.arch == "sm_90a")
        try:
            for _ in launches(plan, step, lambda name: 1 << 20):
                pass
        except ValueError as e:
            raise UnsupportedGraph(f"the cuda kernels cannot run this model: {e}") from None


def check_plan(plan: Plan) -> None:
    """Every value an op reads is produced earlier (or is a weight, an input or a const)."""
    ready = {n for n, v in plan.values.items() if v.where in ("weight", "input", "const")}
    for op in plan.ops:
        for name in op.inputs:
            if name is not None and name not in ready and plan.storage(name) not in ready:
                raise UnsupportedGraph(f"op {op.op} ({op.node}) reads {name!r} before it is "
                                       "computed")
        ready.update(op.outputs)
    assert ALIGN % 16 == 0
