"""Checkpoints read through the model registry: safetensors (single, sharded, fp16/bf16),
GGUF (names, Q/K un-permutation, config from metadata), and their errors."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf_files import check_against_transformers, common_meta, permuted_qk, write_gguf
from safetensors.torch import save_file

from llmc.errors import LlmcError
from llmc.model_zoo import load_model
from llmc.model_zoo.llama import GGUF_NAMES


def _state(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def test_single_file_reads_every_tensor_exactly(tiny_models):
    folder, model = tiny_models["llama-gqa"]
    ckpt = load_model(folder)
    ckpt.check_tensors()
    for name, ref in _state(model).items():
        np.testing.assert_array_equal(ckpt.tensor(name), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sharded_half_precision(tiny_models, tmp_path, dtype):
    src, model = tiny_models["qwen2-bias"]
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({k: state[k] for k in part}, tmp_path / file)
    index = {"weight_map": {k: f for f, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in ("config.json", "tokenizer.json"):
        (tmp_path / f).write_text((src / f).read_text())
    ckpt = load_model(tmp_path)
    ckpt.check_tensors()
    for name in names:
        np.testing.assert_array_equal(ckpt.tensor(name).astype(np.float32),
                                      state[name].float().numpy())


def _copy_with(src, dst, drop=(), add=None):
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    state.update(add or {})
    dst.mkdir()
    save_file(state, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_missing_and_unexpected_tensors_are_named(tiny_models, tmp_path):
    src, _ = tiny_models["llama-gqa"]
    gone = "model.layers.1.mlp.up_proj.weight"
    ckpt = load_model(_copy_with(src, tmp_path / "a", drop=[gone]))
    with pytest.raises(LlmcError, match=f"missing tensors: {gone}"):
        ckpt.check_tensors()
    extra = "model.layers.0.self_attn.q_norm.weight"
    ckpt = load_model(_copy_with(src, tmp_path / "b", add={extra: torch.ones(4)}))
    with pytest.raises(LlmcError, match=f"unexpected tensors: {extra}"):
        ckpt.check_tensors()
    with pytest.raises(LlmcError, match="has no tensor 'nope'"):
        ckpt.tensor("nope")


def test_folder_errors(tiny_models, tmp_path):
    with pytest.raises(LlmcError, match="does not exist"):
        load_model(tmp_path / "absent")
    (tmp_path / "config.json").write_text((tiny_models["llama-gqa"][0] / "config.json")
                                          .read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(LlmcError, match="no \\*.safetensors weights .*re-save them"):
        load_model(tmp_path)
    with pytest.raises(LlmcError, match="not a .gguf file"):
        load_model(tmp_path / "config.json")


def test_truncated_safetensors(tiny_models, tmp_path):
    src, _ = tiny_models["llama-gqa"]
    folder = _copy_with(src, tmp_path / "t")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    ckpt = load_model(folder)
    with pytest.raises(LlmcError, match="truncated"):
        for name in ckpt.names():
            ckpt.tensor(name)


# --- GGUF -----------------------------------------------------------------------------------

def _write_gguf(path, model, arch="llama"):
    """The tiny model as llama.cpp's convert_hf_to_gguf.py writes it: Q/K rows permuted."""
    cfg = model.config
    write_gguf(path, arch, model, GGUF_NAMES, lambda w: common_meta(w, cfg), permuted_qk(cfg))


def test_gguf_unpermutes_qk_and_reads_config(tiny_models, tmp_path):
    _, model = tiny_models["llama-gqa"]
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, model)
    ckpt = load_model(path)
    c = ckpt.config
    assert (c.architecture, c.num_hidden_layers, c.num_key_value_heads, c.head_dim) == (
        "LlamaForCausalLM", 2, 2, 16)
    assert not c.tie_word_embeddings
    ckpt.check_tensors()
    for name, ref in _state(model).items():
        np.testing.assert_array_equal(ckpt.tensor(name), ref)


