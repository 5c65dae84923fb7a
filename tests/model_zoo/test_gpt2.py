"""GPT-2: config parsing and its refusals, the original checkpoints' tensor names, and GGUF
files (llama.cpp's `gpt2`: Conv1D weights stored transposed, the tied head stored again as
output.weight) read to the logits of transformers' GGUF loader. Parity with HF, the pass
counts, the TensorRT-RTX build and the cuda backend's refusal are in the shared
per-variant tests (kind "gpt2-learned-pos")."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf_files import check_against_transformers, write_gguf
from safetensors.numpy import save_file

from llmc.errors import LlmcError
from llmc.model_zoo import load_model, parse_config
from llmc.model_zoo.gpt2 import CONV1D, GGUF_NAMES, GPT2Config, weight_names

# openai-community/gpt2's config.json, without the task-specific parameters.
GPT2_SMALL = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
              "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1,
              "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
              "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
              "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "vocab_size": 50257}


def test_small_config_and_generic_keys():
    c = parse_config(GPT2_SMALL)
    assert isinstance(c, GPT2Config)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.max_position_embeddings,
            c.tie_word_embeddings, c.eos_token_ids) == (768, 3072, 12, 12, 12, 64, 1024,
                                                        True, (50256,))
    # the names transformers maps n_* to, as another writer may spell them
    generic = {k: v for k, v in GPT2_SMALL.items()
               if k not in ("n_embd", "n_head", "n_layer", "n_positions")}
    generic.update(hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                   max_position_embeddings=1024, n_inner=None)
    assert parse_config(generic) == c
    assert GPT2Config.from_dict(c.to_dict()) == c          # the engine header's copy
    names = weight_names(c)
    assert "transformer.h.11.mlp.c_proj.bias" in names and "lm_head.weight" not in names
    assert len(names) == 4 + 12 * 12


@pytest.mark.parametrize("change,message", [
    ({"activation_function": "gelu"}, "activation_function 'gelu' is not supported for "
     "GPT-2 \\(supported: gelu_new, gelu_pytorch_tanh\\)"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"scale_attn_weights": False}, "scale_attn_weights false"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"n_embd": 770}, "n_embd \\(770\\) is not a multiple of n_head \\(12\\)"),
    ({"n_layer": "12"}, "n_layer should be an integer"),
])
def test_unsupported_variants_are_refused_by_name(change, message):
    with pytest.raises(LlmcError, match=message):
        parse_config({**GPT2_SMALL, **change})


def test_original_checkpoint_names(tmp_path, tiny_models):
    """openai-community/gpt2's safetensors name tensors without `transformer.` and keep the
    causal-mask buffers: read under the names the model uses, buffers dropped."""
    folder, model = tiny_models["gpt2-learned-pos"]
    tensors = {k.removeprefix("transformer."): v.detach().numpy().copy()
               for k, v in model.state_dict().items() if k != "lm_head.weight"}
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, n, n), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    old = tmp_path / "old"
    old.mkdir()
    save_file(tensors, old / "model.safetensors")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (old / f).write_bytes((folder / f).read_bytes())
    m = load_model(old)
    m.check_tensors()
    name = "transformer.h.1.attn.c_attn.weight"
    np.testing.assert_array_equal(m.tensor(name), model.state_dict()[name].numpy())


def test_gguf_matches_transformers_gguf_loader(tmp_path, make_tiny):
    """A gpt2 file as convert_hf_to_gguf.py writes it: Conv1D weights transposed to
    [out, in], the embedding stored again as output.weight, feed_forward_length 4 * n_embd,
    context_length n_positions. transformers' loader reads context_length as n_ctx (its
    n_positions stays 1024) and the vocabulary size from the token list, so the model has
    1024 positions, the default MLP width and a token list."""
    model = make_tiny("gpt2-learned-pos", tmp_path / "hf", n_inner=None,
                      max_position_embeddings=1024)
    cfg = model.config

    def meta(w):
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        w.add_token_list([f"w{i}" for i in range(cfg.vocab_size)])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)

    def convert(name, t):
        conv = name.endswith(".weight") and any(f".{m}." in name for m in CONV1D)
        return np.ascontiguousarray(t.T) if conv else t

    wte = model.state_dict()["transformer.wte.weight"].numpy()
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, "gpt2", model, GGUF_NAMES, meta, convert, extra={"output.weight": wte})
    check_against_transformers(path, tmp_path, "gpt2 gguf")
    ckpt = load_model(path)
    c = ckpt.config
    assert (c.architecture, c.intermediate_size, c.max_position_embeddings,
            c.vocab_size) == ("GPT2LMHeadModel", 256, 1024, 128)
    name = "transformer.h.1.mlp.c_fc.weight"
    np.testing.assert_array_equal(ckpt.tensor(name), model.state_dict()[name].numpy())


def test_config_json_is_what_transformers_writes(tiny_models):
    """The tiny model's config.json (written by transformers) parses to its own values."""
    folder, model = tiny_models["gpt2-learned-pos"]
    c = parse_config(json.loads((folder / "config.json").read_text()))
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.max_position_embeddings) == (64, 96, 4, 256)
