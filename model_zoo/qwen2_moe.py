"""Qwen2-MoE: the Qwen2 block (q/k/v biases) with a mixture of experts beside a shared
expert in its sparse layers.

    block(h) = h + attention(rms_norm(h));  h = h + moe(rms_norm(h))
    moe(x)   = routed(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)
    routed(x) = sum over the top-k experts e of softmax(gate(x))_e * expert_e(x)

Experts and the shared expert are SwiGLU MLPs (moe_intermediate_size and
shared_expert_intermediate_size wide); the top-k weights are renormalised only with
norm_topk_prob. Layers listed in mlp_only_layers, and those off the decoder_sparse_step
grid, have a dense SwiGLU MLP (intermediate_size) instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llmc.config import field
from llmc.errors import LlmcError
from llmc.model_zoo import llama
from llmc.model_zoo.family import Family, GGUFArch, Readers, unstack_experts
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


@dataclass(frozen=True)
class Qwen2MoeConfig(LlamaConfig):
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    sparse_layers: tuple[bool, ...]     # one a layer: experts (True) or a dense MLP

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Qwen2MoeConfig":
        return dataclasses.replace(super().from_dict(d), sparse_layers=tuple(d["sparse_layers"]))


def parse_qwen2_moe(hf: dict[str, Any]) -> Qwen2MoeConfig:
    base = parse_common(hf, attention_bias=field(hf, "qkv_bias", bool, True),
                        sliding_window=qwen_window(hf))
    experts = field(hf, "num_experts", int, 60)                     # transformers' defaults
    top_k = field(hf, "num_experts_per_tok", int, 4)
    if not 1 <= top_k <= experts:
        raise LlmcError(f"config.json: num_experts_per_tok ({top_k}) should be between 1 and "
                        f"num_experts ({experts})")
    step = field(hf, "decoder_sparse_step", int, 1)
    dense = hf.get("mlp_only_layers") or []
    if step < 1 or not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
        raise LlmcError(f"config.json: decoder_sparse_step ({step}) should be at least 1 and "
                        f"mlp_only_layers a list of layer numbers, got {dense!r}")
    sparse = tuple(i not in dense and (i + 1) % step == 0
                   for i in range(base.num_hidden_layers))
    return Qwen2MoeConfig(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
        num_experts=experts, num_experts_per_tok=top_k,
        moe_intermediate_size=field(hf, "moe_intermediate_size", int, 1408),
        shared_expert_intermediate_size=field(hf, "shared_expert_intermediate_size", int,
                                              5632),
        norm_topk_prob=field(hf, "norm_topk_prob", bool, False),
        sparse_layers=sparse)


# ---- checkpoint names -------------------------------------------------------------------------

MLP = f"{LAYER}.mlp"
PROJ = ("gate", "up", "down")


def weight_names(c: Qwen2MoeConfig) -> list[str]:
    names = [n for n in llama.weight_names(c) if ".mlp." not in n]
    for i, sparse in enumerate(c.sparse_layers):
        p = MLP.format(i=i)
        if not sparse:
            names += [f"{p}.{x}_proj.weight" for x in PROJ]
            continue
        names += [f"{p}.gate.weight", f"{p}.shared_expert_gate.weight"]
        names += [f"{p}.shared_expert.{x}_proj.weight" for x in PROJ]
        names += [f"{p}.experts.{j}.{x}_proj.weight" for j in range(c.num_experts)
                  for x in PROJ]
    return names


# llama.cpp's qwen2moe: the llama names (a dense layer's ffn_gate/up/down too), the router,
# each layer's experts stacked one tensor a projection, and the shared expert (_shexp)
GGUF_NAMES = {
    **llama.GGUF_NAMES,
    "blk.{i}.ffn_gate_inp.weight": f"{MLP}.gate.weight",
    **{f"blk.{{i}}.ffn_{x}_exps.weight": f"{MLP}.experts.{x}_proj.stacked" for x in PROJ},
    "blk.{i}.ffn_gate_inp_shexp.weight": f"{MLP}.shared_expert_gate.weight",
    **{f"blk.{{i}}.ffn_{x}_shexp.weight": f"{MLP}.shared_expert.{x}_proj.weight" for x in PROJ},
}


def tensors(readers: Readers, c: Qwen2MoeConfig) -> Readers:
    return unstack_experts(readers, c.num_experts)


def _gguf_qwen2_moe(meta: dict[str, Any], names: set[str]) -> dict[str, Any]:
    hf = gguf_config("Qwen2MoeForCausalLM")(meta, names)
    n = hf["num_hidden_layers"]
    try:
        hf.update(num_experts=int(meta["qwen2moe.expert_count"]),
                  num_experts_per_tok=int(meta["qwen2moe.expert_used_count"]),
                  moe_intermediate_size=int(meta["qwen2moe.expert_feed_forward_length"]),
                  shared_expert_intermediate_size=int(
                      meta["qwen2moe.expert_shared_feed_forward_length"]),
                  norm_topk_prob=False,       # llama.cpp's qwen2moe does not renormalise
                  mlp_only_layers=[i for i in range(n)
                                   if f"{MLP.format(i=i)}.gate.weight" not in names])
    except KeyError as e:
        raise LlmcError(f"GGUF metadata of architecture 'qwen2moe' lacks {e.args[0]!r}") \
            from None
    return hf


def gguf_fix(name: str, w, c: Qwen2MoeConfig):
    """llama.cpp may store the shared expert's gate [1, H] as [H]."""
    return w.reshape(1, -1) if name.endswith("shared_expert_gate.weight") else w


# ---- the graph ------------------------------------------------------------------------------


class Qwen2MoeGraph(LlamaGraph):
    def mlp(self, x: str, p: str) -> str:
        c, g = self.c, self.g
        layer = int(p.split(".")[2])
        if not c.sparse_layers[layer]:
            return self.swiglu_mlp(x, p)
        h, inter, n = c.hidden_size, c.moe_intermediate_size, c.num_experts
        experts = [f"{p}.experts.{j}" for j in range(n)]
        gate_up = self.expert_weights(
            f"{p}.experts.gate_up.weight",
            [[f"{e}.gate_proj.weight", f"{e}.up_proj.weight"] for e in experts],
            (n, h, 2 * inter))
        down = self.expert_weights(f"{p}.experts.down.weight",
                                   [[f"{e}.down_proj.weight"] for e in experts], (n, inter, h))
        routed = self.routed_experts(x, f"{p}.gate", gate_up, down, n, inter,
                                     c.num_experts_per_tok, renormalise=c.norm_topk_prob)
        s, wide = f"{p}.shared_expert", c.shared_expert_intermediate_size
        shared = self.linear(
            self.swiglu(self.linear(x, f"{s}.gate_proj", wide, h),
                        self.linear(x, f"{s}.up_proj", wide, h)),
            f"{s}.down_proj", h, wide)
        share = g.Sigmoid(self.linear(x, f"{p}.shared_expert_gate", 1, h))      # [T, 1]
        return g.Add(routed, g.Mul(share, shared))


FAMILY = Family(
    name="qwen2_moe",
    configs={"Qwen2MoeForCausalLM": parse_qwen2_moe},
    weight_names=weight_names,
    build_graph=graph_builder(Qwen2MoeGraph),
    gguf={"qwen2moe": GGUFArch(_gguf_qwen2_moe, GGUF_NAMES, gguf_fix)},   # nothing permuted
    tensors=tensors,
)
