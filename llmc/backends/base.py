"""The backend interface: `lower` at build time, a `Session` at run time.

    build:  fused ONNX graph (model.onnx + weights.bin on disk) --lower--> engine sections
    run:    engine file --open--> Session: allocate_kv(num_blocks), step(inputs) -> logits

A backend is one module (or package) that holds both halves; `llmc.backends.get(name)`
returns it. Build-time imports (onnx, TensorRT's builder) stay inside `lower`, so opening a
session never loads graph-building code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from llmc.limits import BuildLimits

if TYPE_CHECKING:
    from llmc.engine_file import EngineFile

Log = Callable[[str], None]


@dataclass
class Lowered:
    """What `lower` hands the engine file: payload sections (bytes, or files streamed in),
    a summary for the header's `lowering` entry, and the library versions that matter."""

    sections: dict[str, Path | bytes]
    summary: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


class Session(Protocol):
    """Runs one engine step at a time and owns the KV pools (llmc/contract.py)."""

    def allocate_kv(self, num_blocks: int) -> None:
        """(Re)allocate every layer's pool with `num_blocks` blocks, zeroed."""

    def step(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One ragged step: the contract's control inputs -> logits float32 [B, vocab]."""

    def close(self) -> None:
        """Release what the session holds (device memory, streams)."""


class Backend(Protocol):
    name: str

    def available(self) -> tuple[bool, str]:
        """Whether this machine can run this backend's engines; if not, why (a sentence)."""

    def can_build(self) -> tuple[bool, str]:
        """Whether this machine can build this backend's engines; if not, why. Cheap: the
        build asks before it loads the model."""

    def compute_dtype(self, dtype: str) -> str:
        """The dtype the graph computes in for a requested build dtype."""

    def can_quantize(self, mode: str) -> tuple[bool, str]:
        """Whether this backend runs graphs quantized with `--quant mode` (fp8, int4-awq,
        int4-rtn, int4-gptq); if not, why. Asked before the model loads."""

    def can_store_kv(self, dtype: str) -> tuple[bool, str]:
        """Whether this backend's sessions keep the KV cache in `--kv-cache-dtype dtype`
        (fp8); if not, why and what to do. Asked before the model loads."""

    def scales_fp8_first_token(self) -> tuple[bool, str]:
        """Whether this backend runs FP8 graphs whose first tokens take scales of their own
        (`--fp8-first-token dynamic`: quantization/qdq.py first_token_input); if not, why."""

    def lower(self, onnx_path: Path, limits: BuildLimits, log: Log) -> Lowered:
        """The fused graph on disk -> engine sections."""

    def open(self, engine: "EngineFile", log: Log | None = None, **options) -> Session:
        """A session for an engine of this backend (a clear error if this machine can't).
        options: the backend's own session settings; an unknown one is an error."""
