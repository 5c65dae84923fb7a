"""Qwen2-MoE: the Qwen2 block (q/k/v biases) with a mixture of experts beside a shared
expert in its sparse layers.

    block(h) = h + attention(rms_norm(h));  h = h + moe(rms_norm(h))
    moe(x)   = routed(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)
    routed(x) = sum over the top-k experts e of softmax(gate(x))_e * expert_e(x)

Experts and the shared expert are SwiGLU MLPs (moe_intermediate_size and
shared_expert_intermediate_size wide); the top-k weights are renormalised only with
norm_topk_prob. Layers listed in mlp_only_layers, and those off the decoder_sparse_step
grid, have a dense SwiGLU MLP (intermediate_size) instead.

Those sparse layers without the shared expert (SparseMoeConfig, parse_sparse,
sparse_weight_names, SPARSE_GGUF_NAMES, gguf_sparse, SparseMoeGraph) are Qwen3-MoE's too.
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
class SparseMoeConfig(LlamaConfig):
    """Qwen's sparse layers (Qwen2-MoE, Qwen3-MoE): routed experts on the layers that
    sparse_layers marks, a dense SwiGLU MLP on the others."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    sparse_layers: tuple[bool, ...]     # one a layer: experts (True) or a dense MLP

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparseMoeConfig":
        return dataclasses.replace(super().from_dict(d), sparse_layers=tuple(d["sparse_layers"]))


@dataclass(frozen=True)
class Qwen2MoeConfig(SparseMoeConfig):
    shared_expert_intermediate_size: int


def parse_sparse(hf: dict[str, Any], base: LlamaConfig, cls: type, *, experts: int,
                 top_k: int, moe_intermediate_size: int, **more) -> Any:
    """`cls` (a SparseMoeConfig) of the attention fields in `base` and the sparse layers'
    fields of config.json; experts, top_k, moe_intermediate_size: transformers' defaults
    for the family; more: the family's own fields."""
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts (an attribute_map)
    key = "num_local_experts" if "num_local_experts" in hf else "num_experts"
    experts = field(hf, key, int, experts)
    top_k = field(hf, "num_experts_per_tok", int, top_k)
    if not 1 <= top_k <= experts:
        raise LlmcError(f"config.json: num_experts_per_tok ({top_k}) should be between 1 and "
                        f"{key} ({experts})")
    step = field(hf, "decoder_sparse_step", int, 1)
    dense = hf.get("mlp_only_layers") or []
    if step < 1 or not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
        raise LlmcError(f"config.json: decoder_sparse_step ({step}) should be at least 1 and "
                        f"mlp_only_layers a list of layer numbers, got {dense!r}")
    sparse = tuple(i not in dense and (i + 1) % step == 0
                   for i in range(base.num_hidden_layers))
    return cls(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
        num_experts=experts, num_experts_per_tok=top_k,
        moe_intermediate_size=field(hf, "moe_intermediate_size", int, moe_intermediate_size),
        norm_topk_prob=field(hf, "norm_topk_prob", bool, False),
        sparse_layers=sparse, **more)


def parse_qwen2_moe(hf: dict[str, Any]) -> Qwen2MoeConfig:
    base = parse_common(hf, attention_bias=field(hf, "qkv_bias", bool, True),
                        sliding_window=qwen_window(hf))
    return parse_sparse(hf, base, Qwen2MoeConfig, experts=60, top_k=4,   # transformers'
                        moe_intermediate_size=1408,                         # defaults
                        shared_expert_intermediate_size=field(
                            hf, "shared_expert_intermediate_size", int, 5632))


# ---- checkpoint names -------------------------------------------------------------------------

MLP = f"{LAYER}.mlp"
PROJ = ("gate", "up", "down")


def sparse_weight_names(c: SparseMoeConfig, names: list[str]) -> list[str]:
    """`names` (a dense model's) with each sparse layer's MLP replaced by its router and
    experts."""
    names = [n for n in names if ".mlp." not in n]
    for i, sparse in enumerate(c.sparse_layers):
        p = MLP.format(i=i)
        if not sparse:
            names += [f"{p}.{x}_proj.weight" for x in PROJ]
            continue
        names.append(f"{p}.gate.weight")
        names += [f"{p}.experts.{j}.{x}_proj.weight" for j in range(c.num_experts)
                  for x in PROJ]
    return names


def weight_names(c: Qwen2MoeConfig) -> list[str]:
    names = sparse_weight_names(c, llama.weight_names(c))
    for i in (i for i, sparse in enumerate(c.sparse_layers) if sparse):
        p = MLP.format(i=i)
        names.append(f"{p}.shared_expert_gate.weight")
        names += [f"{p}.shared_expert.{x}_proj.weight" for x in PROJ]
    return names


