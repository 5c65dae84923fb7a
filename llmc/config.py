"""Model configs: one frozen dataclass per architecture family, built from config.json.

The registry is keyed on ``architectures[0]`` of config.json. Each family also names the
checkpoint tensors it expects (see ``weight_names``), so the loader can report missing and
unexpected tensors by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmc.errors import LlmcError


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (the only rope_type besides "default" we lower)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LlamaConfig:
    """The llama family: Llama, Mistral and Qwen2 share one graph and differ only here."""

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

    def inv_freq(self):
        """RoPE inverse frequencies [head_dim/2], with llama3 scaling folded in (float64)."""
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)

    def weight_names(self) -> list[str]:
        """Checkpoint tensors this config needs, in HF naming."""
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(self.num_hidden_layers):
            names += [t.format(i=i) for t in _LAYER_WEIGHTS]
            if self.attention_bias:
                names += [t.format(i=i) for t in _ATTN_BIASES]
            if self.mlp_bias:
                names += [t.format(i=i) for t in _MLP_BIASES]
        return names

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)


# HF checkpoint names of one decoder layer; the same table serves Llama, Mistral and Qwen2.
_LAYER_WEIGHTS = (
    "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.self_attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight",
)
_ATTN_BIASES = (
    "model.layers.{i}.self_attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.bias",
)
_MLP_BIASES = (
    "model.layers.{i}.mlp.gate_proj.bias",
    "model.layers.{i}.mlp.up_proj.bias",
    "model.layers.{i}.mlp.down_proj.bias",
)


def rope_inv_freq(dim: int, theta: float, scaling: RopeScaling | None):
    """Inverse frequencies [dim/2] (float64) of the rotated dims; the graph's RoPE and the
    RoPE kernels' host-side table both come from here."""
    import numpy as np

    inv = 1.0 / (theta ** (np.arange(0, dim, 2) / dim))
    s = scaling
    if s is None:
        return inv
    # transformers' _compute_llama3_parameters: long wavelengths are divided by the
    # factor, short ones kept, the band between them interpolated smoothly.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_settings(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read rope theta and scaling from transformers 4.x or 5.x (``rope_parameters``) keys."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise LlmcError(
            f"rope scaling type {rope_type!r} is not supported (supported: default, llama3)"
        )
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _llama_family(hf: dict[str, Any], *, attention_bias: bool, sliding_window) -> LlamaConfig:
    try:
        heads = hf["num_attention_heads"]
        theta, scaling = rope_settings(hf)
        return LlamaConfig(
            architecture=hf["architectures"][0],
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=sliding_window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_eos_ids(hf),
        )
    except KeyError as e:
        raise LlmcError(f"config.json lacks the key {e.args[0]!r}") from None


def _llama(hf):
    return _llama_family(hf, attention_bias=bool(hf.get("attention_bias", False)),
                         sliding_window=None)


def _mistral(hf):
    return _llama_family(hf, attention_bias=False, sliding_window=hf.get("sliding_window"))


def _qwen2(hf):
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    if window is not None and hf.get("max_window_layers", 0) < hf["num_hidden_layers"]:
        # Qwen2 applies the window only to layers >= max_window_layers; one window for all
        # layers is what the graph supports.
        raise LlmcError("Qwen2 with per-layer sliding windows is not supported")
    return _llama_family(hf, attention_bias=True, sliding_window=window)


REGISTRY = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "Qwen2ForCausalLM": _qwen2,
}


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    """Build the frozen config for a config.json dict; unknown architectures are an error."""
    archs = hf.get("architectures") or []
    if not archs:
        raise LlmcError("config.json has no 'architectures' entry; cannot tell the model family")
    parse = REGISTRY.get(archs[0])
    if parse is None:
        raise LlmcError(
            f"unsupported architecture {archs[0]!r}; supported: {', '.join(sorted(REGISTRY))}"
        )
    cfg = parse(hf)
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise LlmcError(
            f"num_attention_heads ({cfg.num_attention_heads}) is not a multiple of "
            f"num_key_value_heads ({cfg.num_key_value_heads})"
        )
    return cfg


def load_config(folder: Path) -> LlamaConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LlmcError(f"{folder} has no config.json; is it a HuggingFace model folder?")
    try:
        return config_from_hf(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise LlmcError(f"{path} is not valid JSON: {e}") from None
