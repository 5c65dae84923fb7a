"""Phi-3: config parsing and its refusals, and GGUF files (llama.cpp's `phi3`) read to the
logits of transformers' GGUF loader. Parity with HF, the passes and the backends are in the
shared per-variant tests (kind "phi3-window")."""

from __future__ import annotations

import numpy as np
import pytest
from gguf_files import check_against_transformers, common_meta, write_gguf

from llmc.errors import LlmcError
from llmc.model_zoo import load_model, parse_config
from llmc.model_zoo.phi3 import GGUF_NAMES

# Phi-3-mini-4k-instruct's config.json (transformers 4.x keys), shortened.
MINI_4K = {"architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
           "vocab_size": 32064, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "rope_scaling": None, "sliding_window": 2047, "max_position_embeddings": 4096,
           "original_max_position_embeddings": 4096, "hidden_act": "silu",
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000}


def test_mini_4k_config_in_4x_and_5x_keys():
    c = parse_config(MINI_4K)
    assert (c.head_dim, c.num_key_value_heads, c.sliding_window, c.rope_theta,
            c.rope_scaling, c.attention_bias) == (96, 32, 2047, 10000.0, None, False)
    v5 = {k: v for k, v in MINI_4K.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert parse_config(v5) == c


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [1.0]}},
     "rope scaling 'su' \\(the 128k-context variants\\) is not supported"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     "rope scaling 'longrope'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                          "partial_rotary_factor": 0.75}}, "partial_rotary_factor 0.75"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unsupported_variants_are_refused_by_name(change, message):
    with pytest.raises(LlmcError, match=message):
        parse_config({**MINI_4K, **change})


def _meta(cfg, window: int):
    def meta(w):
        common_meta(w, cfg)
        w.add_rope_scaling_orig_ctx_len(cfg.max_position_embeddings)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        w.add_sliding_window(window)   # llama.cpp: 0 is "none" (Phi-4)
    return meta


def test_gguf_matches_transformers_gguf_loader(tmp_path, make_tiny):
    """A phi3 file as convert_hf_to_gguf.py writes it: qkv_proj -> attn_qkv, gate_up_proj
    -> ffn_up, nothing permuted. transformers' loader ignores the sliding window, so this
    model has none (the window is read below)."""
    model = make_tiny("phi3-window", tmp_path / "hf")
    model.config.sliding_window = None     # what transformers reads from the file
    path = tmp_path / "phi3.gguf"
    write_gguf(path, "phi3", model, GGUF_NAMES, _meta(model.config, 0))
    check_against_transformers(path, tmp_path, "phi3 gguf")
    ckpt = load_model(path)
    assert ckpt.config.architecture == "Phi3ForCausalLM" and ckpt.config.sliding_window is None
    name = "model.layers.1.self_attn.qkv_proj.weight"
    np.testing.assert_array_equal(ckpt.tensor(name), model.state_dict()[name].numpy())


def test_gguf_window_and_128k_files(tmp_path, tiny_models):
    _, model = tiny_models["phi3-window"]
    path = tmp_path / "w.gguf"
    write_gguf(path, "phi3", model, GGUF_NAMES, _meta(model.config, 12))
    assert load_model(path).config.sliding_window == 12

    def long_meta(w):
        _meta(model.config, 0)(w)
        w.add_context_length(131072)     # original_context_length stays: a 128k variant
    path = tmp_path / "long.gguf"
    write_gguf(path, "phi3", model, GGUF_NAMES, long_meta)
    with pytest.raises(LlmcError, match="'longrope' \\(the 128k-context variants\\)"):
        load_model(path)
    # the factor tables llama.cpp stores for longrope say it too
    factors = {f"rope_factors_{x}.weight": np.ones(8, np.float32) for x in ("long", "short")}
    path = tmp_path / "factors.gguf"
    write_gguf(path, "phi3", model, GGUF_NAMES, _meta(model.config, 0), extra=factors)
    with pytest.raises(LlmcError, match="'longrope' \\(the 128k-context variants\\)"):
        load_model(path)