# llama.cpp's qwen2moe and qwen3moe: the router, each layer's experts stacked one tensor a
# projection (a dense layer has the llama names ffn_gate/up/down)
SPARSE_GGUF_NAMES = {
    "blk.{i}.ffn_gate_inp.weight": f"{MLP}.gate.weight",
    **{f"blk.{{i}}.ffn_{x}_exps.weight": f"{MLP}.experts.{x}_proj.stacked" for x in PROJ},
}
# qwen2moe: and the shared expert (_shexp)
GGUF_NAMES = {
    **llama.GGUF_NAMES,
    **SPARSE_GGUF_NAMES,
    "blk.{i}.ffn_gate_inp_shexp.weight": f"{MLP}.shared_expert_gate.weight",
    **{f"blk.{{i}}.ffn_{x}_shexp.weight": f"{MLP}.shared_expert.{x}_proj.weight" for x in PROJ},
}


def tensors(readers: Readers, c: SparseMoeConfig) -> Readers:
    return unstack_experts(readers, c.num_experts)


def gguf_sparse(hf_architecture: str, norm_topk_prob: bool, **more: str):
    """GGUF metadata -> config.json keys for llama.cpp's Qwen mixtures of experts: the
    llama-shaped keys, the experts' (and `more`: config key -> metadata key), dense layers
    where a layer has no router, and norm_topk_prob as llama.cpp's graph for the
    architecture fixes it (it stores no key for it)."""
    llama_keys = gguf_config(hf_architecture)

    def config(meta: dict[str, Any], names: set[str]) -> dict[str, Any]:
        hf = llama_keys(meta, names)
        arch, n = meta["general.architecture"], hf["num_hidden_layers"]
        keys = {"num_experts": "expert_count", "num_experts_per_tok": "expert_used_count",
                "moe_intermediate_size": "expert_feed_forward_length", **more}
        try:
            hf.update({k: int(meta[f"{arch}.{v}"]) for k, v in keys.items()})
        except KeyError as e:
            raise LlmcError(f"GGUF metadata of architecture {arch!r} lacks {e.args[0]!r}") \
                from None
        hf.update(norm_topk_prob=norm_topk_prob,
                  mlp_only_layers=[i for i in range(n)
                                   if f"{MLP.format(i=i)}.gate.weight" not in names])
        return hf
    return config


def gguf_fix(name: str, w, c: Qwen2MoeConfig):
    """llama.cpp may store the shared expert's gate [1, H] as [H]."""
    return w.reshape(1, -1) if name.endswith("shared_expert_gate.weight") else w


# ---- the graph ------------------------------------------------------------------------------


class SparseMoeGraph(LlamaGraph):
    """The MLP of a SparseMoeConfig's layers: routed experts where sparse, else SwiGLU."""

    def mlp(self, x: str, p: str) -> str:
        layer = int(p.split(".")[2])
        return self.sparse_mlp(x, p) if self.c.sparse_layers[layer] else self.swiglu_mlp(x, p)

    def sparse_mlp(self, x: str, p: str) -> str:
        c = self.c
        h, inter, n = c.hidden_size, c.moe_intermediate_size, c.num_experts
        experts = [f"{p}.experts.{j}" for j in range(n)]
        gate_up = self.expert_weights(
            f"{p}.experts.gate_up.weight",
            [[f"{e}.gate_proj.weight", f"{e}.up_proj.weight"] for e in experts],
            (n, h, 2 * inter))
        down = self.expert_weights(f"{p}.experts.down.weight",
                                   [[f"{e}.down_proj.weight"] for e in experts], (n, inter, h))
        return self.routed_experts(x, f"{p}.gate", gate_up, down, n, inter,
                                   c.num_experts_per_tok, renormalise=c.norm_topk_prob)


class Qwen2MoeGraph(SparseMoeGraph):
    def sparse_mlp(self, x: str, p: str) -> str:
        c, g = self.c, self.g
        routed = super().sparse_mlp(x, p)
        h, s, wide = c.hidden_size, f"{p}.shared_expert", c.shared_expert_intermediate_size
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
    # llama.cpp's qwen2moe does not renormalise the top-k weights; nothing is permuted
    gguf={"qwen2moe": GGUFArch(
        gguf_sparse("Qwen2MoeForCausalLM", norm_topk_prob=False,
                    shared_expert_intermediate_size="expert_shared_feed_forward_length"),
        GGUF_NAMES, gguf_fix)},
    tensors=tensors,
)
