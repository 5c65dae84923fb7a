"""Qwen3-MoE: config parsing and its refusals (dense layers from mlp_only_layers and
decoder_sparse_step, no sliding window), and GGUF files (llama.cpp's `qwen3moe`: the q/k
norms, experts stacked, no shared expert) read to the logits of transformers' GGUF loader.
Parity with HF, the pass counts, the TensorRT-RTX build, the cuda backend's moe op and the
quantizer's refusal are in the shared per-variant tests (kind "qwen3moe-qknorm")."""

from __future__ import annotations

import numpy as np
import pytest
from gguf_files import (
    check_against_transformers,
    common_meta,
    qwen3moe_meta,
    stacked_experts_state,
    write_gguf,
)

from llmc.errors import LlmcError
from llmc.model_zoo import load_model, parse_config
from llmc.model_zoo.qwen2_moe import SparseMoeConfig
from llmc.model_zoo.qwen3_moe import GGUF_NAMES, weight_names

# Qwen/Qwen3-30B-A3B's config.json (transformers 4.x keys), less training-only keys.
A3B = {"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False,
       "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645,
       "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144,
       "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
       "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
       "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
       "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
       "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
       "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936}


def test_a3b_config_in_4x_and_5x_keys():
    c = parse_config(A3B)
    assert type(c) is SparseMoeConfig
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob,
            c.head_dim, c.num_key_value_heads, c.attention_bias, c.sliding_window) == \
        (128, 8, 768, True, 128, 4, False, None)
    assert all(c.sparse_layers) and len(c.sparse_layers) == 48
    # transformers 5 writes num_experts as num_local_experts
    v5 = {k: v for k, v in A3B.items() if k not in ("rope_theta", "rope_scaling",
                                                    "max_window_layers", "num_experts")}
    v5.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
              num_local_experts=128)
    assert parse_config(v5) == c
    assert SparseMoeConfig.from_dict(c.to_dict()) == c          # the engine header's copy
    names = weight_names(c)
    assert "model.layers.47.mlp.experts.127.down_proj.weight" in names
    assert "model.layers.0.self_attn.k_norm.weight" in names
    assert not [n for n in names if "shared_expert" in n]
    # embed, norm, lm_head; a layer: 2 norms, q/k/v/o, q/k norms, the router, the experts
    assert len(names) == 3 + 48 * (2 + 4 + 2 + 1 + 128 * 3)
    # transformers' defaults: head_dim 128 (not hidden / heads), no renormalisation
    d = parse_config({k: v for k, v in A3B.items() if k not in ("head_dim", "norm_topk_prob")})
    assert (d.head_dim, d.norm_topk_prob) == (128, False)
    # dense layers: listed ones, and those off the sparse step's grid
    d = parse_config({**A3B, "mlp_only_layers": [0, 5], "decoder_sparse_step": 2})
    assert [i for i, s in enumerate(d.sparse_layers) if s] == [i for i in range(1, 48, 2)
                                                               if i != 5]
    assert "model.layers.0.mlp.gate_proj.weight" in weight_names(d)
    assert "model.layers.0.mlp.gate.weight" not in weight_names(d)


@pytest.mark.parametrize("change,message", [
    ({"num_experts_per_tok": 129}, "num_experts_per_tok \\(129\\) should be between 1 and "
     "num_experts \\(128\\)"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step \\(0\\) should be at least 1"),
    ({"num_local_experts": 4, "num_experts_per_tok": 5},
     "num_experts_per_tok \\(5\\) should be between 1 and num_local_experts \\(4\\)"),
    ({"mlp_only_layers": "0"}, "mlp_only_layers a list of layer numbers"),
    ({"use_sliding_window": True, "sliding_window": 4096},
     "Qwen3MoeForCausalLM with a sliding window \\(use_sliding_window\\) is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
])
def test_unsupported_variants_are_refused_by_name(change, message):
    with pytest.raises(LlmcError, match=message):
        parse_config({**A3B, **change})


def test_gguf_matches_transformers_gguf_loader(tmp_path, make_tiny):
    """A qwen3moe file as convert_hf_to_gguf.py writes it: nothing permuted, the q/k norms
    as attn_q_norm / attn_k_norm, head_dim as attention.key_length, the router as
    ffn_gate_inp, each layer's experts stacked as ffn_{gate,up,down}_exps. transformers'
    loader does not read expert_feed_forward_length (its Qwen3MoeConfig assumes 768) nor
    any dense layer (llama.cpp's qwen3moe has none), so this model has that width and no
    dense layer; both read the top-k weights renormalised, as llama.cpp's qwen3moe does."""
    model = make_tiny("qwen3moe-qknorm", tmp_path / "hf", moe_intermediate_size=768,
                      mlp_only_layers=[])
    cfg = model.config
    state = stacked_experts_state(model, cfg.moe_intermediate_size)

    path = tmp_path / "qwen3moe.gguf"
    write_gguf(path, "qwen3moe", model, GGUF_NAMES, lambda w: qwen3moe_meta(w, cfg),
               state=state)
    check_against_transformers(path, tmp_path, "qwen3moe gguf")
    m = load_model(path)
    c = m.config
    assert (m.family.name, c.architecture, c.head_dim, c.num_experts, c.num_experts_per_tok,
            c.moe_intermediate_size, c.norm_topk_prob, c.tie_word_embeddings) == \
        ("qwen3_moe", "Qwen3MoeForCausalLM", 32, 4, 2, 768, True, True)
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    np.testing.assert_array_equal(m.tensor(name),
                                  state["model.layers.1.mlp.experts.up_proj.stacked"][2])
    name = "model.layers.1.self_attn.q_norm.weight"
    np.testing.assert_array_equal(m.tensor(name), state[name])


def test_gguf_without_expert_metadata_is_refused(tmp_path, make_tiny):
    model = make_tiny("qwen3moe-qknorm", tmp_path / "hf", mlp_only_layers=[])
    path = tmp_path / "bare.gguf"
    write_gguf(path, "qwen3moe", model, GGUF_NAMES, lambda w: common_meta(w, model.config),
               state={k: v for k, v in model.state_dict().items() if ".mlp." not in k})
    with pytest.raises(LlmcError, match="GGUF metadata of architecture 'qwen3moe' lacks "
                       "'qwen3moe.expert_count'"):
        load_model(path)
