"""Configs from config.json: the registry, transformers 4.x and 5.x rope keys, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmc.errors import LlmcError
from llmc.model_zoo import load_model
from llmc.model_zoo import parse_config as config_from_hf
from llmc.model_zoo.llama import LlamaConfig, weight_names

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def test_defaults_mha_and_derived_head_dim():
    c = config_from_hf(BASE)
    assert (c.num_key_value_heads, c.head_dim, c.rope_theta, c.rope_scaling) == (4, 16, 1e4, None)
    assert not c.tie_word_embeddings and not c.attention_bias


def test_rope_keys_of_transformers_4_and_5_agree():
    v4 = config_from_hf({**BASE, "rope_theta": 5e5, "rope_scaling": LLAMA3})
    v5 = config_from_hf({**BASE, "rope_parameters": {"rope_theta": 5e5, **LLAMA3}})
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scaling.factor == 8.0


@pytest.mark.parametrize("scaling", [None, LLAMA3])
def test_inv_freq_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "default", "rope_theta": 5e5, **(scaling or {})}
    hf = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=params)
    init = ROPE_INIT_FUNCTIONS.get(params["rope_type"])
    if init is None:  # "default" is computed by the rotary module itself
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        ref = LlamaRotaryEmbedding(hf).inv_freq
    else:
        ref, _ = init(hf, torch.device("cpu"))
    ours = config_from_hf({**hf.to_dict(), "architectures": ["LlamaForCausalLM"]}).inv_freq()
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)


def test_family_specifics():
    qwen = config_from_hf({**BASE, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen.attention_bias and qwen.sliding_window is None
    mistral = config_from_hf({**BASE, "architectures": ["MistralForCausalLM"],
                              "sliding_window": 4096, "num_key_value_heads": 2})
    assert mistral.sliding_window == 4096 and mistral.num_key_value_heads == 2
    tied = config_from_hf({**BASE, "tie_word_embeddings": True, "head_dim": 32,
                           "eos_token_id": [1, 2]})
    assert tied.tie_word_embeddings and tied.head_dim == 32 and tied.eos_token_ids == (1, 2)
    assert "lm_head.weight" not in weight_names(tied)
    assert "model.layers.1.self_attn.q_proj.bias" in weight_names(qwen)


def test_round_trip_through_the_engine_header():
    c = config_from_hf({**BASE, "rope_scaling": LLAMA3, "eos_token_id": 2})
    assert LlamaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("hf, message", [
    ({**BASE, "architectures": ["BloomForCausalLM"]},
     "unsupported architecture 'BloomForCausalLM'; supported: GPT2LMHeadModel, "
     "Gemma2ForCausalLM, Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, "
     "MixtralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen2MoeForCausalLM, "
     "Qwen3ForCausalLM, Qwen3MoeForCausalLM"),
    ({k: v for k, v in BASE.items() if k != "architectures"}, "no 'architectures' entry"),
    ({k: v for k, v in BASE.items() if k != "hidden_size"}, "lacks the key 'hidden_size'"),
    ({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({**BASE, "num_key_value_heads": 3}, "not a multiple of num_key_value_heads (3)"),
    # fields that change the math are honoured or refused, never ignored
    ({**BASE, "hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({**BASE, "hidden_size": "64"}, "hidden_size should be an integer, got '64'"),
    ({**BASE, "architectures": "LlamaForCausalLM"}, "architectures should be a list"),
    ({**BASE, "num_hidden_layers": 0}, "num_hidden_layers must be at least 1"),
    ({**BASE, "tie_word_embeddings": "yes"}, "tie_word_embeddings should be true or false"),
])
def test_clear_errors(hf, message):
    with pytest.raises(LlmcError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_hf(hf)


def test_folder_errors(tmp_path):
    with pytest.raises(LlmcError, match="has no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LlmcError, match="is not valid JSON"):
        load_model(tmp_path)


@pytest.mark.parametrize("cls", ["Qwen2Config", "Qwen3Config"])
@pytest.mark.parametrize("use,first", [(True, 0), (True, 2), (True, 1), (True, None),
                                       (False, 0)])
def test_qwen_sliding_windows_are_transformers_layer_types(cls, use, first):
    """Which layers slide is what transformers' own config says (layers >= max_window_layers
    with use_sliding_window): every layer -> the window, none -> None, some -> refused."""
    import transformers

    kw = dict(num_hidden_layers=2, use_sliding_window=use, sliding_window=12)
    if first is not None:
        kw["max_window_layers"] = first
    types = getattr(transformers, cls)(**kw).layer_types
    arch = cls.replace("Config", "ForCausalLM")
    hf = {**BASE, "architectures": [arch], **kw}
    for keys in (hf, {**hf, "layer_types": types}):   # 4.x keys, and 5.x's layer_types
        if len(set(types)) == 2:
            with pytest.raises(LlmcError, match="sliding window on some layers only"):
                config_from_hf(keys)
        else:
            want = 12 if types[0] == "sliding_attention" else None
            assert config_from_hf(keys).sliding_window == want, (keys, types)
