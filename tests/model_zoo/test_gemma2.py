"""Gemma 2: config parsing and its refusals, per-layer windows and soft-caps in the fused
graph, and GGUF files (llama.cpp's `gemma2`, norm weights stored as 1 + w) read to the
logits of transformers' GGUF loader. Parity with HF, the pass counts and the TensorRT-RTX
build are in the shared per-variant tests (kind "gemma2-softcap"); the cuda backend's
refusal is in tests/core/backends."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf_files import check_against_transformers, common_meta, write_gguf
from onnx import helper

from llmc.errors import LlmcError
from llmc.model_zoo import load_model, parse_config
from llmc.model_zoo.gemma2 import GGUF_NAMES, Gemma2Config, weight_names
from llmc.passes import run_passes

# gemma-2-2b's config.json (transformers 4.x keys), shortened.
GEMMA2_2B = {"architectures": ["Gemma2ForCausalLM"], "attention_bias": False,
             "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "head_dim": 256,
             "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
             "hidden_size": 2304, "intermediate_size": 9216, "max_position_embeddings": 8192,
             "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
             "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
             "sliding_window": 4096, "vocab_size": 256000, "bos_token_id": 2,
             "eos_token_id": [1, 107], "pad_token_id": 0}


def test_2b_config_in_4x_and_5x_keys():
    c = parse_config(GEMMA2_2B)
    assert isinstance(c, Gemma2Config)
    assert (c.head_dim, c.query_pre_attn_scalar, c.attn_logit_softcapping,
            c.final_logit_softcapping, c.sliding_window, c.tie_word_embeddings,
            c.eos_token_ids) == (256, 256.0, 50.0, 30.0, 4096, True, (1, 107))
    assert c.layer_types[:3] == ("sliding_attention", "full_attention", "sliding_attention")
    v5 = {k: v for k, v in GEMMA2_2B.items() if k not in ("rope_theta", "hidden_act")}
    v5.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
              layer_types=list(c.layer_types))
    assert parse_config(v5) == c
    assert Gemma2Config.from_dict(c.to_dict()) == c          # the engine header's copy
    no_caps = parse_config({**GEMMA2_2B, "attn_logit_softcapping": None,
                            "final_logit_softcapping": None})
    assert (no_caps.attn_logit_softcapping, no_caps.final_logit_softcapping) == (None, None)
    assert "model.layers.25.post_feedforward_layernorm.weight" in weight_names(c)
    assert "lm_head.weight" not in weight_names(c)


@pytest.mark.parametrize("change,message", [
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types should list 26"),
    ({"layer_types": ["chunked_attention"] * 26}, "layer_types should list 26"),
    ({"sliding_window": None}, "sliding_attention layers need a sliding_window"),
    ({"tie_word_embeddings": False}, "untied lm_head"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"attn_logit_softcapping": "50"}, "attn_logit_softcapping should be a number"),
])
def test_unsupported_variants_are_refused_by_name(change, message):
    with pytest.raises(LlmcError, match=message):
        parse_config({**GEMMA2_2B, **change})


def test_windows_alternate_and_softcaps_reach_the_fused_graph(tiny_models):
    m = load_model(tiny_models["gemma2-softcap"][0])
    model, weights = m.build_graph("float32", 16)
    fused, _, _ = run_passes(model, weights)
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute}
             for n in fused.graph.node if n.op_type == "PagedAttention"]
    assert [a["sliding_window"] for a in attrs] == [12, 0]           # even layers slide
    assert all(a["softcap"] == pytest.approx(1.0) for a in attrs)
    assert all(a["scale"] == pytest.approx(24 ** -0.5) for a in attrs)


def test_the_tiny_models_caps_bite(tiny_models):
    """The parity tests prove the caps only if they change the logits: they do."""
    _, model = tiny_models["gemma2-softcap"]
    ids = torch.tensor([list(range(3, 40))])
    config = copy.deepcopy(model.config)
    config.attn_logit_softcapping = None       # read when the attention modules are made
    uncapped = type(model)(config).eval()
    uncapped.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = model(ids).logits, uncapped(ids).logits
    assert (a - b).abs().max() > 0.1 * a.abs().max()
    assert a.abs().max() < 1.5            # the final cap


def test_gguf_matches_transformers_gguf_loader(tmp_path, make_tiny):
    """A gemma2 file as convert_hf_to_gguf.py writes it: norm weights + 1, the soft-caps and
    window in the metadata, nothing permuted, no output.weight. transformers' loader reads
    neither the caps (50 and 30 assumed) nor query_pre_attn_scalar (256), and llama.cpp keeps
    no query_pre_attn_scalar (head_dim is used), so this model has those values."""
    model = make_tiny("gemma2-softcap", tmp_path / "hf", head_dim=256,
                      query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                      final_logit_softcapping=30.0)
    cfg = model.config

    def meta(w):
        common_meta(w, cfg, head_dim=True)
        w.add_sliding_window(cfg.sliding_window)
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)

    def convert(name, t):
        return t + 1 if name.endswith("norm.weight") else t
    path = tmp_path / "gemma2.gguf"
    write_gguf(path, "gemma2", model, GGUF_NAMES, meta, convert)
    check_against_transformers(path, tmp_path, "gemma2 gguf")
    ckpt = load_model(path)
    c = ckpt.config
    assert (c.architecture, c.sliding_window, c.query_pre_attn_scalar,
            c.attn_logit_softcapping) == ("Gemma2ForCausalLM", 12, 256, 50.0)
    name = "model.layers.1.post_feedforward_layernorm.weight"
    np.testing.assert_allclose(ckpt.tensor(name), model.state_dict()[name].numpy(), atol=1e-6)
