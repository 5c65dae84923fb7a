"""The TensorRT plugins stand in for the `llmc` nodes the pass pipeline emits: same op
types, input/output counts and attribute names (TensorRT's ONNX parser hands a node to the
plugin registered under its op type, with the node's attributes as plugin fields).

Without TensorRT, the glue registers its plugins against a stand-in of the API that records
what was registered (which also shows both glue modules import without TensorRT)."""

from __future__ import annotations

import inspect
import sys
import types

import numpy as np
import onnx
from onnx import TensorProto, helper

from llmc.devices import MAX_SMEM_OPTIN
from llmc.graph import GraphBuilder
from llmc.model_zoo import gpt2
from llmc.model_zoo import parse_config as config_from_hf
from llmc.model_zoo.llama import build_graph
from llmc.passes import run_passes
from llmc.plugins import trt_paged_attention, trt_plugin
from llmc.plugins.attention_plan import paged_attention_attrs
from llmc.plugins.nodes import GRAPH_PLUGINS, PA_ALIASES, PA_INPUTS, PA_OUTPUTS
from llmc.plugins.records import serialize

HF = {"architectures": ["MistralForCausalLM"], "vocab_size": 64, "hidden_size": 256,
      "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "sliding_window": 32}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 64, "n_embd": 256, "n_layer": 2,
        "n_head": 4}


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
    gpt2_graph = gpt2.FAMILY.build_graph(config_from_hf(GPT2), None, "float16", 16)
    nodes = _llmc_nodes(fused) + _llmc_nodes(run_passes(_geglu_graph(), [])[0]) + \
        _llmc_nodes(run_passes(*gpt2_graph)[0])                  # AddLayerNorm
    assert {n.op_type for n in nodes} == set(GRAPH_PLUGINS)
    for node in nodes:
        plugin = GRAPH_PLUGINS[node.op_type]
        assert (len(node.input), len(node.output)) == (plugin.inputs, plugin.outputs), node
        assert {a.name for a in node.attribute} == set(plugin.attrs), node.op_type


def _fake_tensorrt(monkeypatch) -> dict:
    """Install stand-ins for `tensorrt` and `tensorrt.plugin`; returns what gets registered."""
    seen = {"desc": {}, "aot": {}, "creators": []}
    trt = types.ModuleType("tensorrt")
    for name in ("IPluginV3", "IPluginV3OneCore", "IPluginV3OneBuildV2", "IPluginV3OneRuntime",
                 "IPluginCreatorV3One"):
        setattr(trt, name, type(name, (), {}))
    trt.float16, trt.bfloat16, trt.int32 = "float16", "bfloat16", "int32"
    trt.PluginFieldType = types.SimpleNamespace(INT32=0, FLOAT32=1, UNKNOWN=2)
    trt.PluginField = lambda name, data, kind: name
    trt.PluginFieldCollection = list
    trt.get_plugin_registry = lambda: types.SimpleNamespace(
        register_creator=lambda creator, ns: seen["creators"].append((creator, ns)))
    trtp = types.ModuleType("tensorrt.plugin")
    for name in ("TensorDesc", "KernelLaunchParams", "SymExprs", "SymIntExprs", "SymInt32"):
        setattr(trtp, name, type(name, (), {}))
    trtp.register = lambda pid: lambda fn: seen["desc"].setdefault(pid, fn)
    trtp.aot_impl = lambda pid: lambda fn: seen["aot"].setdefault(pid, fn)
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    return seen


class _Desc:
    """A tensor description as TensorRT hands it to a plugin's shape function."""

    def __init__(self, shape=("T", 64)):
        self.shape_expr = list(shape)

    def like(self):
        return _Desc(self.shape_expr)


def test_registered_plugins_take_the_graph_nodes(monkeypatch):
    seen = _fake_tensorrt(monkeypatch)
    trt_plugin.register("sm_90a", 132, max_smem=MAX_SMEM_OPTIN[(9, 0)])
    aot_nodes = set(GRAPH_PLUGINS) - {"PagedAttention"}
    assert set(seen["desc"]) == set(seen["aot"]) == {f"llmc::{n}" for n in aot_nodes}
    for name in aot_nodes:
        node, desc = GRAPH_PLUGINS[name], seen["desc"][f"llmc::{name}"]
        params = list(inspect.signature(desc).parameters)
        assert params[node.inputs:] == list(node.attrs), name
        assert len(params) == node.inputs + len(node.attrs), name
        outs = desc(*[_Desc() for _ in range(node.inputs)], *(None for _ in node.attrs))
        assert (len(outs) if isinstance(outs, tuple) else 1) == node.outputs, name

    [(creator, namespace)] = seen["creators"]
    assert (namespace, creator.name) == ("llmc", trt_paged_attention.NAME)
    node = GRAPH_PLUGINS["PagedAttention"]
    assert set(node.attrs) <= set(creator.field_names)
    fields = [types.SimpleNamespace(name=n, data=np.array([v])) for n, v in (
        ("num_heads", 8), ("num_kv_heads", 2), ("head_dim", 64), ("block_size", 16))]
    plugin = creator.create_plugin("pa", fields, None)
    assert (len(PA_INPUTS), plugin.num_outputs) == (node.inputs, node.outputs)
    aliased = {o: plugin.get_aliased_input(o) for o in range(len(PA_OUTPUTS))}
    assert aliased == {0: -1, **PA_ALIASES} and PA_INPUTS[PA_ALIASES[1]] == "cache"


def test_paged_attention_node_attributes_make_a_plugin_record():
    model, weights = build_graph(config_from_hf(HF), None, "float16", 16)
    node = next(n for n in run_passes(model, weights)[0].graph.node
                if n.op_type == "PagedAttention")
    fields = {a.name: np.atleast_1d(helper.get_attribute_value(a)) for a in node.attribute}
    attrs = paged_attention_attrs(fields)
    assert (attrs["num_q_heads"], attrs["num_kv_heads"], attrs["head_dim"],
            attrs["block_size"], attrs["sliding_window"]) == (4, 2, 64, 16, 32)
    record = serialize("PagedAttention", attrs)
    assert paged_attention_attrs({"record": np.frombuffer(record, np.uint8)}) == attrs
