"""Phi-3 (the 4k-context variants): the llama block with the checkpoint's projections fused.

    block(h) = h + attention(rms_norm(h));  h = h + swiglu_mlp(rms_norm(h))
    q, k, v  = split(qkv_proj(x), [Hq*D, Hkv*D, Hkv*D])
    gate, up = split(gate_up_proj(x), [I, I]);  mlp = down(silu(gate) * up)

The graph keeps the checkpoint's fused weights (one MatMul each, then a Split): after the
passes it has the same shape as a llama graph whose qkv_gemm / gate_up_gemm fired, without
concatenating anything. Phi-3-mini-4k applies a 2047-token sliding window to every layer.
The 128k variants scale RoPE with longrope ("su" in older configs), which is refused.
"""

from __future__ import annotations

from typing import Any

from llmc.config import field
from llmc.errors import LlmcError
from llmc.model_zoo.family import Family, GGUFArch
from llmc.model_zoo.layers import graph_builder
from llmc.model_zoo.llama import LAYER, LlamaConfig, LlamaGraph, gguf_config, parse_common

# ---- config --------------------------------------------------------------------------------


def parse_phi3(hf: dict[str, Any]) -> LlamaConfig:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type != "default":   # longrope / su: the 128k variants' two factor tables
        raise LlmcError(f"Phi-3 with rope scaling {rope_type!r} (the 128k-context variants) "
                        "is not supported; the 4k-context variants are")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:           # Phi-4-mini rotates 3/4 of each head
        raise LlmcError(f"Phi-3 with partial_rotary_factor {partial} is not supported "
                        "(RoPE over the whole head only)")
    return parse_common(hf, attention_bias=False,
                        sliding_window=field(hf, "sliding_window", int, None) or None)


# ---- checkpoint names -------------------------------------------------------------------------

GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": f"{LAYER}.input_layernorm.weight",
    "blk.{i}.attn_qkv.weight": f"{LAYER}.self_attn.qkv_proj.weight",
    "blk.{i}.attn_output.weight": f"{LAYER}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": f"{LAYER}.post_attention_layernorm.weight",
    "blk.{i}.ffn_up.weight": f"{LAYER}.mlp.gate_up_proj.weight",   # gate rows, then up
    "blk.{i}.ffn_down.weight": f"{LAYER}.mlp.down_proj.weight",
    # longrope's factor tables (128k variants): named here so that the config refuses the
    # model by its rope type rather than the reader by an unknown tensor
    "rope_factors_long.weight": "rope_factors_long",
    "rope_factors_short.weight": "rope_factors_short",
}


def weight_names(c: LlamaConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not c.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(c.num_hidden_layers):
        p = LAYER.format(i=i)
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                  f"{p}.self_attn.qkv_proj.weight", f"{p}.self_attn.o_proj.weight",
                  f"{p}.mlp.gate_up_proj.weight", f"{p}.mlp.down_proj.weight"]
    return names


def _gguf_phi3(meta: dict[str, Any], names: set[str]) -> dict[str, Any]:
    hf = gguf_config("Phi3ForCausalLM")(meta, names)
    # llama.cpp writes 0 for "no window" (Phi-4) and the model's window otherwise.
    hf["sliding_window"] = int(meta.get("phi3.attention.sliding_window") or 0) or None
    if "rope_factors_long" in names or meta.get("phi3.rope.scaling.original_context_length") \
            not in (None, hf["max_position_embeddings"]):
        hf["rope_scaling"] = {"type": "longrope"}   # llama.cpp's signs of a 128k variant
    return hf


# ---- the graph ------------------------------------------------------------------------------


class Phi3Graph(LlamaGraph):
    def qkv(self, x: str, p: str) -> tuple[str, str, str]:
        c = self.c
        qkv = self.linear(x, f"{p}.qkv_proj", c.q_size + 2 * c.kv_size, c.hidden_size)
        q, k, v = self.split(qkv, [c.q_size, c.kv_size, c.kv_size])
        return (self.heads(q, c.num_attention_heads), self.heads(k, c.num_key_value_heads),
                self.heads(v, c.num_key_value_heads))

    def mlp(self, x: str, p: str) -> str:
        c = self.c
        gate_up = self.linear(x, f"{p}.gate_up_proj", 2 * c.intermediate_size, c.hidden_size)
        gate, up = self.split(gate_up, [c.intermediate_size, c.intermediate_size])
        return self.linear(self.swiglu(gate, up), f"{p}.down_proj", c.hidden_size,
                           c.intermediate_size)


FAMILY = Family(
    name="phi3",
    configs={"Phi3ForCausalLM": parse_phi3},
    weight_names=weight_names,
    build_graph=graph_builder(Phi3Graph),
    gguf={"phi3": GGUFArch(_gguf_phi3, GGUF_NAMES)},   # llama.cpp permutes nothing for phi3
)
