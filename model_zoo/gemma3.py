"""Gemma 3 (text): Gemma 2's layout with q/k norms and two RoPE frequencies.

    block(h) = h + post_attn_norm(attention(input_norm(h)))
               h + post_ffw_norm(geglu_mlp(pre_ffw_norm(h)))
    q = rope_l(norm_D(q_proj(x)));  k = rope_l(norm_D(k_proj(x)))

As Gemma 2: (1 + w) norm weights, GeGLU tanh, sqrt(hidden)-scaled embeddings,
query_pre_attn_scalar, tied embeddings. Unlike it: a per-head RMSNorm on q and k before
RoPE, sliding layers in a 5:1 pattern (`layer_types`) with their own RoPE theta
(`rope_local_base_freq`, 10k) while full layers use `rope_theta` (1M), and no soft-caps by
default. Only Gemma3ForCausalLM (the text model) is read; linear rope scaling (the 4B+
multimodal checkpoints) is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmc.config import field, rope_inv_freq
from llmc.errors import LlmcError
from llmc.model_zoo import gemma2
from llmc.model_zoo.family import Family, GGUFArch
from llmc.model_zoo.gemma2 import SLIDING, Gemma2Config, Gemma2Graph
from llmc.model_zoo.layers import graph_builder
from llmc.model_zoo.qwen3 import QK_NORM_GGUF_NAMES, qk_norm_weight_names

# ---- config --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gemma3Config(Gemma2Config):
    rope_local_theta: float               # the sliding layers' RoPE theta


def _rope_thetas(hf: dict[str, Any]) -> tuple[float, float]:
    """(full layers' theta, sliding layers' theta) from transformers 4.x keys (rope_theta,
    rope_local_base_freq, rope_scaling) or 5.x's rope_parameters per layer type."""
    params = hf.get("rope_parameters") or {}
    full = params.get("full_attention") or {}
    local = params.get("sliding_attention") or {}
    for kind, p in (("full", hf.get("rope_scaling") or full), ("sliding", local)):
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in (None, "default"):
            raise LlmcError(f"Gemma 3 with {rope_type!r} rope scaling on its {kind} layers is "
                            "not supported (the text-only checkpoints have none)")
    return (float(full.get("rope_theta", field(hf, "rope_theta", float, 1_000_000.0))),
            float(local.get("rope_theta",
                            field(hf, "rope_local_base_freq", float, 10_000.0))))


def parse_gemma3(hf: dict[str, Any]) -> Gemma3Config:
    n = field(hf, "num_hidden_layers")
    pattern = field(hf, "sliding_window_pattern", int, 6)   # transformers 4.x
    types = hf.get("layer_types") or [SLIDING if (i + 1) % pattern else gemma2.FULL
                                      for i in range(n)]
    theta, local = _rope_thetas(hf)
    # Gemma 2's reading of everything else, with Gemma 3's defaults
    flat = {k: v for k, v in hf.items() if k not in ("rope_parameters", "rope_scaling")}
    base = gemma2.parse_gemma2({"attn_logit_softcapping": None, "final_logit_softcapping": None,
                                **flat, "rope_theta": theta, "layer_types": types})
    return Gemma3Config(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                        rope_local_theta=local)


# ---- checkpoint names -------------------------------------------------------------------------

GGUF_NAMES = {**gemma2.GGUF_NAMES, **QK_NORM_GGUF_NAMES}


def weight_names(c: Gemma3Config) -> list[str]:
    return gemma2.weight_names(c) + qk_norm_weight_names(c.num_hidden_layers)


_gguf_gemma_common = gemma2.gemma_gguf_config("gemma3", "Gemma3ForCausalLM", 62)


def _gguf_gemma3(meta: dict[str, Any], names: set[str]) -> dict[str, Any]:
    hf = _gguf_gemma_common(meta, names)
    hf["rope_local_base_freq"] = 10_000.0   # llama.cpp fixes the local layers' theta
    if meta.get("gemma3.rope.scaling.type") not in (None, "none"):
        hf["rope_scaling"] = {"rope_type": meta["gemma3.rope.scaling.type"]}
    return hf


# ---- the graph ------------------------------------------------------------------------------


class Gemma3Graph(Gemma2Graph):
    def qkv(self, x: str, p: str) -> tuple[str, str, str]:
        q, k, v = super().qkv(x, p)
        d = self.c.head_dim
        return self.rms_norm(q, f"{p}.q_norm", d), self.rms_norm(k, f"{p}.k_norm", d), v

    def inv_freq(self, layer: int) -> np.ndarray:
        c = self.c
        if c.layer_types[layer] == SLIDING:
            return rope_inv_freq(c.head_dim, c.rope_local_theta, None)
        return c.inv_freq()


FAMILY = Family(
    name="gemma3",
    configs={"Gemma3ForCausalLM": parse_gemma3},
    weight_names=weight_names,
    build_graph=graph_builder(Gemma3Graph),
    gguf={"gemma3": GGUFArch(_gguf_gemma3, GGUF_NAMES, gemma2.gguf_fix)},
)
