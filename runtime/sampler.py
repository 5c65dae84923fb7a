"""Token sampling: greedy, or temperature with top-k and top-p, seeded per request."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmc.errors import LlmcError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise LlmcError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LlmcError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LlmcError(f"top_p must be in (0, 1], got {self.top_p}")


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution `sample` draws from (float64 [vocab]); also the reference of the
    GPU sampler (plugins/kernels/sampling.cu)."""
    if params.temperature == 0:
        probs = np.zeros(logits.size)
        probs[int(np.argmax(logits))] = 1.0
        return probs
    z = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if params.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cut = int(np.searchsorted(cumulative, params.top_p)) + 1
        keep = np.zeros_like(probs, dtype=bool)
        keep[order[:cut]] = True
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    return probs


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from one row of logits [vocab]."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    probs = probabilities(logits, params)
    return int(rng.choice(probs.size, p=probs))
