"""The llama family: Llama, Mistral and Qwen2 share one block and differ only in config.

    block(h) = h + attention(rms_norm(h));  block(h) = h + swiglu_mlp(rms_norm(h))

Attention: q/k/v projections (Qwen2: with biases), rotate-half RoPE on q and k, GQA over the
paged KV cache (Mistral, Qwen2: optionally a sliding window), o projection.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmc.config import (
    RopeScaling,
    architecture,
    eos_ids,
    field,
    gguf_stop_ids,
    rope_inv_freq,
    rope_settings,
)
from llmc.errors import LlmcError
from llmc.model_zoo.family import Family, GGUFArch
from llmc.model_zoo.layers import DecoderGraph, Step, graph_builder

# ---- config --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim/2], with llama3 scaling folded in (float64)."""
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)


def parse_common(hf: dict[str, Any], *, attention_bias: bool, sliding_window,
                 activation: tuple[str, str] = ("hidden_act", "silu")) -> LlamaConfig:
    """The fields every llama-shaped family (Phi-3, Qwen3, Gemma 2 too) reads the same way.
    activation: the config key of the MLP's activation and the one value the block has."""
    key, want = activation
    act = hf.get(key, want)
    if act != want:   # the block's MLP is built for one activation; another is another model
        raise LlmcError(f"{key} {act!r} is not supported for {architecture(hf)} "
                        f"(supported: {want})")
    heads = field(hf, "num_attention_heads")
    hidden = field(hf, "hidden_size")
    theta, scaling = rope_settings(hf)
    cfg = LlamaConfig(
        architecture=architecture(hf),
        vocab_size=field(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=field(hf, "intermediate_size"),
        num_hidden_layers=field(hf, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=field(hf, "num_key_value_heads", int, heads),
        head_dim=field(hf, "head_dim", int, hidden // heads if heads else 0),
        rms_norm_eps=field(hf, "rms_norm_eps", float, 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=field(hf, "max_position_embeddings", int, 2048),
        tie_word_embeddings=field(hf, "tie_word_embeddings", bool, False),
        attention_bias=attention_bias,
        mlp_bias=field(hf, "mlp_bias", bool, False),
        sliding_window=sliding_window,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
    )
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim"):
        if getattr(cfg, name) < 1:
            raise LlmcError(f"config.json: {name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise LlmcError(f"num_attention_heads ({cfg.num_attention_heads}) is not a multiple of "
                        f"num_key_value_heads ({cfg.num_key_value_heads})")
    return cfg


def parse_llama(hf):
    return parse_common(hf, attention_bias=field(hf, "attention_bias", bool, False),
                        sliding_window=None)


def parse_mistral(hf):
    return parse_common(hf, attention_bias=False,
                        sliding_window=field(hf, "sliding_window", int, None) or None)


def parse_qwen2(hf):
    return parse_common(hf, attention_bias=True, sliding_window=qwen_window(hf))


def qwen_window(hf: dict[str, Any]) -> int | None:
    """Qwen2 / Qwen3: with use_sliding_window, layers i >= max_window_layers slide (or those
    layer_types names). The window of every layer, or None when no layer slides; a window on
    some layers only is refused."""
    n = field(hf, "num_hidden_layers")
    window = field(hf, "sliding_window", int, None) if hf.get("use_sliding_window") else None
    if hf.get("layer_types"):   # transformers 5.x writes the outcome
        sliding = [t == "sliding_attention" for t in hf["layer_types"]]
    else:
        first = field(hf, "max_window_layers", int, 28)   # transformers' default
        sliding = [bool(window) and i >= first for i in range(n)]
    if not any(sliding):
        return None
    if not all(sliding) or not window:
        raise LlmcError(f"{architecture(hf)} with a sliding window on some layers only is "
                        "not supported")
    return window


# ---- checkpoint names -------------------------------------------------------------------------

# HF names of one decoder layer, and the llama.cpp names they are stored under in GGUF files.
LAYER = "model.layers.{i}"
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": f"{LAYER}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": f"{LAYER}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": f"{LAYER}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": f"{LAYER}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": f"{LAYER}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": f"{LAYER}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": f"{LAYER}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": f"{LAYER}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": f"{LAYER}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": f"{LAYER}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": f"{LAYER}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": f"{LAYER}.mlp.down_proj.weight",
}


def weight_names(c: LlamaConfig) -> list[str]:
    """Checkpoint tensors this config needs, in HF naming."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not c.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(c.num_hidden_layers):
        p = LAYER.format(i=i)
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
        names += [f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [f"{p}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if c.attention_bias:
            names += [f"{p}.self_attn.{x}_proj.bias" for x in "qkv"]
        if c.mlp_bias:
            names += [f"{p}.mlp.{x}_proj.bias" for x in ("gate", "up", "down")]
    return names


def gguf_config(hf_architecture: str):
    """GGUF metadata -> config.json keys, for the llama-shaped architectures."""
    def config(meta: dict[str, Any], names: set[str]) -> dict[str, Any]:
        arch = meta["general.architecture"]

        def key(k, default=None):
            return meta.get(f"{arch}.{k}", default)

        try:
            heads = int(key("attention.head_count"))
            hidden = int(key("embedding_length"))
            return {
                "architectures": [hf_architecture],
                "vocab_size": int(key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))),
                "hidden_size": hidden,
                "intermediate_size": int(key("feed_forward_length")),
                "num_hidden_layers": int(key("block_count")),
                "num_attention_heads": heads,
                "num_key_value_heads": int(key("attention.head_count_kv", heads)),
                "head_dim": int(key("attention.key_length", hidden // heads)),
                "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
                "rope_theta": float(key("rope.freq_base", 10000.0)),
                "max_position_embeddings": int(key("context_length", 2048)),
                "tie_word_embeddings": "lm_head.weight" not in names,
                "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
                "eos_token_id": gguf_stop_ids(meta),
            }
        except (TypeError, ValueError) as e:   # a key llama.cpp always writes is missing
            raise LlmcError(f"GGUF metadata of architecture {arch!r} is incomplete ({e})") from None
    return config


def unpermute_qk(name: str, w: np.ndarray, c: LlamaConfig) -> np.ndarray:
    """Undo llama.cpp's convert-time row permutation of Q/K (interleaved rope -> rotate-half)."""
    if name.endswith("q_proj.weight"):
        n_head = c.num_attention_heads
    elif name.endswith("k_proj.weight"):
        n_head = c.num_key_value_heads
    else:
        return w
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


# ---- the graph ------------------------------------------------------------------------------


class LlamaGraph(DecoderGraph):
    """The llama block. Families that differ only in how q/k/v or the MLP are computed
    (Phi-3's fused projections, Qwen3's q/k norms) override `qkv` or `mlp`."""

    def block(self, i: int, h: str, step: Step, cache: str) -> tuple[str, str]:
        g, p = self.g, LAYER.format(i=i)
        with g.scope("attn"):
            a, cache = self.attention(self.rms_norm(h, f"{p}.input_layernorm"), step, cache,
                                      f"{p}.self_attn")
        h = g.Add(h, a)
        with g.scope("mlp"):
            x = self.rms_norm(h, f"{p}.post_attention_layernorm")
            h = g.Add(h, self.mlp(x, f"{p}.mlp"))
        return h, cache

    def attention(self, x: str, s: Step, cache: str, p: str) -> tuple[str, str]:
        q, k, v = self.qkv(x, p)
        out, cache = self.paged_attention(self.rope(q, s), self.rope(k, s), v, s, cache)
        return self.linear(out, f"{p}.o_proj", self.c.hidden_size, self.c.q_size), cache

    def qkv(self, x: str, p: str) -> tuple[str, str, str]:
        """q [T, Hq, D], k and v [T, Hkv, D], before RoPE."""
        c, b = self.c, self.c.attention_bias
        q = self.heads(self.linear(x, f"{p}.q_proj", c.q_size, c.hidden_size, b),
                       c.num_attention_heads)
        k = self.heads(self.linear(x, f"{p}.k_proj", c.kv_size, c.hidden_size, b),
                       c.num_key_value_heads)
        v = self.heads(self.linear(x, f"{p}.v_proj", c.kv_size, c.hidden_size, b),
                       c.num_key_value_heads)
        return q, k, v

    def mlp(self, x: str, p: str) -> str:
        return self.swiglu_mlp(x, p, self.c.mlp_bias)


build_graph = graph_builder(LlamaGraph)


FAMILY = Family(
    name="llama",
    configs={"LlamaForCausalLM": parse_llama, "MistralForCausalLM": parse_mistral,
             "Qwen2ForCausalLM": parse_qwen2},
    weight_names=weight_names,
    build_graph=build_graph,
    gguf={
        # llama.cpp permutes Q/K rows of llama and mistral for its interleaved rope; not qwen2.
        "llama": GGUFArch(gguf_config("LlamaForCausalLM"), GGUF_NAMES, unpermute_qk,
                          accepts=lambda meta: not meta.get("llama.expert_count")),  # Mixtral
        "mistral": GGUFArch(gguf_config("MistralForCausalLM"), GGUF_NAMES, unpermute_qk),
        "qwen2": GGUFArch(gguf_config("Qwen2ForCausalLM"), GGUF_NAMES),
    },
)
