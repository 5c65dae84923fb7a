"""Each pass alone: it fires (counter), the fused node is there, onnxruntime numerics equal the
unrewritten graph within the tolerance table, and a negative case declines."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from passes_helpers import (  # noqa: F401
    BLOCK,
    assert_same,
    ragged_feeds,
    rel_err,
    run_ort,
    tiny_graph,
)

from llmc.dtypes import np_dtype
from llmc.graph import GraphBuilder
from llmc.model_zoo import load_model
from llmc.model_zoo.llama import LlamaGraph
from llmc.passes import activations, attention, gemm, norms, rope, run_passes
from llmc.plugins import attention_plan

LAYERS = 2  # the tiny models have two layers

# pass stages -> (counter name, expected firings on a 2-layer tiny model, fused op type)
CASES = {
    "rms_norm": ([norms.RMS_NORM], 2 * LAYERS + 1, "RMSNormalization"),
    "add_rms_norm": ([norms.RMS_NORM, norms.ADD_RMS_NORM], 2 * LAYERS - 1, "AddRMSNorm"),
    "layer_norm": ([norms.LAYER_NORM], 2 * LAYERS + 1, "LayerNormalization"),
    # GPT-2: the embedding sum feeds the first layer's norm too
    "add_layer_norm": ([norms.LAYER_NORM, norms.ADD_LAYER_NORM], 2 * LAYERS, "AddLayerNorm"),
    "swiglu": ([activations.SWIGLU], LAYERS, "SwiGLU"),
    "rope": ([rope.ROPE], 2 * LAYERS, "RotaryEmbedding"),
    "qkv_gemm": ([gemm.QKV_GEMM], LAYERS, "Split"),
    "gate_up_gemm": ([gemm.GATE_UP_GEMM], LAYERS, "Split"),
    "gated_split": ([activations.SWIGLU, gemm.GATE_UP_GEMM, activations.GATED_SPLIT], LAYERS,
                    "FusedSwiGLU"),
    "paged_attention": ([attention.PAGED_ATTENTION], LAYERS, "PagedAttention"),
}


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(CASES))
def test_pass_fires_and_keeps_numerics(tiny_folders, name, dtype):
    stages, count, op = CASES[name]
    kind = {"qkv_gemm": "qwen2-bias", "layer_norm": "gpt2-learned-pos",   # biases; LayerNorm
            "add_layer_norm": "gpt2-learned-pos"}.get(name, "mistral-window")  # or a window
    model, weights, cfg = tiny_graph(tiny_folders[kind], dtype)
    fused, fused_weights, report = run_passes(model, weights, passes=stages)
    assert report["fired"][name] == count
    assert _ops(fused).count(op) >= count
    feeds = ragged_feeds(cfg, "float32" if dtype == "bfloat16" else dtype)
    assert_same(run_ort(model, weights, feeds), run_ort(fused, fused_weights, feeds), dtype)


def _expose(model: onnx.ModelProto, value: str) -> None:
    """Make an intermediate a graph output: it then has a consumer outside any chain."""
    model.graph.output.append(helper.make_tensor_value_info(value, TensorProto.UNDEFINED, None))


def _first(model, op_type: str, scope: str = "layers.0"):
    return next(n for n in model.graph.node if n.op_type == op_type and n.name.startswith(scope))


def _set_const(model, name: str, value) -> None:
    init = next(t for t in model.graph.initializer if t.name == name)
    init.CopyFrom(numpy_helper.from_array(np.asarray(value, np.int64), name))


def test_rms_norm_declines_shared_intermediate_and_wrong_axis(tiny_folders):
    model, weights, _ = tiny_graph(tiny_folders["llama-gqa"])
    _expose(model, _first(model, "ReduceMean").output[0])
    _set_const(model, _first(model, "ReduceMean", "layers.1").input[1], [0])
    assert run_passes(model, weights, passes=[norms.RMS_NORM])[2]["fired"]["rms_norm"] == 3


def test_layer_norm_declines_shared_intermediate_and_wrong_axis(tiny_folders):
    model, weights, _ = tiny_graph(tiny_folders["gpt2-learned-pos"])
    _expose(model, _first(model, "Sub").output[0])
    _set_const(model, _first(model, "ReduceMean", "layers.1").input[1], [0])
    assert run_passes(model, weights, passes=[norms.LAYER_NORM])[2]["fired"]["layer_norm"] == 3


def test_rms_norm_declines_a_layer_norm(tiny_folders):
    """A LayerNorm's tail is an RMSNorm of the centred input: the rms_norm pattern must not
    take it (the bias and the centring would be left behind)."""
    model, weights, _ = tiny_graph(tiny_folders["gpt2-learned-pos"])
    assert run_passes(model, weights, passes=[norms.RMS_NORM])[2]["fired"]["rms_norm"] == 0


def test_add_rms_norm_declines_a_bias_add():
    g = GraphBuilder("t")
    x = g.input("x", TensorProto.FLOAT, ["n", 8])
    y = g.op("RMSNormalization", g.Add(x, g.const(np.ones(8), np.float32)),
             g.const(np.ones(8), np.float32), axis=-1, epsilon=1e-5)
    g.output(y, "y", TensorProto.FLOAT, ["n", 8])
    report = run_passes(g.model(), [], passes=[norms.ADD_RMS_NORM])[2]
    assert report["fired"]["add_rms_norm"] == 0


def test_swiglu_declines_when_sigmoid_is_shared(tiny_folders):
    model, weights, _ = tiny_graph(tiny_folders["llama-gqa"])
    _expose(model, _first(model, "Sigmoid").output[0])
    assert run_passes(model, weights, passes=[activations.SWIGLU])[2]["fired"]["swiglu"] == 1


def test_rope_declines_a_wrong_slice(tiny_folders):
    model, weights, _ = tiny_graph(tiny_folders["llama-gqa"])
    _set_const(model, _first(model, "Slice", "layers.0.attn").input[2], [3])  # x1 = x[:3]
    assert run_passes(model, weights, passes=[rope.ROPE])[2]["fired"]["rope"] == 3


def test_qkv_declines_a_constant_projection(tiny_folders):
    """A projection whose weight is a plain constant (not a lazy Weight) is left alone."""
    model, weights, _ = tiny_graph(tiny_folders["llama-gqa"])
    k_name = "model.layers.0.self_attn.k_proj.weight"
    w = next(w for w in weights if w.name == k_name)
    init = next(t for t in model.graph.initializer if t.name == k_name)
    init.CopyFrom(numpy_helper.from_array(w.load(), k_name))
    weights = [x for x in weights if x.name != k_name]
    assert run_passes(model, weights, passes=[gemm.QKV_GEMM])[2]["fired"]["qkv_gemm"] == 1


def test_fused_weight_streams_the_concatenated_parts(tiny_folders):
    model, weights, _ = tiny_graph(tiny_folders["qwen2-bias"])
    _, fused, _ = run_passes(model, weights, passes=[gemm.QKV_GEMM])
    by_name = {w.name: w for w in weights}
    qkv = next(w for w in fused if w.name.endswith("q_proj+k_proj+v_proj.weight"))
    assert qkv.name == "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"
    parts = [by_name[f"model.layers.0.self_attn.{p}_proj.weight"].load() for p in "qkv"]
    np.testing.assert_array_equal(qkv.load(), np.concatenate(parts, axis=1))
    assert not any(w.name.endswith("q_proj.weight") for w in fused)


def test_paged_attention_declines_shared_probs_and_reads_attributes(tiny_folders):
    model, weights, cfg = tiny_graph(tiny_folders["mistral-window"])
    _expose(model, _first(model, "Softmax").output[0])
    fused, _, report = run_passes(model, weights, passes=[attention.PAGED_ATTENTION])
    assert report["fired"]["paged_attention"] == 1
    node = next(n for n in fused.graph.node if n.op_type == "PagedAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"num_heads": 4, "num_kv_heads": 1, "head_dim": cfg.head_dim,
                     "block_size": 16, "scale": pytest.approx(cfg.head_dim ** -0.5),
                     "sliding_window": 12, "softcap": 0.0}
    assert list(node.input[3:]) == ["kv_cache_1", "block_tables", "seq_starts",
                                    "context_lens", "position_ids"]


# --- synthetic activation graphs: the forms the llama family does not emit -----------------

def _gelu_chain(g: GraphBuilder, x: str, form: str, dtype=np.float32) -> str:
    def c(v):
        return g.const(v, dtype)
    if form == "erf":     # torch.onnx export order: x * (erf(x / sqrt2) + 1) * 0.5
        return g.Mul(g.Mul(x, g.Add(g.Erf(g.Div(x, c(math.sqrt(2)))), c(1.0))), c(0.5))
    if form == "erf2":    # (0.5 * x) * (1 + erf(x * 1/sqrt2))
        return g.Mul(g.Mul(c(0.5), x), g.Add(c(1.0), g.Erf(g.Mul(x, c(1 / math.sqrt(2))))))
    cube = g.Pow(x, c(3.0)) if form == "tanh" else g.Mul(g.Mul(x, x), x)
    inner = g.Mul(c(math.sqrt(2 / math.pi)), g.Add(x, g.Mul(c(0.044715), cube)))
    return g.Mul(g.Mul(c(0.5), x), g.Add(c(1.0), g.Tanh(inner)))


def _activation_graph(form: str, gated: bool, elem=TensorProto.FLOAT):
    g = GraphBuilder("act")
    x = g.input("x", elem, ["n", 24])
    up = g.input("up", elem, ["n", 24]) if gated else None
    if form == "swiglu":
        y = g.Mul(g.Mul(x, g.Sigmoid(x)), up)
    else:
        y = _gelu_chain(g, x, form, np.float16 if elem == TensorProto.FLOAT16 else np.float32)
        y = g.Mul(y, up) if gated else y
    g.output(y, "y", elem, ["n", 24])
    return g.model()


@pytest.mark.parametrize("form,gated,fired,op", [
    ("erf", False, {"gelu": 1}, "Gelu"),
    ("erf2", False, {"gelu": 1}, "Gelu"),
    ("tanh", False, {"gelu": 1}, "Gelu"),
    ("tanh_mul", False, {"gelu": 1}, "Gelu"),
    ("erf", True, {"gelu": 1, "geglu": 1}, "GeGLU"),
    ("tanh", True, {"gelu": 1, "geglu": 1}, "GeGLU"),
    ("swiglu", True, {"swiglu": 1}, "SwiGLU"),
])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_activation_forms(form, gated, fired, op, dtype):
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
    model = _activation_graph(form, gated, elem)
    stages = [activations.GELU, activations.SWIGLU, activations.GEGLU]
    fused, _, report = run_passes(model, [], passes=stages)
    assert {k: v for k, v in report["fired"].items() if v} == fired
    assert _ops(fused) == [op, "Identity"]
    rng = np.random.default_rng(0)
    feeds = {"x": (rng.standard_normal((5, 24)) * 3).astype(dtype)}
    if gated:
        feeds["up"] = rng.standard_normal((5, 24)).astype(dtype)
    assert_same(run_ort(model, [], feeds), run_ort(fused, [], feeds), dtype)


def test_gelu_declines_a_wrong_constant_and_a_shared_intermediate():
    g = GraphBuilder("act")
    x = g.input("x", TensorProto.FLOAT, ["n", 4])
    def c(v):
        return g.const(v, np.float32)
    wrong = g.Mul(g.Mul(x, g.Add(g.Erf(g.Div(x, c(1.5))), c(1.0))), c(0.5))   # not sqrt(2)
    erf = g.Erf(g.Div(x, c(math.sqrt(2))))
    shared = g.Mul(g.Mul(x, g.Add(erf, c(1.0))), c(0.5))
    g.output(wrong, "a", TensorProto.FLOAT, ["n", 4])
    g.output(shared, "b", TensorProto.FLOAT, ["n", 4])
    g.output(erf, "erf", TensorProto.FLOAT, ["n", 4])                         # erf escapes
    report = run_passes(g.model(), [], passes=[activations.GELU])[2]
    assert report["fired"]["gelu"] == 0


def _split_gated_graph(op: str, swap: bool = False, sizes=(12, 12)):
    """Split(x) -> SwiGLU/GeGLU(gate, up) as the GEMM passes leave it (or not quite)."""
    g = GraphBuilder("split")
    x = g.input("x", TensorProto.FLOAT, ["n", 24])
    gate, up = g.op("Split", x, g.const(list(sizes)), outputs=2, axis=-1)
    if swap:
        gate, up = up, gate
    if op == "SwiGLU":
        y = g.Mul(g.Mul(gate, g.Sigmoid(gate)), up)
    else:
        y = g.Mul(g.Gelu(gate, approximate="tanh"), up)
    g.output(y, "y", TensorProto.FLOAT, ["n", 24])
    return g.model()


@pytest.mark.parametrize("op, fused", [("SwiGLU", "FusedSwiGLU"), ("GeGLU", "FusedGeGLU")])
def test_gated_split_reads_the_gemm_output_once(op, fused):
    stages = [activations.SWIGLU, activations.GEGLU, activations.GATED_SPLIT]
    model = _split_gated_graph(op)
    out, _, report = run_passes(model, [], passes=stages)
    assert report["fired"]["gated_split"] == 1 and _ops(out) == [fused, "Identity"]
    x = np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32) * 3
    assert_same(run_ort(model, [], {"x": x}), run_ort(out, [], {"x": x}), "float32")
    # (up, gate) order and unequal halves are not the kernels' [gate | up] layout: decline
    for bad in (_split_gated_graph(op, swap=True), _split_gated_graph(op, sizes=(8, 16))):
        assert run_passes(bad, [], passes=stages)[2]["fired"]["gated_split"] == 0


def test_geglu_needs_gelu_first():
    model = _activation_graph("erf", True)
    report = run_passes(model, [], passes=[activations.GEGLU])[2]
    assert report["fired"]["geglu"] == 0


# --- the next families' forms, on the llama graph with one piece changed --------------------

def _zoo_graph(cls, folder, dtype: str = "float32"):
    """(model, weights, config) of a tiny HF folder built by a LlamaGraph subclass."""
    m = load_model(folder)
    g = cls(m.config, m.tensor, dtype, BLOCK).build()
    return g.model(), g.weights, m.config


class HeadNormGraph(LlamaGraph):
    """Qwen3 / Gemma 3: q and k get a per-head RMSNorm (weight [D], over the last axis)
    between the Reshape to [T, H, D] and RoPE; the checkpoint has no such weight, so it is
    made up."""

    def weight(self, name, shape, transpose=False):
        if not name.startswith("head_norm"):
            return super().weight(name, shape, transpose)
        d, dt = self.c.head_dim, np_dtype(self.dtype)
        w = 1 + 0.3 * np.random.default_rng(len(self.g.weights)).standard_normal(d)
        return self.g.weight(name, self.dtype, (d,), lambda: w.astype(dt))

    def rope(self, x, s):
        return super().rope(self.rms_norm(x, f"head_norm_{len(self.g.weights)}"), s)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("norm", ["RMSNormalization", "unfused"])
def test_rope_fires_after_a_per_head_norm(tiny_folders, norm, dtype):
    model, weights, cfg = _zoo_graph(HeadNormGraph, tiny_folders["llama-gqa"], dtype)
    stages = [norms.RMS_NORM, rope.ROPE] if norm == "RMSNormalization" else [rope.ROPE]
    fused, fused_weights, report = run_passes(model, weights, passes=stages)
    assert report["fired"]["rope"] == 2 * LAYERS
    producers = {o: n for n in fused.graph.node for o in n.output}
    for node in (n for n in fused.graph.node if n.op_type == "RotaryEmbedding"):
        unsqueeze = producers[node.input[0]]
        assert producers[unsqueeze.input[0]].op_type == ("RMSNormalization"
                                                         if norm == "RMSNormalization" else "Mul")
    feeds = ragged_feeds(cfg, dtype)
    assert_same(run_ort(model, weights, feeds), run_ort(fused, fused_weights, feeds), dtype)


def test_rope_reads_head_dim_from_the_slices_not_the_producer(tiny_folders):
    """Halves of 5 and 11 (D = 16) are no rotate-half: declined, numerics intact. An open
    end (x[..., h:]) leaves D unknown after a norm, but a Reshape right before names it."""
    folder = tiny_folders["llama-gqa"]
    model, weights, cfg = _zoo_graph(HeadNormGraph, folder)
    x1, x2 = [n for n in model.graph.node if n.op_type == "Slice"
              and n.name.startswith("layers.0.attn")][:2]
    _set_const(model, x1.input[2], [5])
    _set_const(model, x2.input[1], [5])
    fused, fused_weights, report = run_passes(model, weights, passes=[rope.ROPE])
    assert report["fired"]["rope"] == 2 * LAYERS - 1
    feeds = ragged_feeds(cfg, "float32")
    assert_same(run_ort(model, weights, feeds), run_ort(fused, fused_weights, feeds), "float32")

    for make, fired in ((lambda: _zoo_graph(HeadNormGraph, folder), 2 * LAYERS - 1),
                        (lambda: tiny_graph(folder), 2 * LAYERS)):
        model, weights, _ = make()
        x2 = [n for n in model.graph.node if n.op_type == "Slice"
              and n.name.startswith("layers.0.attn")][1]
        _set_const(model, x2.input[2], [2**63 - 1])
        assert run_passes(model, weights, passes=[rope.ROPE])[2]["fired"]["rope"] == fired


class SoftCapGraph(LlamaGraph):
    """Gemma 2: scores = cap * tanh(scores / cap) after the scale, before the mask (or a
    look-alike that is no soft-cap, ``form``)."""

    cap, form = 0.5, "div"

    def attention(self, x, s, cache, p):
        g, add = self.g, self.g.Add

        def add_mask(a, b):            # the mask Add is where the soft-cap goes in
            return add(self.softcap(a) if b == s.mask else a, b)
        g.Add = add_mask
        try:
            return super().attention(x, s, cache, p)
        finally:
            del g.Add

    def softcap(self, scores):
        g = self.g
        cap = g.const(self.cap, np.float32)
        if self.form == "div":
            return g.Mul(g.Tanh(g.Div(scores, cap)), cap)
        if self.form == "mul":         # scores * (1/cap), as an exporter may fold it
            return g.Mul(cap, g.Tanh(g.Mul(g.const(1 / self.cap, np.float32), scores)))
        if self.form == "bare_tanh":
            return g.Tanh(scores)
        if self.form == "input_cap":   # a cap that is not a constant
            cap = g.input("cap", TensorProto.FLOAT, [])
            return g.Mul(g.Tanh(g.Div(scores, cap)), cap)
        assert self.form == "two_caps"  # divide and multiply by different constants
        return g.Mul(g.Tanh(g.Div(scores, cap)), g.const(2 * self.cap, np.float32))


def _softcap_graph(folder, form: str, dtype: str = "float32", cap: float = 0.5):
    cls = type("Capped", (SoftCapGraph,), {"form": form, "cap": cap})
    return _zoo_graph(cls, folder, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("form", ["div", "mul"])
def test_paged_attention_takes_a_logit_softcap(tiny_folders, form, dtype):
    model, weights, cfg = _softcap_graph(tiny_folders["mistral-window"], form, dtype)
    fused, fused_weights, report = run_passes(model, weights, passes=[attention.PAGED_ATTENTION])
    assert report["fired"]["paged_attention"] == LAYERS
    assert not {"Tanh", "Softmax"} & set(_ops(fused))
    node = next(n for n in fused.graph.node if n.op_type == "PagedAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["softcap"] == pytest.approx(0.5) and attrs["sliding_window"] == 12
    feeds = ragged_feeds(cfg, dtype)
    before = run_ort(model, weights, feeds)
    assert_same(before, run_ort(fused, fused_weights, feeds), dtype)
    # The cap bites on these scores, so the body applies it (it is not just carried along).
    plain, plain_weights, _ = tiny_graph(tiny_folders["mistral-window"], dtype)
    assert rel_err(before["logits"], run_ort(plain, plain_weights, feeds)["logits"]) > 1e-2
    # The TensorRT plugin's record has no soft-cap: a plugin for this node is refused by name
    # (softcap 0 is accepted: tests/plugins/test_graph_contract.py); the cuda backend runs it.
    with pytest.raises(ValueError, match="soft-cap"):
        attention_plan.paged_attention_attrs({k: np.atleast_1d(v) for k, v in attrs.items()})


@pytest.mark.parametrize("form", ["bare_tanh", "input_cap", "two_caps"])
def test_paged_attention_declines_what_is_no_softcap(tiny_folders, form):
    model, weights, _ = _softcap_graph(tiny_folders["mistral-window"], form)
    report = run_passes(model, weights, passes=[attention.PAGED_ATTENTION])[2]
    assert report["fired"]["paged_attention"] == 0
