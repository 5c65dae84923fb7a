"""The engine header, typed: written by `llmc build`, read by the Runner, the backends and
`llmc inspect`. It is stored as JSON in the engine file (llmc/engine_file.py); these
dataclasses are the only code that knows its keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from llmc.checkpoint import Tokenizer
from llmc.contract import EngineIO
from llmc.errors import LlmcError
from llmc.limits import BuildLimits


@dataclass(frozen=True)
class ModelInfo:
    source: str                 # the checkpoint it was built from
    family: str                 # model_zoo family, e.g. "llama"
    architecture: str           # HF architectures[0]
    config: dict[str, Any]      # the family's parsed config, as a dict

    def describe(self) -> str:
        c = self.config
        experts = c.get("num_experts") or c.get("num_local_experts")   # Qwen-MoE / Mixtral
        return (f"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, heads "
                f"{c['num_attention_heads']}/{c['num_key_value_heads']}, head_dim "
                f"{c['head_dim']}, vocab {c['vocab_size']}"
                + (f", top {c['num_experts_per_tok']} of {experts} experts" if experts else ""))


@dataclass(frozen=True)
class BuildInfo:
    dtype: str                  # what the user asked for
    compute_dtype: str          # what the graph computes in (reference bf16: float32)
    limits: BuildLimits


@dataclass(frozen=True)
class Accuracy:
    """A quantized engine's measured accuracy against the same model unquantized."""

    text: str                   # what it was measured on
    tokens: int                 # tokens scored
    ppl_reference: float        # perplexity of the unquantized graph
    ppl: float                  # perplexity of this engine's graph
    delta_ppl_pct: float        # 100 * (ppl / ppl_reference - 1)
    top1_agreement: float       # share of positions whose greedy token is the reference's
    threshold_pct: float        # delta_ppl_pct above this warns
    # Engines built before these were measured have None.
    delta_ppl_se_pct: float | None = None   # standard error of delta_ppl_pct over the tokens
    kl_divergence: float | None = None      # mean KL(unquantized || this), nats a token

    @property
    def passed(self) -> bool:
        return self.delta_ppl_pct <= self.threshold_pct

    def describe(self) -> str:
        se = "" if self.delta_ppl_se_pct is None else f" ± {self.delta_ppl_se_pct:.2f}"
        kl = "" if self.kl_divergence is None else f", KL divergence {self.kl_divergence:.4f}"
        return (f"perplexity {self.ppl:.3f} vs {self.ppl_reference:.3f} unquantized "
                f"({self.delta_ppl_pct:+.2f}%{se}, threshold {self.threshold_pct:g}%), top-1 "
                f"agreement {100 * self.top1_agreement:.1f}%{kl} over {self.tokens} tokens "
                f"of {self.text}")


@dataclass(frozen=True)
class QuantInfo:
    """How an engine is quantized (quantization/, docs/quantization.md) and what it cost."""

    mode: str                   # none (an FP8 KV cache alone), fp8, int4-awq, int4-rtn,
                                # int4-gptq
    kv_cache_dtype: str         # auto (the compute dtype) or fp8
    gemms: int                  # weight GEMMs quantized (the LM head too only with
                                # details["lm_head"]: --quant-lm-head)
    details: dict[str, Any]     # block sizes, calibration text and tokens
    accuracy: Accuracy | None   # None: not measured (QuantOptions.measure off: benchmarks)
    kv_scales: list[list[float]] = field(default_factory=list)  # fp8 KV: per layer [K, V]

    def describe(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in self.details.items())
        weights = "weights unquantized" if self.mode == "none" else \
            f"{self.mode}, {self.gemms} GEMMs"
        kv = f"KV cache {self.kv_cache_dtype}"
        if self.kv_scales:
            k, v = [s[0] for s in self.kv_scales], [s[1] for s in self.kv_scales]
            kv += (f" (E4M3, per-layer scales K {min(k):.3g}..{max(k):.3g}, "
                   f"V {min(v):.3g}..{max(v):.3g})")
        return f"{weights}, {kv}; {extra}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantInfo":
        d = {**d}
        d["accuracy"] = None if d.get("accuracy") is None else Accuracy(**d["accuracy"])
        return cls(**d)


@dataclass(frozen=True)
class EngineHeader:
    llmc_version: str
    backend: str
    model: ModelInfo
    build: BuildInfo
    io: EngineIO
    tokenizer: Tokenizer
    versions: dict[str, str]    # libraries that built it (a TensorRT plan needs the same)
    created: str
    passes: dict[str, Any] = field(default_factory=dict)     # the pass report
    lowering: dict[str, Any] = field(default_factory=dict)   # what the backend reported
    quant: QuantInfo | None = None                            # None: not quantized
    # the checkpoint's recommended sampling settings (llmc.config.SAMPLING_DEFAULTS), which
    # `llmc serve` uses where a request gives none; engines built before they were kept: {}
    sampling: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["build"]["limits"] = self.build.limits.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineHeader":
        try:
            b = d["build"]
            tok = dict(d["tokenizer"])
            tok["eos_token_ids"] = tuple(tok["eos_token_ids"])
            return cls(
                llmc_version=d["llmc_version"], backend=d["backend"],
                model=ModelInfo(**d["model"]),
                build=BuildInfo(b["dtype"], b["compute_dtype"],
                                BuildLimits.from_dict(b["limits"])),
                io=EngineIO.from_dict(d["io"]), tokenizer=Tokenizer(**tok),
                versions=dict(d["versions"]), created=d["created"],
                passes=d.get("passes", {}), lowering=d.get("lowering", {}),
                quant=QuantInfo.from_dict(d["quant"]) if d.get("quant") else None,
                sampling=dict(d.get("sampling", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise LlmcError(f"the engine header is not one this llmc wrote ({e!r}); rebuild "
                            "the engine with `llmc build`") from None
