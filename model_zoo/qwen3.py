"""Qwen3 (dense): the llama block with a per-head RMSNorm on q and k before RoPE.

    block(h) = h + attention(rms_norm(h));  h = h + swiglu_mlp(rms_norm(h))
    q = rope(rms_norm_D(q_proj(x) as [T, Hq, D]));  k = rope(rms_norm_D(k_proj(x) as [T, Hkv, D]))

The q/k norms have weights [head_dim] and normalise each head over its D values. head_dim
is explicit in every Qwen3 config (128; not hidden / heads) and there are no q/k/v biases
unless attention_bias says so. Sliding windows (use_sliding_window, which no released Qwen3
sets) are read as for Qwen2: on every layer or none.
"""

from __future__ import annotations

from typing import Any

from llmc.config import field
from llmc.model_zoo import llama
from llmc.model_zoo.family import Family, GGUFArch
from llmc.model_zoo.layers import graph_builder
from llmc.model_zoo.llama import (
    LAYER,
    LlamaConfig,
    LlamaGraph,
    gguf_config,
    parse_common,
    qwen_window,
)

# ---- config --------------------------------------------------------------------------------


def parse_qwen3(hf: dict[str, Any]) -> LlamaConfig:
    # transformers' Qwen3Config defaults head_dim to 128, not hidden_size / heads
    return parse_common({"head_dim": 128, **hf},
                        attention_bias=field(hf, "attention_bias", bool, False),
                        sliding_window=qwen_window(hf))


# ---- checkpoint names -------------------------------------------------------------------------

# The per-head q/k norms (Gemma 3 has them too).
QK_NORM_GGUF_NAMES = {
    "blk.{i}.attn_q_norm.weight": f"{LAYER}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": f"{LAYER}.self_attn.k_norm.weight",
}
GGUF_NAMES = {**llama.GGUF_NAMES, **QK_NORM_GGUF_NAMES}


def qk_norm_weight_names(num_layers: int) -> list[str]:
    return [f"{LAYER.format(i=i)}.self_attn.{x}_norm.weight"
            for i in range(num_layers) for x in "qk"]


def weight_names(c: LlamaConfig) -> list[str]:
    return llama.weight_names(c) + qk_norm_weight_names(c.num_hidden_layers)


# ---- the graph ------------------------------------------------------------------------------


class Qwen3Graph(LlamaGraph):
    def qkv(self, x: str, p: str) -> tuple[str, str, str]:
        q, k, v = super().qkv(x, p)
        d = self.c.head_dim
        return self.rms_norm(q, f"{p}.q_norm", d), self.rms_norm(k, f"{p}.k_norm", d), v


FAMILY = Family(
    name="qwen3",
    configs={"Qwen3ForCausalLM": parse_qwen3},
    weight_names=weight_names,
    build_graph=graph_builder(Qwen3Graph),
    # llama.cpp writes head_dim as attention.key_length and permutes nothing for qwen3
    gguf={"qwen3": GGUFArch(gguf_config("Qwen3ForCausalLM"), GGUF_NAMES)},
)
