"""Checkpoint readers: HF folders (safetensors, single or sharded) and GGUF files.

Both give the same view: a frozen config, tensors in HF naming read one at a time (memory
mapped, so the whole checkpoint never sits in RAM twice), and the tokenizer. Weight names the
config needs but the checkpoint lacks, or holds but nobody needs, are reported by name.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from llmc.config import LlamaConfig, load_config
from llmc.errors import LlmcError


@dataclass
class Tokenizer:
    """What the engine keeps of the tokenizer: HF tokenizers JSON plus chat and stop tokens."""

    json: str
    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]


class Checkpoint:
    """A config, named tensors read lazily as numpy arrays, and a tokenizer."""

    def __init__(self, source: Path, config: LlamaConfig,
                 readers: dict[str, Callable[[], np.ndarray]], tokenizer: Callable[[], Tokenizer]):
        self.source = source
        self.config = config
        self._readers = readers
        self._tokenizer = tokenizer

    def names(self) -> list[str]:
        return list(self._readers)

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as float32 (or float16 where stored so), read from the mapped file."""
        try:
            read = self._readers[name]
        except KeyError:
            raise LlmcError(f"{self.source}: the checkpoint has no tensor {name!r}") from None
        return read()

    def tokenizer(self) -> Tokenizer:
        return self._tokenizer()

    def check_tensors(self, ignore: Iterable[str] = ("rotary_emb.inv_freq",)) -> None:
        """Every tensor the config needs is there and nothing else is (name them if not)."""
        want = set(self.config.weight_names())
        have = {n for n in self._readers if not any(i in n for i in ignore)}
        if self.config.tie_word_embeddings:
            have.discard("lm_head.weight")  # some tied checkpoints still store the copy
        missing, unexpected = sorted(want - have), sorted(have - want)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing tensors: {_list(missing)}")
            if unexpected:
                parts.append(f"unexpected tensors: {_list(unexpected)}")
            raise LlmcError(
                f"{self.source} does not match {self.config.architecture} with "
                f"{self.config.num_hidden_layers} layers: " + "; ".join(parts)
            )


def _list(names: list[str], most: int = 8) -> str:
    more = f" (+{len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open an HF model folder or a .gguf file."""
    path = Path(path)
    if not path.exists():
        raise LlmcError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise LlmcError(f"{path} is a file but not a .gguf file; give a GGUF file or an "
                            "HF model folder (config.json + *.safetensors)")
        from llmc.gguf_reader import open_gguf

        return open_gguf(path)
    return _open_hf_folder(path)


# --- HF folders -------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _safetensors_readers(file: Path) -> dict[str, Callable[[], np.ndarray]]:
    """Parse a safetensors header and return lazy readers over one memory map of the file."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LlmcError(f"{file} is not a valid safetensors file (bad header)") from None
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n)
    readers = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise LlmcError(f"{file}: tensor {name} has dtype {info['dtype']}, which llmc "
                            f"cannot read (supported: {', '.join(_ST_DTYPES)})")
        readers[name] = _st_reader(data, info, file, name)
    return readers


def _st_reader(data: np.memmap, info: dict, file: Path, name: str):
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])

    def read() -> np.ndarray:
        if end > data.size:
            raise LlmcError(f"{file} is truncated: tensor {name} lies past its end")
        raw = data[begin:end].view(_ST_DTYPES[info["dtype"]]).reshape(shape)
        if info["dtype"] == "BF16":  # bf16 is the high half of an fp32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if info["dtype"] == "F64":
            return raw.astype(np.float32)
        return raw

    return read


def _open_hf_folder(folder: Path) -> Checkpoint:
    config = load_config(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        bins = list(folder.glob("*.bin"))
        hint = " (it has .bin files: re-save them as safetensors)" if bins else ""
        raise LlmcError(f"{folder} holds no *.safetensors weights{hint}")
    readers: dict[str, Callable[[], np.ndarray]] = {}
    for name in files:
        if not (folder / name).is_file():
            raise LlmcError(f"{folder}: shard {name} named in the index is missing")
        readers.update(_safetensors_readers(folder / name))
    return Checkpoint(folder, config, readers, lambda: _hf_tokenizer(folder, config))


def _hf_tokenizer(folder: Path, config: LlamaConfig) -> Tokenizer:
    tj = folder / "tokenizer.json"
    chat_template = None
    cfg_file = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    chat_template = tok_cfg.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if chat_template is None and jinja.is_file():
        chat_template = jinja.read_text()
    if tj.is_file():
        text = tj.read_text()
    elif not any((folder / f).is_file() for f in ("tokenizer_config.json", "tokenizer.model")):
        raise LlmcError(f"{folder} has no tokenizer (tokenizer.json); copy the model's "
                        "tokenizer files into the folder")
    else:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # transformers' own message says what is missing
            raise LlmcError(f"{folder}: transformers cannot load its tokenizer: {e}") from None
        text = tok.backend_tokenizer.to_str()
    return Tokenizer(text, chat_template, config.bos_token_id, config.eos_token_ids)
