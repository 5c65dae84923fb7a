"""Mixtral: the Mistral block with its MLP replaced by a sparse mixture of experts.

    block(h) = h + attention(rms_norm(h));  h = h + moe(rms_norm(h))
    p        = softmax(gate(x));  K = the num_experts_per_tok largest p_e
    moe(x)   = sum over e in K of  p_e / (sum over K of p)  *  w2_e(silu(w1_e(x)) * w3_e(x))

Attention is Mistral's (GQA, RoPE, optionally a sliding window). Each expert is a SwiGLU MLP
(w1 = gate, w3 = up, w2 = down); the router (`gate`) picks num_experts_per_tok of
num_local_experts per token. The graph (layers.routed_experts) routes with TopK and
ScatterElements and runs the experts as one batched GEMM over their stacked weights.
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
from llmc.model_zoo.llama import LAYER, LlamaConfig, LlamaGraph, gguf_config, parse_common

# ---- config --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixtralConfig(LlamaConfig):
    num_local_experts: int
    num_experts_per_tok: int


def parse_mixtral(hf: dict[str, Any]) -> MixtralConfig:
    base = parse_common(hf, attention_bias=False,
                        sliding_window=field(hf, "sliding_window", int, None) or None)
    experts = field(hf, "num_local_experts", int, 8)              # transformers' defaults
    top_k = field(hf, "num_experts_per_tok", int, 2)
    if not 1 <= top_k <= experts:
        raise LlmcError(f"config.json: num_experts_per_tok ({top_k}) should be between 1 and "
                        f"num_local_experts ({experts})")
    # router_jitter_noise scales hidden states in training only; router_aux_loss_coef and
    # output_router_logits are training settings too: none changes inference.
    return MixtralConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                         num_local_experts=experts, num_experts_per_tok=top_k)


# ---- checkpoint names -------------------------------------------------------------------------

MOE = f"{LAYER}.block_sparse_moe"
EXPERT = MOE + ".experts.{j}.{w}.weight"     # w1 gate [I, H], w2 down [H, I], w3 up [I, H]
# llama.cpp writes Mixtral as a `llama` file with the experts of a layer stacked in one
# tensor per projection ([E, I, H] / [E, H, I]); read under a stacked name, split by
# family.unstack_experts.
STACKED = MOE + ".experts.{w}.stacked"
GGUF_NAMES = {
    **{k: v for k, v in llama.GGUF_NAMES.items() if ".ffn_" not in k or "_norm" in k},
    "blk.{i}.ffn_gate_inp.weight": f"{MOE}.gate.weight",
    "blk.{i}.ffn_gate_exps.weight": STACKED.format(i="{i}", w="w1"),
    "blk.{i}.ffn_down_exps.weight": STACKED.format(i="{i}", w="w2"),
    "blk.{i}.ffn_up_exps.weight": STACKED.format(i="{i}", w="w3"),
}


def weight_names(c: MixtralConfig) -> list[str]:
    names = [n for n in llama.weight_names(c) if ".mlp." not in n]
    for i in range(c.num_hidden_layers):
        names.append(f"{MOE.format(i=i)}.gate.weight")
        names += [EXPERT.format(i=i, j=j, w=w) for j in range(c.num_local_experts)
                  for w in ("w1", "w2", "w3")]
    return names


def tensors(readers: Readers, c: MixtralConfig) -> Readers:
    return unstack_experts(readers, c.num_local_experts)


def _is_moe(meta: dict[str, Any]) -> bool:
    return bool(meta.get("llama.expert_count"))


def _gguf_mixtral(meta: dict[str, Any], names: set[str]) -> dict[str, Any]:
    hf = gguf_config("MixtralForCausalLM")(meta, names)
    hf["num_local_experts"] = int(meta["llama.expert_count"])
    hf["num_experts_per_tok"] = int(meta.get("llama.expert_used_count") or 2)
    return hf


# ---- the graph ------------------------------------------------------------------------------


class MixtralGraph(LlamaGraph):
    def mlp(self, x: str, p: str) -> str:
        c, moe = self.c, p.replace(".mlp", ".block_sparse_moe")
        h, inter, n = c.hidden_size, c.intermediate_size, c.num_local_experts
        experts = [f"{moe}.experts.{j}" for j in range(n)]
        # stacked as transformers 5 holds them, each expert [in, out]: gate_up [E, H, 2I]
        # (gate then up), down [E, I, H]
        gate_up = self.expert_weights(f"{moe}.experts.gate_up.weight",
                                      [[f"{e}.w1.weight", f"{e}.w3.weight"] for e in experts],
                                      (n, h, 2 * inter))
        down = self.expert_weights(f"{moe}.experts.down.weight",
                                   [[f"{e}.w2.weight"] for e in experts], (n, inter, h))
        return self.routed_experts(x, f"{moe}.gate", gate_up, down, n, inter,
                                   c.num_experts_per_tok, renormalise=True)


FAMILY = Family(
    name="mixtral",
    configs={"MixtralForCausalLM": parse_mixtral},
    weight_names=weight_names,
    build_graph=graph_builder(MixtralGraph),
    # Q/K rows permuted as for llama
    gguf={"llama": GGUFArch(_gguf_mixtral, GGUF_NAMES, llama.unpermute_qk, accepts=_is_moe)},
    tensors=tensors,
)
