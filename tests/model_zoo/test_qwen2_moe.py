"""Qwen2-MoE: config parsing and its refusals (dense layers from mlp_only_layers and
decoder_sparse_step), and GGUF files (llama.cpp's `qwen2moe`: experts stacked, the shared
expert as _shexp) read to the logits of transformers' GGUF loader. Parity with HF, the pass
counts, the TensorRT-RTX build, the cuda backend's moe op and the quantizer's refusal are in
the shared per-variant tests (kind "qwen2moe-shared")."""

from __future__ import annotations

import numpy as np
import pytest
from gguf_files import (
    check_against_transformers,
    common_meta,
    stacked_experts_state,
    write_gguf,
)

from llmc.errors import LlmcError
from llmc.model_zoo import load_model, parse_config
from llmc.model_zoo.qwen2_moe import GGUF_NAMES, Qwen2MoeConfig, weight_names

# Qwen/Qwen1.5-MoE-A2.7B's config.json (transformers 4.x keys), shortened.
A2_7B = {"architectures": ["Qwen2MoeForCausalLM"], "bos_token_id": 151643,
         "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu",
         "hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 8192,
         "max_window_layers": 21, "model_type": "qwen2_moe", "moe_intermediate_size": 1408,
         "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 60,
         "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 16,
         "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "shared_expert_intermediate_size": 5632,
         "sliding_window": 32768, "tie_word_embeddings": False, "use_sliding_window": False,
         "vocab_size": 151936}


def test_a2_7b_config_in_4x_and_5x_keys():
    c = parse_config(A2_7B)
    assert isinstance(c, Qwen2MoeConfig)
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
            c.shared_expert_intermediate_size, c.norm_topk_prob, c.attention_bias,
            c.sliding_window) == (60, 4, 1408, 5632, False, True, None)
    assert all(c.sparse_layers) and len(c.sparse_layers) == 24
    v5 = {k: v for k, v in A2_7B.items() if k != "rope_theta"}
    v5.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, qkv_bias=True,
              layer_types=["full_attention"] * 24, mlp_only_layers=[])
    assert parse_config(v5) == c
    assert Qwen2MoeConfig.from_dict(c.to_dict()) == c          # the engine header's copy
    names = weight_names(c)
    assert "model.layers.23.mlp.experts.59.down_proj.weight" in names
    assert "model.layers.0.mlp.shared_expert_gate.weight" in names
    assert len(names) == 3 + 24 * (2 + 7 + 2 + 3 + 60 * 3)
    # dense layers: listed ones, and those off the sparse step's grid
    d = parse_config({**A2_7B, "mlp_only_layers": [0, 5], "decoder_sparse_step": 2})
    assert [i for i, s in enumerate(d.sparse_layers) if s] == [1, 3, 7, 9, 11, 13, 15, 17, 19,
                                                               21, 23]
    assert "model.layers.0.mlp.gate_proj.weight" in weight_names(d)


@pytest.mark.parametrize("change,message", [
    ({"num_experts_per_tok": 61}, "num_experts_per_tok \\(61\\) should be between 1 and "
     "num_experts \\(60\\)"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step \\(0\\) should be at least 1"),
    ({"mlp_only_layers": "0"}, "mlp_only_layers a list of layer numbers"),
    ({"use_sliding_window": True}, "sliding window on some layers only"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_unsupported_variants_are_refused_by_name(change, message):
    with pytest.raises(LlmcError, match=message):
        parse_config({**A2_7B, **change})


def test_gguf_matches_transformers_gguf_loader(tmp_path, make_tiny):
    """A qwen2moe file as convert_hf_to_gguf.py writes it: nothing permuted, the router as
    ffn_gate_inp, each layer's experts stacked as ffn_{gate,up,down}_exps, the shared expert
    as ffn_*_shexp and its gate as a vector. transformers' loader reads neither
    expert_feed_forward_length nor expert_shared_feed_forward_length (it assumes 1408 and
    5632) nor any dense layer, so this model has those widths and no dense layer."""
    model = make_tiny("qwen2moe-shared", tmp_path / "hf", moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, mlp_only_layers=[])
    cfg = model.config
    state = stacked_experts_state(model, cfg.moe_intermediate_size)
    for name in state:
        if name.endswith("shared_expert_gate.weight"):   # a vector in llama.cpp's file
            state[name] = state[name].reshape(-1)

    def meta(w):
        common_meta(w, cfg)
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    path = tmp_path / "qwen2moe.gguf"
    write_gguf(path, "qwen2moe", model, GGUF_NAMES, meta, state=state)
    check_against_transformers(path, tmp_path, "qwen2moe gguf")
    m = load_model(path)
    c = m.config
    assert (m.family.name, c.num_experts, c.moe_intermediate_size,
            c.shared_expert_intermediate_size, c.norm_topk_prob) == ("qwen2_moe", 4, 1408,
                                                                     5632, False)
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    np.testing.assert_array_equal(m.tensor(name),
                                  state["model.layers.1.mlp.experts.up_proj.stacked"][2])
