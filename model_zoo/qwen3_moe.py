"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm before RoPE, explicit head_dim, no
q/k/v biases) over Qwen2-MoE's sparse layers without a shared expert.

    block(h)  = h + attention(rms_norm(h));  h = h + moe(rms_norm(h))
    moe(x)    = sum over the top-k experts e of w_e * expert_e(x)
    w         = softmax(gate(x)) at the top-k, divided by their sum when norm_topk_prob

Experts are SwiGLU MLPs moe_intermediate_size wide. Layers listed in mlp_only_layers, and
those off the decoder_sparse_step grid, have a dense SwiGLU MLP (intermediate_size) instead.
"""

from __future__ import annotations

from typing import Any

from llmc.config import architecture, field
from llmc.errors import LlmcError
from llmc.model_zoo import qwen3
from llmc.model_zoo.family import Family, GGUFArch
from llmc.model_zoo.layers import graph_builder
from llmc.model_zoo.llama import parse_common
from llmc.model_zoo.qwen2_moe import (
    SPARSE_GGUF_NAMES,
    SparseMoeConfig,
    SparseMoeGraph,
    gguf_sparse,
    parse_sparse,
    sparse_weight_names,
    tensors,
)
from llmc.model_zoo.qwen3 import Qwen3Graph

# ---- config --------------------------------------------------------------------------------


def parse_qwen3_moe(hf: dict[str, Any]) -> SparseMoeConfig:
    # transformers 5 slides every layer with use_sliding_window, 4.x only those from
    # max_window_layers: the versions disagree and no released Qwen3-MoE sets it
    if hf.get("use_sliding_window"):
        raise LlmcError(f"{architecture(hf)} with a sliding window (use_sliding_window) is "
                        "not supported")
    # transformers' Qwen3MoeConfig defaults head_dim to 128, not hidden_size / heads
    base = parse_common({"head_dim": 128, **hf},
                        attention_bias=field(hf, "attention_bias", bool, False),
                        sliding_window=None)
    return parse_sparse(hf, base, SparseMoeConfig, experts=128, top_k=8,  # transformers'
                        moe_intermediate_size=768)                           # defaults


# ---- checkpoint names -------------------------------------------------------------------------


def weight_names(c: SparseMoeConfig) -> list[str]:
    return sparse_weight_names(c, qwen3.weight_names(c))


GGUF_NAMES = {**qwen3.GGUF_NAMES, **SPARSE_GGUF_NAMES}


# ---- the graph ------------------------------------------------------------------------------


class Qwen3MoeGraph(Qwen3Graph, SparseMoeGraph):
    """Qwen3Graph's qkv (the q/k norms), SparseMoeGraph's mlp."""


FAMILY = Family(
    name="qwen3_moe",
    configs={"Qwen3MoeForCausalLM": parse_qwen3_moe},
    weight_names=weight_names,
    build_graph=graph_builder(Qwen3MoeGraph),
    # llama.cpp's qwen3moe always renormalises the top-k weights (it stores no key for it);
    # head_dim is attention.key_length; nothing is permuted
    gguf={"qwen3moe": GGUFArch(gguf_sparse("Qwen3MoeForCausalLM", norm_topk_prob=True),
                               GGUF_NAMES)},
    tensors=tensors,
)
