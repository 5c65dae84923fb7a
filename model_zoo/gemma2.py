"""Gemma 2: the llama layout with norms around both sub-blocks, GeGLU and soft-capping.

    h = embed(ids) * sqrt(hidden)
    block(h) = h + post_attn_norm(attention(input_norm(h)))
               h + post_ffw_norm(geglu_mlp(pre_ffw_norm(h)))
    logits = cap * tanh(lm_head(norm(h)) / cap)                  (final_logit_softcapping)

Every RMSNorm scales by (1 + w); attention scales q.k by query_pre_attn_scalar^-0.5, soft-caps
the scores (cap * tanh(scores / cap), attn_logit_softcapping) before the mask, and layers
alternate between a sliding window (even layers) and full attention (`layer_types`).
The MLP is down(gelu_tanh(gate(x)) * up(x)). Embeddings are tied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmc.config import field
from llmc.dtypes import np_dtype
from llmc.errors import LlmcError
from llmc.model_zoo import llama
from llmc.model_zoo.family import Family, GGUFArch
from llmc.model_zoo.layers import Step, graph_builder
from llmc.model_zoo.llama import LAYER, LlamaConfig, LlamaGraph, gguf_config, parse_common

SLIDING, FULL = "sliding_attention", "full_attention"

# ---- config --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gemma2Config(LlamaConfig):
    query_pre_attn_scalar: float
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    layer_types: tuple[str, ...]          # SLIDING or FULL, one a layer

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Gemma2Config":
        return dataclasses.replace(super().from_dict(d), layer_types=tuple(d["layer_types"]))


def _cap(hf: dict[str, Any], key: str, default: float) -> float | None:
    value = field(hf, key, float, None) if key in hf else default
    return value or None          # null or 0: no soft-cap


def parse_gemma2(hf: dict[str, Any]) -> Gemma2Config:
    if hf.get("use_bidirectional_attention"):
        raise LlmcError("Gemma 2 with use_bidirectional_attention is not supported (a "
                        "causal decoder only)")
    n = field(hf, "num_hidden_layers")
    # transformers' default: even layers slide, odd layers see everything
    types = hf.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(n)]
    if (not isinstance(types, list) or len(types) != n
            or not set(types) <= {SLIDING, FULL}):
        raise LlmcError(f"config.json: layer_types should list {n} of {SLIDING!r} and "
                        f"{FULL!r}, got {types!r}")
    window = field(hf, "sliding_window", int, None)
    if SLIDING in types and not window:
        raise LlmcError("config.json: sliding_attention layers need a sliding_window")
    defaults = {"head_dim": 256, "tie_word_embeddings": True}   # transformers' Gemma2Config
    base = parse_common({**defaults, **hf},
                        attention_bias=field(hf, "attention_bias", bool, False),
                        sliding_window=window if SLIDING in types else None,
                        activation=("hidden_activation", "gelu_pytorch_tanh"))
    if not base.tie_word_embeddings:
        raise LlmcError("Gemma 2 with an untied lm_head is not supported")
    return Gemma2Config(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
        query_pre_attn_scalar=field(hf, "query_pre_attn_scalar", float, 256.0),
        attn_logit_softcapping=_cap(hf, "attn_logit_softcapping", 50.0),
        final_logit_softcapping=_cap(hf, "final_logit_softcapping", 30.0),
        layer_types=tuple(types),
    )


# ---- checkpoint names -------------------------------------------------------------------------

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
         "post_feedforward_layernorm")
GGUF_NAMES = {
    **{k: v for k, v in llama.GGUF_NAMES.items()
       if not k.startswith("output.") and "_norm" not in k},
    "output_norm.weight": "model.norm.weight",
    "blk.{i}.attn_norm.weight": f"{LAYER}.input_layernorm.weight",
    "blk.{i}.post_attention_norm.weight": f"{LAYER}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": f"{LAYER}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": f"{LAYER}.post_feedforward_layernorm.weight",
}


def weight_names(c: Gemma2Config) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(c.num_hidden_layers):
        p = LAYER.format(i=i)
        names += [f"{p}.{n}.weight" for n in NORMS]
        names += [f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [f"{p}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if c.attention_bias:
            names += [f"{p}.self_attn.{x}_proj.bias" for x in "qkv"]
    return names


def gemma_gguf_config(arch: str, architecture: str, layers_27b: int):
    """An HF config from a `gemma2` / `gemma3` GGUF's metadata, in llama.cpp's Gemma
    conventions (Gemma 3 adds its own keys to this)."""
    def read(meta: dict[str, Any], names: set[str]) -> dict[str, Any]:
        hf = gguf_config(architecture)(meta, names)
        hf["hidden_activation"] = "gelu_pytorch_tanh"
        hf["sliding_window"] = meta.get(f"{arch}.attention.sliding_window")
        hf["attn_logit_softcapping"] = meta.get(f"{arch}.attn_logit_softcapping")
        hf["final_logit_softcapping"] = meta.get(f"{arch}.final_logit_softcapping")
        # llama.cpp keeps no query_pre_attn_scalar: it scales q by head_dim^-0.5, except in
        # the 27B (layers_27b layers), by (hidden / heads)^-0.5
        hf["query_pre_attn_scalar"] = (hf["hidden_size"] // hf["num_attention_heads"]
                                       if hf["num_hidden_layers"] == layers_27b
                                       else hf["head_dim"])
        return hf
    return read


def gguf_fix(name: str, w: np.ndarray, c: Gemma2Config) -> np.ndarray:
    """llama.cpp stores Gemma's norm weights as 1 + w; the graph adds the 1 itself."""
    return w - 1 if name.endswith("norm.weight") else w


