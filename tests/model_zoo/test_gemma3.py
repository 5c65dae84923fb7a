"""Gemma 3 (text): config parsing and its refusals, per-layer windows and RoPE tables in the
fused graph, and GGUF files (llama.cpp's `gemma3`) read to the logits of transformers' GGUF
loader. Parity with HF, the pass counts and the TensorRT-RTX build are in the shared
per-variant tests (kind "gemma3-local-global"); the cuda backend's refusal is in
tests/core/backends."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf_files import check_against_transformers, common_meta, write_gguf
from onnx import TensorProto, helper, numpy_helper

from llmc.errors import LlmcError
from llmc.model_zoo import load_model, parse_config
from llmc.model_zoo.gemma3 import GGUF_NAMES, Gemma3Config, weight_names
from llmc.passes import run_passes

# gemma-3-1b-it's config.json (transformers 4.x keys), shortened.
GEMMA3_1B = {"architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
             "attn_logit_softcapping": None, "final_logit_softcapping": None, "head_dim": 256,
             "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
             "intermediate_size": 6912, "max_position_embeddings": 32768,
             "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
             "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "rope_local_base_freq": 10000,
             "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
             "sliding_window_pattern": 6, "vocab_size": 262144, "bos_token_id": 2,
             "eos_token_id": [1, 106], "pad_token_id": 0}


def test_1b_config_in_4x_and_5x_keys():
    c = parse_config(GEMMA3_1B)
    assert isinstance(c, Gemma3Config)
    assert (c.head_dim, c.rope_theta, c.rope_local_theta, c.sliding_window,
            c.attn_logit_softcapping, c.final_logit_softcapping, c.query_pre_attn_scalar) == (
        256, 1e6, 1e4, 512, None, None, 256.0)
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17, 23]
    v5 = {k: v for k, v in GEMMA3_1B.items()
          if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling",
                       "sliding_window_pattern")}
    v5.update(layer_types=list(c.layer_types), rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    assert parse_config(v5) == c
    assert "model.layers.25.self_attn.k_norm.weight" in weight_names(c)


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}},
     "'linear' rope scaling on its full layers"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "yarn", "factor": 2.0}}},
     "'yarn' rope scaling on its sliding layers"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
])
def test_unsupported_variants_are_refused_by_name(change, message):
    with pytest.raises(LlmcError, match=message):
        parse_config({**GEMMA3_1B, **change})


def test_local_and_global_layers_differ_in_window_and_rope(tiny_models):
    """Layer 0 slides with theta 100, layer 1 sees everything with theta 1e6: the fused graph
    has a window only on the first PagedAttention and two RoPE tables."""
    m = load_model(tiny_models["gemma3-local-global"][0])
    model, weights = m.build_graph("float32", 16)
    fused, _, _ = run_passes(model, weights)
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute}
             for n in fused.graph.node if n.op_type == "PagedAttention"]
    assert [a["sliding_window"] for a in attrs] == [12, 0]
    assert all(a["softcap"] == 0 for a in attrs)
    consts = {i.name: numpy_helper.to_array(i) for i in fused.graph.initializer
              if i.data_location != TensorProto.EXTERNAL}             # not the weights
    tables = {tuple(np.round(c.ravel(), 6)) for c in consts.values()
              if c.ndim == 2 and c.shape == (1, 16)}          # the inv_freq tables [1, D/2]
    assert len(tables) == 2


def test_the_tiny_models_thetas_bite(tiny_models):
    """Parity proves the local theta only if it changes the logits: it does."""
    _, model = tiny_models["gemma3-local-global"]
    config = copy.deepcopy(model.config)
    config.rope_parameters["sliding_attention"]["rope_theta"] = 1e6
    other = type(model)(config).eval()
    other.load_state_dict(model.state_dict())
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        a, b = model(ids).logits, other(ids).logits
    assert (a - b).abs().max() > 1e-2 * a.abs().max()


def test_gguf_matches_transformers_gguf_loader(tmp_path, make_tiny):
    """A gemma3 file as convert_hf_to_gguf.py writes it: norm weights + 1 (q/k norms too),
    the global theta as rope.freq_base and the window in the metadata. Both readers take
    the local theta (10k) and the 5:1 pattern as fixed, and llama.cpp keeps no
    query_pre_attn_scalar: this model has six layers, head_dim 256 and the defaults."""
    model = make_tiny("gemma3-local-global", tmp_path / "hf", num_hidden_layers=6,
                      head_dim=256, query_pre_attn_scalar=256, layer_types=None,
                      rope_local_base_freq=10_000.0)
    cfg = model.config

    def meta(w):
        common_meta(w, cfg, head_dim=True)
        w.add_sliding_window(cfg.sliding_window)

    def convert(name, t):
        return t + 1 if name.endswith("norm.weight") else t
    path = tmp_path / "gemma3.gguf"
    write_gguf(path, "gemma3", model, GGUF_NAMES, meta, convert)
    check_against_transformers(path, tmp_path, "gemma3 gguf")
    c = load_model(path).config
    assert (c.architecture, c.rope_theta, c.rope_local_theta, c.layer_types[5]) == (
        "Gemma3ForCausalLM", 1e6, 1e4, "full_attention")
