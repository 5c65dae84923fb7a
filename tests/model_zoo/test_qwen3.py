"""Qwen3: config parsing and its refusals, the per-head q/k norms in the fused graph, and
GGUF files (llama.cpp's `qwen3`) read to the logits of transformers' GGUF loader. Parity
with HF, the pass counts and the TensorRT-RTX build are in the shared per-variant tests
(kind "qwen3-qknorm"); the cuda backend's refusal is in tests/core/backends."""

from __future__ import annotations

import numpy as np
import pytest
from gguf_files import check_against_transformers, common_meta, write_gguf

from llmc.errors import LlmcError
from llmc.model_zoo import load_model, parse_config
from llmc.model_zoo.qwen3 import GGUF_NAMES, weight_names
from llmc.passes import run_passes

# Qwen3-0.6B's config.json (transformers 4.x keys), shortened.
QWEN3_06B = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024, "head_dim": 128,
             "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "vocab_size": 151936, "rms_norm_eps": 1e-6,
             "rope_theta": 1000000, "rope_scaling": None, "attention_bias": False,
             "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28,
             "max_position_embeddings": 40960, "hidden_act": "silu",
             "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645}


def test_config_in_4x_and_5x_keys():
    c = parse_config(QWEN3_06B)
    assert (c.head_dim, c.q_size, c.kv_size, c.rope_theta, c.attention_bias,
            c.sliding_window, c.tie_word_embeddings) == (128, 2048, 1024, 1e6, False, None, True)
    v5 = {k: v for k, v in QWEN3_06B.items() if k not in ("rope_theta", "rope_scaling")}
    v5.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
              layer_types=["full_attention"] * 28)
    assert parse_config(v5) == c
    # transformers' default head_dim is 128 whatever hidden / heads is
    assert parse_config({k: v for k, v in QWEN3_06B.items() if k != "head_dim"}) == c
    names = weight_names(c)
    assert "model.layers.27.self_attn.k_norm.weight" in names
    assert not any(n.endswith("_proj.bias") for n in names)


@pytest.mark.parametrize("change,message", [
    ({"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 14},
     "sliding window on some layers only"),
    ({"layer_types": ["sliding_attention"] * 28}, "sliding window on some layers only"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unsupported_variants_are_refused_by_name(change, message):
    with pytest.raises(LlmcError, match=message):
        parse_config({**QWEN3_06B, **change})


def test_q_k_norms_are_fused_per_head_before_rope(tiny_models):
    """Each RotaryEmbedding reads an RMSNormalization over one head (weight [D]) of the
    fused QKV GEMM's Split: the norm and RoPE passes both fire around it."""
    m = load_model(tiny_models["qwen3-qknorm"][0])
    model, weights = m.build_graph("float32", 16)
    fused, fused_weights, _ = run_passes(model, weights)
    producer = {o: n for n in fused.graph.node for o in n.output}
    shapes = {w.name: w.shape for w in fused_weights}
    ropes = [n for n in fused.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(ropes) == 2 * m.config.num_hidden_layers
    for rope in ropes:
        norm = producer[producer[rope.input[0]].input[0]]
        assert norm.op_type == "RMSNormalization" and shapes[norm.input[1]] == (32,)
        assert producer[producer[norm.input[0]].input[0]].op_type == "Split"


def test_gguf_matches_transformers_gguf_loader(tmp_path, make_tiny):
    """A qwen3 file as convert_hf_to_gguf.py writes it: q_norm / k_norm -> attn_q_norm /
    attn_k_norm, head_dim as attention.key_length, nothing permuted. transformers' loader
    does not read key_length (its Qwen3Config assumes 128), so this model has head_dim 128."""
    model = make_tiny("qwen3-qknorm", tmp_path / "hf", head_dim=128)
    cfg = model.config

    def meta(w):
        common_meta(w, cfg, head_dim=True)
    path = tmp_path / "qwen3.gguf"
    write_gguf(path, "qwen3", model, GGUF_NAMES, meta)
    check_against_transformers(path, tmp_path, "qwen3 gguf")
    c = load_model(path).config
    assert (c.architecture, c.head_dim, c.tie_word_embeddings) == ("Qwen3ForCausalLM", 128, True)
    name = "model.layers.1.self_attn.k_norm.weight"
    np.testing.assert_array_equal(load_model(path).tensor(name),
                                  model.state_dict()[name].numpy())
