"""Checkpoint files as they are: HF folders (safetensors, single or sharded) and GGUF files.

A `Checkpoint` is the file's own view: its config (config.json, or the GGUF metadata), its
tensors under the file's own names, read one at a time from a memory map (so the whole
checkpoint never sits in RAM twice), and its tokenizer. What the tensors mean to a model —
which architecture, which HF name a GGUF tensor stands for — is model_zoo's business.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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


@dataclass
class Checkpoint:
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

    def names(self) -> list[str]:
        return list(self.readers)

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as float32 (or float16 where stored so), read from the mapped file."""
        try:
            read = self.readers[name]
        except KeyError:
            raise LlmcError(f"{self.source}: the checkpoint has no tensor {name!r}") from None
        return read()


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open an HF model folder or a .gguf file."""
    path = Path(path)
    if not path.exists():
        raise LlmcError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise LlmcError(f"{path} is a file but not a .gguf file; give a GGUF file or an "
                            "HF model folder (config.json + *.safetensors)")
        from llmc.checkpoint.gguf import open_gguf

        return open_gguf(path)
    from llmc.checkpoint.hf_folder import open_hf_folder

    return open_hf_folder(path)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LlmcError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise LlmcError(f"{path} should hold a JSON object ({what})")
    return data
