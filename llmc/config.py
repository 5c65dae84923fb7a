"""What every model family's config shares: reading config.json values with clear errors, and
RoPE (theta, llama3 scaling, the inverse-frequency table the graph and the kernels both use).

Each family's own frozen config dataclass and its parser live in its model_zoo file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmc.errors import LlmcError

_MISSING = object()


def field(hf: dict[str, Any], key: str, kind: type = int, default: Any = _MISSING) -> Any:
    """config.json's `key` as `kind` (int, float, bool or str), or a clear error naming it.

    A missing key takes `default` (an error if there is none); null counts as missing."""
    value = hf.get(key)
    if value is None:
        if default is _MISSING:
            raise LlmcError(f"config.json lacks the key {key!r}")
        return default
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
          else isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
    if not ok:
        raise LlmcError(f"config.json: {key} should be {_KIND_NAMES[kind]}, got {value!r}")
    if kind is int and value < 0:
        raise LlmcError(f"config.json: {key} should not be negative, got {value}")
    return kind(value)


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def architecture(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures")
    if not archs:
        raise LlmcError("config.json has no 'architectures' entry; cannot tell the model family")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise LlmcError(f"config.json: architectures should be a list of names, got {archs!r}")
    return archs[0]


def eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


# The sampling settings a checkpoint may recommend, as vLLM reads them from
# generation_config.json (its --generation-config auto), and the GGUF keys that say the same.
SAMPLING_DEFAULTS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
                     "repetition_penalty": float}
GGUF_SAMPLING = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "penalty_repeat"}


def sampling_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """The recommended sampling settings among generation_config.json's values (others, such
    as max_length or do_sample, are dropped; a value of the wrong type is too)."""
    out = {}
    for key, kind in SAMPLING_DEFAULTS.items():
        v = values.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = kind(v)
    return out


def gguf_sampling_defaults(meta: dict[str, Any]) -> dict[str, Any]:
    """A GGUF file's general.sampling.* values, under generation_config.json's names."""
    return sampling_defaults({k: meta.get(f"general.sampling.{g}")
                              for k, g in GGUF_SAMPLING.items()})


def gguf_stop_ids(meta: dict[str, Any]) -> list[int] | None:
    """A GGUF file's stop tokens: its EOS, and the end-of-turn and end-of-message tokens
    llama.cpp stops at too (Llama 3's <|eot_id|> and <|eom_id|>)."""
    return stop_ids(*(meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")))


def stop_ids(*values) -> list[int] | None:
    """Token ids (each an id, a list of ids or None) as one eos_token_id list, in order and
    without repeats: the stop tokens a checkpoint names in more than one place. What is not
    an id is left out."""
    ids: list[int] = []
    for v in values:
        for t in v if isinstance(v, list) else [v]:
            if isinstance(t, int) and not isinstance(t, bool) and t not in ids:
                ids.append(t)
    return ids or None


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (the only rope_type besides "default" we lower)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


def rope_inv_freq(dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [dim/2] (float64) of the rotated dims; the graph's RoPE and the
    RoPE kernels' host-side table both come from here."""
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
    try:
        return float(theta), RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise LlmcError(f"config.json: llama3 rope scaling lacks {e.args[0]!r}") from None
