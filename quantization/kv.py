"""FP8 KV cache (``--kv-cache-dtype fp8``, docs/quantization.md): each layer's pool is stored in
E4M3 with one scale for K and one for V (the calibrated |max| / 448 times the step of
numerics.FP8_SCALE_STEPS that rounds the calibration's K or V best), and the graph is rewritten
to read that pool and to hand back the step's new rows already quantized.

Per layer, around the attention (the fused PagedAttention node, or the unfused ScatterND
when the paged_attention pass is off), with s = [s_k, s_v] on axis 0:

    rows   = Concat(Unsqueeze(k), Unsqueeze(v))                 [2, T, Hkv, D], compute dtype
    rows_q = QuantizeLinear(rows, s, axis=0)                    -> graph output kv_rows_out_l
    k', v' = DequantizeLinear(rows_q, s, axis=0)[0 | 1]          what the pool will hold
    pool   = DequantizeLinear(kv_cache_l (float8e4m3fn), s, axis=0)
    out    = PagedAttention(q, k', v', pool, ...)               its updated pool is unused

ScatterND and Gather take no float8 (ONNX, TensorRT), so no graph can write an FP8 pool: the
quantized rows leave the graph and the session writes their bytes into its pool. The rows
are quantized in the graph, not by the session, so the bytes stored are exactly the ones the
attention of this step read back through DequantizeLinear (one rounding, by one
implementation): a step reads the same values whether a key was written this step or before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper

from llmc import contract
from llmc.dtypes import np_dtype
from llmc.graph import Weight
from llmc.passes.ir import LLMC_DOMAIN, Graph, remove_dead_nodes
from llmc.quantization.numerics import fp8_activation_amax, fp8_activation_scale

FP8 = "float8e4m3fn"
KV_DTYPES = ("auto", "fp8")   # auto: the pool in the compute dtype


@dataclass(frozen=True)
class KvSite:
    """Where layer ``layer`` writes its pool: ``node`` (PagedAttention or ScatterND) reads the
    pool and the new rows, either k and v apart or already stacked as ``rows``."""

    layer: int
    node: NodeProto
    k: str | None = None
    v: str | None = None
    rows: str | None = None

    @property
    def observed(self) -> list[str]:
        """The values calibration reads to find the layer's K and V |max|."""
        return [self.rows] if self.rows else [self.k, self.v]


def kv_sites(model: onnx.ModelProto, weights: list[Weight]) -> list[KvSite]:
    """Each layer's pool writer; an error names a layer whose pool is used any other way."""
    g = Graph(model, weights)
    out = []
    for name in g.inputs:
        layer = contract.kv_layer(name)
        if layer is None:
            continue
        users = g.consumers(name)
        node = users[0] if len(users) == 1 else None
        if node is not None and node.op_type == "PagedAttention" and node.domain == LLMC_DOMAIN:
            out.append(KvSite(layer, node, k=node.input[1], v=node.input[2]))
        elif node is not None and node.op_type == "ScatterND" and node.input[0] == name:
            out.append(KvSite(layer, node, rows=node.input[2]))
        else:
            raise ValueError(f"{name} is read by {[n.op_type for n in users]}, not one "
                             "PagedAttention or ScatterND: no FP8 KV rewrite for this graph")
    return sorted(out, key=lambda s: s.layer)


def kv_amax(site: KvSite, seen: dict[str, np.ndarray], dtype: str | None = None
            ) -> tuple[float, float]:
    """The layer's (K |max|, V |max|) over the calibration run's values; with ``dtype`` (the
    scales'), each the step above it whose scale rounds those values best, as FP8 GEMM
    inputs take theirs (numerics.fp8_activation_amax)."""
    if site.rows:
        k, v = seen[site.rows][0], seen[site.rows][1]
    else:
        k, v = seen[site.k], seen[site.v]
    if dtype is not None:
        return fp8_activation_amax(k, dtype), fp8_activation_amax(v, dtype)
    return (float(np.abs(k.astype(np.float32)).max()),
            float(np.abs(v.astype(np.float32)).max()))


def kv_scales(amax: list[tuple[float, float]], dtype: str) -> np.ndarray:
    """[layers, 2] scales (K, V) in the compute dtype, |max| / 448, never zero."""
    return np.array([[fp8_activation_scale(a, dtype) for a in pair] for pair in amax],
                    np_dtype(dtype))


def fp8_kv(model: onnx.ModelProto, weights: list[Weight], scales: np.ndarray,
           dtype: str) -> tuple[onnx.ModelProto, list[Weight]]:
    """The graph with FP8 pools: inputs kv_cache_l become float8e4m3fn, outputs
    kv_cache_out_l give way to kv_rows_out_l (see the module doc). ``scales`` [layers, 2]."""
    sites = kv_sites(model, weights)
    g = Graph(model, weights)
    nodes = {n.name: n for n in g.nodes.values()}
    fp8 = TensorProto.FLOAT8E4M3FN
    for site in sites:
        node = nodes[site.node.name]
        s = g.add_const(scales[site.layer].astype(np_dtype(dtype)), "kv_scale")
        zero = g.add_const(np.zeros(2, np_dtype(FP8)), "kv_zero")
        if site.rows:
            rows = site.rows
        else:
            rows = g.add("Concat", [_unsqueeze0(g, site.k), _unsqueeze0(g, site.v)], 1,
                         name="KvRows", axis=0).output[0]
        rows_out = contract.kv_rows_output(site.layer)
        g.add("QuantizeLinear", [rows, s, zero], [rows_out], name="QuantizeKv", axis=0)
        rows_dq = g.add("DequantizeLinear", [rows_out, s, zero], 1, name="DequantizeKvRows",
                        axis=0).output[0]
        pool = contract.kv_cache_input(site.layer)
        pool_dq = g.add("DequantizeLinear", [pool, s, zero], 1, name="DequantizeKvPool",
                        axis=0).output[0]
        if site.rows:
            inputs = [pool_dq, node.input[1], rows_dq]
        else:
            k, v = (g.add("Gather", [rows_dq, g.add_const(np.array(i, np.int64), "kv_side")],
                          1, name="KvSide", axis=0).output[0] for i in (0, 1))
            inputs = [node.input[0], k, v, pool_dq, *node.input[4:]]
        g.remove([node])
        g.add(node.op_type, inputs, list(node.output), name=node.name, domain=node.domain,
              **{a.name: helper.get_attribute_value(a) for a in node.attribute})
        g.inputs[pool].type.tensor_type.elem_type = fp8
        g.outputs.discard(contract.kv_cache_output(site.layer))
        g.outputs.add(rows_out)
    remove_dead_nodes(g)   # the pools' Identity outputs, now unused
    model, weights = g.commit()
    outs = [o for o in model.graph.output if contract.kv_layer(o.name) is None]
    for site in sites:
        pool = next(i for i in model.graph.input if i.name == contract.kv_cache_input(
            site.layer)).type.tensor_type.shape.dim
        heads, head_dim = pool[2].dim_value, pool[4].dim_value
        outs.append(helper.make_tensor_value_info(contract.kv_rows_output(site.layer), fp8,
                                                  [2, "num_tokens", heads, head_dim]))
    del model.graph.output[:]
    model.graph.output.extend(outs)
    return model, weights


def _unsqueeze0(g: Graph, x: str) -> str:
    return g.add("Unsqueeze", [x, g.add_const(np.array([0], np.int64), "axis0")], 1,
                 name="KvRow").output[0]
