"""HF model folders: config.json, safetensors (single or sharded through the index), tokenizer.

safetensors are parsed directly (header + np.memmap), so bf16 needs no framework.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from llmc.checkpoint.base import Checkpoint, read_json
from llmc.config import sampling_defaults, stop_ids
from llmc.dtypes import np_dtype
from llmc.errors import LlmcError

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              # pre-quantized checkpoints (quantization/prequantized.py dequantizes them;
              # I64: compressed-tensors' weight_shape)
              "F8_E4M3": np_dtype("float8e4m3fn"), "U8": np.uint8, "I32": np.int32,
              "I64": np.int64}


def open_hf_folder(folder: Path) -> Checkpoint:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LlmcError(f"{folder} has no config.json; is it a HuggingFace model folder?")
    config = read_json(config_path, "the model's config")
    generation = folder / "generation_config.json"
    generation = read_json(generation, "the generation config") if generation.is_file() else {}
    if "eos_token_id" in generation:   # its stop tokens end generation too (as in vLLM)
        config = {**config, "eos_token_id": stop_ids(config.get("eos_token_id"),
                                                     generation["eos_token_id"])}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise LlmcError(f"{index} has no 'weight_map'; re-save the checkpoint")
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
    return Checkpoint(folder, "hf", config, {}, readers, lambda: _tokenizer_json(folder),
                      _chat_template(folder), sampling=sampling_defaults(generation))


def _safetensors_readers(file: Path) -> dict[str, Callable[[], np.ndarray]]:
    """Parse a safetensors header and return lazy readers over one memory map of the file.
    Anything that is not a well-formed header is one clear error, read with no allocation
    larger than the file."""
    bad = f"{file} is not a valid safetensors file"
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LlmcError(f"{bad} (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise LlmcError(f"{bad} (its header claims {n} bytes; the file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LlmcError(f"{bad} (bad header)") from None
    if not isinstance(header, dict):
        raise LlmcError(f"{bad} (its header is not a JSON object)")
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else \
        np.zeros(0, np.uint8)
    readers = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list)
                  and isinstance(offsets, list) and len(offsets) == 2
                  and all(type(d) is int and d >= 0 for d in [*shape, *offsets])
                  and offsets[0] <= offsets[1])
            begin, end = offsets
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise LlmcError(f"{bad} (tensor {name!r} has a malformed entry)")
        if dtype not in _ST_DTYPES:
            raise LlmcError(f"{file}: tensor {name} has dtype {dtype}, which llmc "
                            f"cannot read (supported: {', '.join(_ST_DTYPES)})")
        if (end - begin) != math.prod(shape) * np.dtype(_ST_DTYPES[dtype]).itemsize:
            raise LlmcError(f"{bad} (tensor {name!r}: {end - begin} bytes for shape {shape})")
        readers[name] = _st_reader(data, info, file, name)
    return readers


def _st_reader(data: np.memmap, info: dict, file: Path, name: str):
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])

    def read() -> np.ndarray:
        if end > data.size:
            raise LlmcError(f"{file} is truncated: tensor {name} lies past its end")
        raw = data[begin:end].view(_ST_DTYPES[info["dtype"]]).reshape(shape)
        if info["dtype"] == "BF16":  # bf16 is the high half of an fp32: one pass, no temporary
            return np.left_shift(raw, 16, out=np.empty(shape, np.uint32),
                                 dtype=np.uint32).view(np.float32)
        if info["dtype"] == "F64":
            return raw.astype(np.float32)
        return raw

    return read


def _chat_template(folder: Path) -> str | None:
    cfg_file = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    template = tok_cfg.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    return template


def _tokenizer_json(folder: Path) -> str:
    tj = folder / "tokenizer.json"
    if tj.is_file():
        return tj.read_text()
    if not any((folder / f).is_file() for f in ("tokenizer_config.json", "tokenizer.model")):
        raise LlmcError(f"{folder} has no tokenizer (tokenizer.json); copy the model's "
                        "tokenizer files into the folder")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers' own message says what is missing
        raise LlmcError(f"{folder}: transformers cannot load its tokenizer: {e}") from None
    return tok.backend_tokenizer.to_str()
