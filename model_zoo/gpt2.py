"""GPT-2: LayerNorm, learned absolute positions, GELU, and Conv1D projections.

    h = wte(ids) + wpe(positions)
    block(h) = h + attention(ln_1(h));  h = h + mlp(ln_2(h))
    mlp(x)   = c_proj(gelu_tanh(c_fc(x)))
    logits   = wte^T ln_f(h)                                      (the head is tied)

Attention: one fused c_attn projection (with bias) split into q, k, v; no RoPE; full causal
attention over the paged cache; c_proj (with bias). Every LayerNorm has a bias.
HF's Conv1D stores its weight [in, out], the layout the graph keeps linear weights in, so the
checkpoint's tensors are used as they are and c_attn stays one MatMul (the qkv_gemm pass has
nothing to fuse, as for Phi-3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmc.arrays import transposed
from llmc.config import architecture, eos_ids, field, gguf_stop_ids
from llmc.errors import LlmcError
from llmc.model_zoo.family import Family, GGUFArch, Readers
from llmc.model_zoo.layers import DecoderGraph, Step, graph_builder

# ---- config --------------------------------------------------------------------------------

# transformers' names of the tanh-approximated GELU; "gelu" (erf) and the others are refused
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class GPT2Config:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int            # = num_attention_heads (multi-head attention)
    head_dim: int
    layer_norm_epsilon: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPT2Config":
        return cls(**{**d, "eos_token_ids": tuple(d["eos_token_ids"])})


def _key(hf: dict[str, Any], name: str, alias: str) -> str:
    """GPT-2's own key (n_embd) if present, else the generic one transformers maps it to
    (hidden_size)."""
    return name if name in hf else alias


def parse_gpt2(hf: dict[str, Any]) -> GPT2Config:
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise LlmcError(f"activation_function {act!r} is not supported for GPT-2 "
                        f"(supported: {', '.join(ACTIVATIONS)})")
    # each of these changes what the attention computes
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise LlmcError("GPT-2 with scale_attn_by_inverse_layer_idx is not supported")
    if hf.get("scale_attn_weights") is False:
        raise LlmcError("GPT-2 with scale_attn_weights false (unscaled attention scores) is "
                        "not supported")
    if hf.get("add_cross_attention"):
        raise LlmcError("GPT-2 with add_cross_attention (a decoder of an encoder-decoder "
                        "model) is not supported")
    # reorder_and_upcast_attn only computes q.k in float32, which the graph's fp32 softmax
    # path matches in fp32 builds; it changes no result beyond rounding and is accepted.
    hidden = field(hf, _key(hf, "n_embd", "hidden_size"))
    heads = field(hf, _key(hf, "n_head", "num_attention_heads"))
    cfg = GPT2Config(
        architecture=architecture(hf),
        vocab_size=field(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=field(hf, _key(hf, "n_inner", "intermediate_size"), int, 4 * hidden),
        num_hidden_layers=field(hf, _key(hf, "n_layer", "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads if heads else 0,
        layer_norm_epsilon=field(hf, "layer_norm_epsilon", float, 1e-5),
        max_position_embeddings=field(hf, _key(hf, "n_positions", "max_position_embeddings"),
                                      int, 1024),
        tie_word_embeddings=field(hf, "tie_word_embeddings", bool, True),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
    )
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings"):
        if getattr(cfg, name) < 1:
            raise LlmcError(f"config.json: {name} must be at least 1, got {getattr(cfg, name)}")
    if hidden % heads:
        raise LlmcError(f"n_embd ({hidden}) is not a multiple of n_head ({heads})")
    return cfg


# ---- checkpoint names -------------------------------------------------------------------------

LAYER = "transformer.h.{i}"
# (HF Conv1D / LayerNorm module, llama.cpp's name) of one layer; each has a weight and a bias
MODULES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
           "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
GGUF_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
    **{f"blk.{{i}}.{g}.{x}": f"{LAYER}.{m}.{x}" for m, g in MODULES.items()
       for x in ("weight", "bias")},
}


def weight_names(c: GPT2Config) -> list[str]:
    names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
             "transformer.ln_f.bias"]
    if not c.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(c.num_hidden_layers):
        names += [f"{LAYER.format(i=i)}.{m}.{x}" for m in MODULES for x in ("weight", "bias")]
    return names


def tensors(readers: Readers, c: GPT2Config) -> Readers:
    """The original GPT-2 checkpoints name tensors without the `transformer.` prefix and
    store each layer's causal-mask buffers (attn.bias, attn.masked_bias), which are no
    weights."""
    return {("transformer." + n if n.startswith(("h.", "wte.", "wpe.", "ln_f.")) else n): r
            for n, r in readers.items()
            if not n.endswith((".attn.bias", ".attn.masked_bias"))}


def _gguf_gpt2(meta: dict[str, Any], names: set[str]) -> dict[str, Any]:
    def key(k, default=None):
        return meta.get(f"gpt2.{k}", default)

    try:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": int(key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))),
            "n_embd": int(key("embedding_length")),
            "n_inner": int(key("feed_forward_length")),
            "n_layer": int(key("block_count")),
            "n_head": int(key("attention.head_count")),
            "layer_norm_epsilon": float(key("attention.layer_norm_epsilon", 1e-5)),
            "n_positions": int(key("context_length")),
            # llama.cpp stores the tied head again as output.weight
            "tie_word_embeddings": "lm_head.weight" not in names,
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": gguf_stop_ids(meta),
        }
    except (TypeError, ValueError) as e:   # a key llama.cpp always writes is missing
        raise LlmcError(f"GGUF metadata of architecture 'gpt2' is incomplete ({e})") from None


def gguf_fix(name: str, w: np.ndarray, c: GPT2Config) -> np.ndarray:
    """llama.cpp transposes the Conv1D weights to [out, in] (its linear layout); back."""
    conv = name.endswith(".weight") and any(f".{m}." in name for m in CONV1D)
    return transposed(w) if conv else w


# ---- the graph ------------------------------------------------------------------------------


class GPT2Graph(DecoderGraph):
    EMBED = "transformer.wte.weight"

    def block(self, i: int, h: str, step: Step, cache: str) -> tuple[str, str]:
        g, p = self.g, LAYER.format(i=i)
        with g.scope("attn"):
            a, cache = self.attention(self.norm(h, f"{p}.ln_1"), step, cache, f"{p}.attn")
        h = g.Add(h, a)
        with g.scope("mlp"):
            h = g.Add(h, self.mlp(self.norm(h, f"{p}.ln_2"), f"{p}.mlp"))
        return h, cache

    def attention(self, x: str, s: Step, cache: str, p: str) -> tuple[str, str]:
        c = self.c
        qkv = self.conv1d(x, f"{p}.c_attn", c.hidden_size, 3 * c.hidden_size)
        q, k, v = (self.heads(t, c.num_attention_heads)
                   for t in self.split(qkv, [c.hidden_size] * 3))     # [T, H, D] each
        out, cache = self.paged_attention(q, k, v, s, cache)
        return self.conv1d(out, f"{p}.c_proj", c.hidden_size, c.hidden_size), cache

    def mlp(self, x: str, p: str) -> str:
        c = self.c
        up = self.conv1d(x, f"{p}.c_fc", c.hidden_size, c.intermediate_size)
        return self.conv1d(self.gelu_tanh(up), f"{p}.c_proj", c.intermediate_size,
                           c.hidden_size)

    def conv1d(self, x: str, name: str, n_in: int, n_out: int) -> str:
        """HF's Conv1D: x @ W + b, W stored [in, out] as the graph keeps it."""
        g = self.g
        return g.Add(g.MatMul(x, self.weight(f"{name}.weight", (n_in, n_out))),
                     self.weight(f"{name}.bias", (n_out,)))

    def norm(self, x: str, name: str) -> str:
        return self.layer_norm(x, name, self.c.layer_norm_epsilon)

    def embed(self, table: str, ids: str, step: Step) -> str:
        c, g = self.c, self.g
        wpe = self.weight("transformer.wpe.weight", (c.max_position_embeddings, c.hidden_size))
        return g.Add(g.Gather(table, ids), g.Gather(wpe, step.positions))

    def final_norm(self, h: str) -> str:
        return self.norm(h, "transformer.ln_f")

    def inv_freq(self, layer: int) -> None:
        return None     # learned absolute positions, no RoPE

    def window(self, layer: int) -> int:
        return 0        # full causal attention on every layer


FAMILY = Family(
    name="gpt2",
    configs={"GPT2LMHeadModel": parse_gpt2},
    weight_names=weight_names,
    build_graph=graph_builder(GPT2Graph),
    gguf={"gpt2": GGUFArch(_gguf_gpt2, GGUF_NAMES, gguf_fix)},
    tensors=tensors,
)
