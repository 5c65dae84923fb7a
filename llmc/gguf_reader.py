"""GGUF files (llama.cpp's format) through the ``gguf`` package.

The file is memory mapped; each tensor is dequantized to float32 only when asked for. The
config comes from the GGUF metadata, the tokenizer (with its chat template) through
transformers' GGUF tokenizer converter.
"""

from __future__ import annotations

import struct
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


class GGUFFile:
    """A lean GGUF reader: metadata as plain Python values, tensors as memory-mapped bytes.

    (gguf.GGUFReader keeps a numpy view per metadata array element, which for a 49k-token
    vocabulary costs more memory than a small model's weights.)
    """

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                10: "<Q", 11: "<q", 12: "<d"}

    def __init__(self, path: Path):
        import gguf

        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        self._pos = 0
        if self._take(4) != b"GGUF":
            raise ValueError("bad magic")
        version, n_tensors, n_kv = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (llmc reads 2 and 3)")
        self.fields = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            infos.append((name, tuple(reversed(dims)), self._unpack("<I"), self._unpack("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        data_start = self._pos + (-self._pos % align)
        self.tensors = {}
        for name, shape, qtype, offset in infos:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            row_bytes = shape[-1] // block * type_size
            start = data_start + offset
            nbytes = row_bytes * int(np.prod(shape[:-1], dtype=np.int64))
            if start + nbytes > self._map.size:
                raise ValueError(f"truncated: tensor {name} lies past the end of the file")
            self.tensors[name] = (shape, gguf.GGMLQuantizationType(qtype), start, row_bytes)

    def _take(self, n: int) -> bytes:
        if self._pos + n > self._map.size:
            raise ValueError("truncated metadata")
        b = self._map[self._pos:self._pos + n].tobytes()
        self._pos += n
        return b

    def _unpack(self, fmt: str):
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        return self._take(self._unpack("<Q")).decode("utf-8", errors="replace")

    def _value(self, vtype: int):
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, n = self._unpack("<I"), self._unpack("<Q")
            if etype in self._SCALARS:  # one read for the whole numeric array
                fmt = self._SCALARS[etype]
                return list(struct.unpack(f"<{n}{fmt[1]}", self._take(n * struct.calcsize(fmt))))
            return [self._value(etype) for _ in range(n)]
        if vtype not in self._SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self._unpack(self._SCALARS[vtype])

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def dequantize(self, name: str) -> np.ndarray:
        """One tensor as float32, in HF (row-major, slowest dim first) shape."""
        import gguf

        shape, qtype, start, row_bytes = self.tensors[name]
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        raw = self._map[start:start + rows * row_bytes].reshape(rows, row_bytes)
        if qtype == gguf.GGMLQuantizationType.BF16:
            w = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            w = gguf.quants.dequantize(raw, qtype)
        return w.reshape(shape).astype(np.float32, copy=False)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert-time row permutation of Q/K (interleaved rope -> rotate-half)."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def open_gguf(path: Path) -> Checkpoint:
    try:
        reader = GGUFFile(path)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise LlmcError(f"{path} is not a readable GGUF file ({e})") from None
    arch = reader.get("general.architecture")
    if arch not in _ARCHS:
        raise LlmcError(f"{path}: GGUF architecture {arch!r} is not supported "
                        f"(supported: {', '.join(_ARCHS)})")
    hf_arch, permuted = _ARCHS[arch]
    tensors = {}
    for gguf_name in reader.tensors:
        name = _hf_name(gguf_name)
        if name is None:
            raise LlmcError(f"{path}: unexpected GGUF tensor {gguf_name!r}")
        tensors[name] = gguf_name
    hf = _hf_config(reader, arch, hf_arch, tied="lm_head.weight" not in tensors)
    config = config_from_hf(hf)

    def reader_for(name, gguf_name):
        def read() -> np.ndarray:
            w = reader.dequantize(gguf_name)
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
        return reader.get(f"{arch}.{k}", default)

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    vocab = key("vocab_size") or len(reader.get("tokenizer.ggml.tokens", ()))
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
        "bos_token_id": reader.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": reader.get("tokenizer.ggml.eos_token_id"),
    }


def _gguf_tokenizer(path: Path, reader: GGUFFile, config) -> Tokenizer:
    return Tokenizer(
        json=_tokenizer_json(path, reader),
        chat_template=reader.get("tokenizer.chat_template"),
        bos_token_id=config.bos_token_id,
        eos_token_ids=config.eos_token_ids,
    )


def _tokenizer_json(path: Path, reader: GGUFFile) -> str:
    """The HF tokenizers JSON that transformers' GGUF converter makes from the metadata.

    The converter proper is called on the metadata we already hold; transformers' own GGUF
    loading path (AutoTokenizer) imports torch and re-reads the file, so it is the fallback.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:
        convert_gguf_tokenizer = None
    try:
        if convert_gguf_tokenizer is not None:
            renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
            meta = {name: reader.get(f"tokenizer.{key}") for key, name in renames.items()
                    if f"tokenizer.{key}" in reader.fields}
            backend, _ = convert_gguf_tokenizer(reader.get("general.architecture"), meta)
            return backend.to_str()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return tok.backend_tokenizer.to_str()
    except Exception as e:
        raise LlmcError(f"{path}: cannot build a tokenizer from the GGUF metadata ({e})") from None