# ---- the graph ------------------------------------------------------------------------------


class Gemma2Graph(LlamaGraph):
    def block(self, i: int, h: str, step: Step, cache: str) -> tuple[str, str]:
        g, p = self.g, LAYER.format(i=i)
        with g.scope("attn"):
            a, cache = self.attention(self.rms_norm(h, f"{p}.input_layernorm"), step, cache,
                                      f"{p}.self_attn")
            h = g.Add(h, self.rms_norm(a, f"{p}.post_attention_layernorm"))
        with g.scope("mlp"):
            m = self.mlp(self.rms_norm(h, f"{p}.pre_feedforward_layernorm"), f"{p}.mlp")
            h = g.Add(h, self.rms_norm(m, f"{p}.post_feedforward_layernorm"))
        return h, cache

    def mlp(self, x: str, p: str) -> str:
        c = self.c
        gate = self.linear(x, f"{p}.gate_proj", c.intermediate_size, c.hidden_size)
        up = self.linear(x, f"{p}.up_proj", c.intermediate_size, c.hidden_size)
        act = self.g.Mul(self.gelu_tanh(gate), up)
        return self.linear(act, f"{p}.down_proj", c.hidden_size, c.intermediate_size)

    def paged_attention(self, q, k, v, s, cache, scale=None, softcap=None):
        return super().paged_attention(q, k, v, s, cache, self.c.query_pre_attn_scalar ** -0.5,
                                       self.c.attn_logit_softcapping)

    def norm_weight(self, name: str, width: int) -> str:
        return self.weight(f"{name}.weight", (width,), convert=lambda w: 1 + w)

    def embed(self, table: str, ids: str, step: Step) -> str:
        # HF multiplies by sqrt(hidden) rounded to the model's dtype
        dt = np_dtype(self.dtype)
        root = np.asarray(np.sqrt(self.c.hidden_size)).astype(self.rounding or dt)
        scale = self.g.const(root.astype(dt), dt)
        return self.g.Mul(self.g.Gather(table, ids), scale)

    def window(self, layer: int) -> int:
        return self.c.sliding_window if self.c.layer_types[layer] == SLIDING else 0

    def final_logits(self, logits: str) -> str:
        cap = self.c.final_logit_softcapping
        if not cap:
            return logits
        g, k = self.g, self.g.const(cap, np.float32)
        return g.Mul(g.Tanh(g.Div(logits, k)), k)


FAMILY = Family(
    name="gemma2",
    configs={"Gemma2ForCausalLM": parse_gemma2},
    weight_names=weight_names,
    build_graph=graph_builder(Gemma2Graph),
    gguf={"gemma2": GGUFArch(gemma_gguf_config("gemma2", "Gemma2ForCausalLM", 46), GGUF_NAMES,
                             gguf_fix)},
)
