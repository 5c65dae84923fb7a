"""Mixtral: config parsing and its refusals, and GGUF files (llama.cpp writes Mixtral as a
`llama` file with each layer's experts stacked) read to the logits of the HF model they
were written from (transformers' GGUF loader has no Mixtral: it reads a `llama` file as
LlamaForCausalLM). Parity with HF, the pass counts, the TensorRT-RTX build, the cuda
backend's moe op and the quantizer's refusal are in the shared per-variant tests (kind
"mixtral-top2")."""

from __future__ import annotations

import numpy as np
import pytest
from gguf_files import check_against_transformers, common_meta, permuted_qk, write_gguf

from llmc.errors import LlmcError
from llmc.model_zoo import load_model, parse_config
from llmc.model_zoo.mixtral import GGUF_NAMES, STACKED, MixtralConfig, weight_names

# mistralai/Mixtral-8x7B-v0.1's config.json (transformers 4.x keys).
MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0,
                "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
                "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
                "max_position_embeddings": 32768, "model_type": "mixtral",
                "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
                "num_key_value_heads": 8, "num_local_experts": 8,
                "output_router_logits": False, "rms_norm_eps": 1e-05,
                "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
                "tie_word_embeddings": False, "vocab_size": 32000}


def test_8x7b_config_in_4x_and_5x_keys():
    c = parse_config(MIXTRAL_8X7B)
    assert isinstance(c, MixtralConfig)
    assert (c.num_local_experts, c.num_experts_per_tok, c.head_dim, c.num_key_value_heads,
            c.rope_theta, c.sliding_window) == (8, 2, 128, 8, 1e6, None)
    v5 = {k: v for k, v in MIXTRAL_8X7B.items() if k != "rope_theta"}
    v5.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, head_dim=None,
              router_jitter_noise=0.0)
    assert parse_config(v5) == c
    assert MixtralConfig.from_dict(c.to_dict()) == c          # the engine header's copy
    names = weight_names(c)
    assert "model.layers.31.block_sparse_moe.experts.7.w3.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert not [n for n in names if ".mlp." in n]
    assert len(names) == 3 + 32 * (2 + 4 + 1 + 8 * 3)


@pytest.mark.parametrize("change,message", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok \\(9\\) should be between 1 and "
     "num_local_experts \\(8\\)"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok \\(0\\)"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"num_local_experts": "8"}, "num_local_experts should be an integer"),
])
def test_unsupported_variants_are_refused_by_name(change, message):
    with pytest.raises(LlmcError, match=message):
        parse_config({**MIXTRAL_8X7B, **change})


def test_gguf_llama_file_with_experts(tmp_path, tiny_models):
    """A Mixtral file as convert_hf_to_gguf.py writes it: architecture `llama` with
    expert_count / expert_used_count, Q/K rows permuted, the router as ffn_gate_inp and
    each layer's w1 / w2 / w3 stacked as ffn_gate_exps / ffn_down_exps / ffn_up_exps."""
    _, model = tiny_models["mixtral-top2"]
    cfg = model.config
    inter = cfg.intermediate_size
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().numpy()
        if ".mlp.experts.gate_up_proj" in name:       # transformers 5 holds [E, 2I, H]
            state[_stacked(name, "w1")], state[_stacked(name, "w3")] = t[:, :inter], t[:, inter:]
        elif ".mlp.experts.down_proj" in name:
            state[_stacked(name, "w2")] = t
        else:
            state[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t

    def meta(w):
        common_meta(w, cfg)
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)

    path = tmp_path / "mixtral.gguf"
    write_gguf(path, "llama", model, GGUF_NAMES, meta, permuted_qk(cfg), state=state)
    # the window is not stored by llama.cpp for llama files: compare with no window
    ref = type(model)(type(cfg)(**{**cfg.to_dict(), "sliding_window": None})).eval()
    ref.load_state_dict(model.state_dict())
    check_against_transformers(path, tmp_path, "mixtral gguf", ref=ref)
    m = load_model(path)
    assert (m.family.name, m.config.architecture, m.config.num_local_experts,
            m.config.num_experts_per_tok) == ("mixtral", "MixtralForCausalLM", 4, 2)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    np.testing.assert_array_equal(m.tensor(name), state[_stacked(name, "w2")][3])


def _stacked(name: str, w: str) -> str:
    return STACKED.format(i=name.split(".")[2], w=w)