def test_the_stop_tokens_of_every_place_a_checkpoint_names_them(tiny_models, tmp_path):
    """EOS from config.json and generation_config.json (Qwen's <|endoftext|>, Llama 3's
    <|eot_id|>); from a GGUF file, its EOS and llama.cpp's end-of-turn and end-of-message."""
    import shutil

    src, model = tiny_models["llama-gqa"]
    folder = tmp_path / "hf"
    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": 2}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 9]}))
    assert load_model(folder).config.eos_token_ids == (2, 7, 9)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    assert load_model(folder).config.eos_token_ids == (2,)

    path = tmp_path / "tiny.gguf"
    cfg = model.config
    write_gguf(path, "llama", model, GGUF_NAMES, lambda w: (
        common_meta(w, cfg), w.add_eot_token_id(5), w.add_eom_token_id(6)), permuted_qk(cfg))
    assert load_model(path).config.eos_token_ids == (2, 5, 6)


def test_the_sampling_settings_a_checkpoint_recommends(tiny_models, tmp_path):
    """generation_config.json's temperature, top_p, top_k, min_p and repetition_penalty (as
    vLLM reads them), or a GGUF file's general.sampling.* keys; nothing else."""
    import shutil

    src, model = tiny_models["llama-gqa"]
    folder = tmp_path / "hf"
    shutil.copytree(src, folder)
    assert load_model(folder).checkpoint.sampling == {}
    (folder / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_length": 99,
        "repetition_penalty": "high", "min_p": None}))
    assert load_model(folder).checkpoint.sampling == {"temperature": 0.6, "top_p": 0.95,
                                                      "top_k": 20}
    path = tmp_path / "tiny.gguf"
    cfg = model.config
    write_gguf(path, "llama", model, GGUF_NAMES, lambda w: (
        common_meta(w, cfg), w.add_float32("general.sampling.temp", 0.75),
        w.add_int32("general.sampling.top_k", 40),
        w.add_float32("general.sampling.penalty_repeat", 1.125)), permuted_qk(cfg))
    assert load_model(path).checkpoint.sampling == {"temperature": 0.75, "top_k": 40,
                                                    "repetition_penalty": 1.125}


def test_gguf_matches_transformers_gguf_loader(tiny_models, tmp_path):
    _, model = tiny_models["llama-gqa"]
    path = tmp_path / "llama.gguf"
    _write_gguf(path, model)
    check_against_transformers(path, tmp_path, "llama gguf")


def test_gguf_errors(tiny_models, tmp_path):
    _, model = tiny_models["llama-gqa"]
    for arch, message in [("mamba", "GGUF architecture 'mamba' is not supported"),
                          ("gpt2", "GGUF metadata of architecture 'gpt2' is incomplete")]:
        path = tmp_path / f"{arch}.gguf"
        w = gguf.GGUFWriter(path, arch)
        w.add_block_count(1)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        with pytest.raises(LlmcError, match=message):
            load_model(path)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(LlmcError, match="not a readable GGUF file"):
        load_model(bad)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_path, hf_smollm2):
    """Our dequantized, un-permuted weights and tokenizer equal transformers' GGUF loader."""
    ckpt = load_model(smollm2_path)
    ckpt.check_tensors()
    c = ckpt.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (
        30, 576, 9, 3, 64, 49152, 1e5, True)
    ref, hf = hf_smollm2
    state = hf.state_dict()
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight"]:
        np.testing.assert_array_equal(ckpt.tensor(name), state[name].numpy())
    tok = ckpt.tokenizer()
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token_ids == (2,)
    from tokenizers import Tokenizer

    ours = Tokenizer.from_str(tok.json)
    for text in ["The capital of France is", "naïve café 東京 12345\n\n  x", "<|im_start|>user"]:
        assert ours.encode(text).ids == ref(text)["input_ids"]
