"""The TensorRT plugins stand in for the `llmc` nodes the pass pipeline emits: same op
types, input/output counts and attribute names (TensorRT's ONNX parser hands a node to the
plugin registered under its op type, with the node's attributes as plugin fields)."""

from __future__ import annotations

import inspect

import numpy as np
import onnx
from onnx import TensorProto, helper

from llmc.graph import GraphBuilder
from llmc.model_zoo import parse_config as config_from_hf
from llmc.model_zoo.llama import build_graph
from llmc.passes import run_passes
from llmc.plugins import specs, trt_paged_attention, trt_plugin

HF = {"architectures": ["MistralForCausalLM"], "vocab_size": 64, "hidden_size": 256,
      "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "sliding_window": 32}


def _llmc_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == "llmc"]


def _geglu_graph() -> onnx.ModelProto:
    g = GraphBuilder("geglu")
    x = g.input("x", TensorProto.FLOAT16, ["n", 32])
    gate, up = g.op("Split", x, g.const([16, 16]), outputs=2, axis=-1)
    g.output(g.Mul(g.Gelu(gate, approximate="tanh"), up), "y", TensorProto.FLOAT16, ["n", 16])
    return g.model()


def test_every_fused_node_has_its_plugin():
    model, weights = build_graph(config_from_hf(HF), None, "float16", 16)
    fused = run_passes(model, weights)[0]
    nodes = _llmc_nodes(fused) + _llmc_nodes(run_passes(_geglu_graph(), [])[0])
    assert {n.op_type for n in nodes} == set(specs.GRAPH_PLUGINS)
    for node in nodes:
        plugin = specs.GRAPH_PLUGINS[node.op_type]
        assert (len(node.input), len(node.output)) == (plugin.inputs, plugin.outputs), node
        assert {a.name for a in node.attribute} == set(plugin.attrs), node.op_type


def test_registrations_use_the_graph_names():
    source = inspect.getsource(trt_plugin)
    for name in set(specs.GRAPH_PLUGINS) - {"PagedAttention"}:
        assert f'f"{{NAMESPACE}}::{name}"' in source, name
    assert trt_paged_attention.NAME == "PagedAttention"


def test_paged_attention_node_attributes_make_a_plugin_record():
    model, weights = build_graph(config_from_hf(HF), None, "float16", 16)
    node = next(n for n in run_passes(model, weights)[0].graph.node
                if n.op_type == "PagedAttention")
    fields = {a.name: np.atleast_1d(helper.get_attribute_value(a)) for a in node.attribute}
    attrs = specs.paged_attention_attrs(fields)
    assert (attrs["num_q_heads"], attrs["num_kv_heads"], attrs["head_dim"],
            attrs["block_size"], attrs["sliding_window"]) == (4, 2, 64, 16, 32)
    record = specs.serialize("PagedAttention", attrs)
    assert specs.paged_attention_attrs({"record": np.frombuffer(record, np.uint8)}) == attrs
