"""What a checkpoint reader returns: the file's config, tensors under its own names, tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llmc.errors import LlmcError


@dataclass(frozen=True)
class Tokenizer:
    """What the engine keeps of the tokenizer: HF tokenizers JSON plus chat and stop tokens."""

    json: str
    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]


class NamedTensors:
    """Tensors by name, each read (and converted) only when asked for; `source` names the
    file in errors. A Checkpoint holds the file's names, a model_zoo Model the HF ones."""

    source: Path
    readers: dict[str, Callable[[], np.ndarray]]

    def names(self) -> list[str]:
        return list(self.readers)

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as float32 (or float16 where stored so), read from the mapped file."""
        try:
            read = self.readers[name]
        except KeyError:
            raise LlmcError(f"{self.source}: the checkpoint has no tensor {name!r}") from None
        return read()


@dataclass
class Checkpoint(NamedTensors):
    """A config, tensors read lazily as numpy arrays under the file's names, a tokenizer.

    format: "hf" (config is config.json's dict) or "gguf" (metadata holds the GGUF key/value
    fields; config is empty until a model family derives one).
    tokenizer_json(): the HF tokenizers JSON; chat_template: the model's, if it has one.
    """

    source: Path
    format: str
    config: dict[str, Any]
    metadata: dict[str, Any]
    readers: dict[str, Callable[[], np.ndarray]]
    tokenizer_json: Callable[[], str]
    chat_template: str | None
    # matrices stored in 4-bit blocks (GGUF Q4_0 / Q4_1 / Q4_K), by file name: their codes (unless
    # called with False), scales and minimums as stored (gguf.GGUFFile.int4_blocks)
    int4_blocks: dict[str, Callable[[], tuple]] = field(default_factory=dict)
    # the sampling settings the checkpoint recommends (llmc.config.sampling_defaults)
    sampling: dict[str, Any] = field(default_factory=dict)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LlmcError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise LlmcError(f"{path} should hold a JSON object ({what})")
    return data
