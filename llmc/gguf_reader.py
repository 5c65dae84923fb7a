"""GGUF files (llama.cpp's format) through the ``gguf`` package.

The file is memory mapped; each tensor is dequantized to float32 only when asked for. The
config comes from the GGUF metadata, the tokenizer (with its chat template) through
transformers' GGUF tokenizer converter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmc.checkpoint import Checkpoint, Tokenizer
from llmc.config import config_from_hf
from llmc.errors import LlmcError

# GGUF architecture -> (HF architecture, whether llama.cpp permuted Q/K rows for its rope).
_ARCHS = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("MistralForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
}

# llama.cpp tensor names -> HF names; {i} is the layer.
NAME_TABLE = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2:
        template = NAME_TABLE.get("blk.{i}." + ".".join(parts[2:]))
        return template.format(i=parts[1]) if template else None
    return NAME_TABLE.get(gguf_name)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert-time row permutation of Q/K (interleaved rope -> rotate-half)."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def open_gguf(path: Path) -> Checkpoint:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors on bad files
        raise LlmcError(f"{path} is not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise LlmcError(f"{path}: GGUF architecture {arch!r} is not supported "
                        f"(supported: {', '.join(_ARCHS)})")
    hf_arch, permuted = _ARCHS[arch]
    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise LlmcError(f"{path}: unexpected GGUF tensor {t.name!r}")
        tensors[name] = t
    hf = _hf_config(reader, arch, hf_arch, tied="lm_head.weight" not in tensors)
    config = config_from_hf(hf)

    def reader_for(name, t):
        def read() -> np.ndarray:
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest first
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            w = w.astype(np.float32, copy=False)
            if permuted and name.endswith("q_proj.weight"):
                w = _unpermute(w, config.num_attention_heads)
            elif permuted and name.endswith("k_proj.weight"):
                w = _unpermute(w, config.num_key_value_heads)
            return w
        return read

    readers = {n: reader_for(n, t) for n, t in tensors.items()}
    return Checkpoint(path, config, readers, lambda: _gguf_tokenizer(path, reader, config))


def _hf_config(reader, arch: str, hf_arch: str, tied: bool) -> dict:
    def key(k, default=None):
        return _field(reader, f"{arch}.{k}", default)

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    vocab = key("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return {
        "architectures": [hf_arch],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": tied,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }


def _gguf_tokenizer(path: Path, reader, config) -> Tokenizer:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise LlmcError(f"{path}: cannot build a tokenizer from the GGUF metadata ({e})") from None
    return Tokenizer(
        json=tok.backend_tokenizer.to_str(),
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token_id=config.bos_token_id,
        eos_token_ids=config.eos_token_ids,
    )
