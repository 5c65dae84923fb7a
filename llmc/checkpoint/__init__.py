"""Checkpoint files as they are: HF folders (safetensors, single or sharded) and GGUF files.

A `Checkpoint` is the file's own view: its config (config.json, or the GGUF metadata), its
tensors under the file's own names, read one at a time from a memory map (so the whole
checkpoint never sits in RAM twice), and its tokenizer. What the tensors mean to a model —
which architecture, which HF name a GGUF tensor stands for — is model_zoo's business.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmc.checkpoint.base import Checkpoint, Tokenizer
from llmc.errors import LlmcError

__all__ = ["Checkpoint", "Tokenizer", "open_checkpoint"]


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
