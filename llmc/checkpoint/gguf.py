"""GGUF files (llama.cpp's format): a lean metadata reader over a memory map, and the tokenizer.

Each tensor is dequantized to float32 (through the ``gguf`` package) only when asked for,
under its llama.cpp name; model_zoo's family tables say which HF tensor it stands for.
Tensors in 4-bit blocks of 32 (Q4_0, Q4_1, Q4_K) can also be read as they are stored, codes
and per-block scales (and minimums), for an INT4 engine that keeps the file's own numbers
(``--quant int4-gguf``). The tokenizer JSON comes from transformers' GGUF tokenizer converter.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from llmc.checkpoint.base import Checkpoint
from llmc.config import gguf_sampling_defaults
from llmc.errors import LlmcError


def open_gguf(path: Path) -> Checkpoint:
    try:
        reader = GGUFFile(path)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise LlmcError(f"{path} is not a readable GGUF file ({e})") from None
    readers = {name: (lambda n=name: reader.dequantize(n)) for name in reader.tensors}
    blocks = {name: (lambda codes=True, n=name: reader.int4_blocks(n, codes))
              for name, t in reader.tensors.items() if t[1].name in INT4_TYPES and len(t[0]) == 2}
    return Checkpoint(path, "gguf", {}, reader.fields, readers,
                      lambda: _tokenizer_json(path, reader),
                      reader.get("tokenizer.chat_template"), int4_blocks=blocks,
                      sampling=gguf_sampling_defaults(reader.fields))


# llama.cpp's 4-bit blocks of 32 along a row (ggml-common.h). Q4_0 and Q4_1: an fp16 scale d
# (Q4_1: then an fp16 minimum m) and 16 bytes whose low nibbles are the block's values 0..15
# and high nibbles 16..31; x = (u - 8) d, x = u d + m. Q4_K: super-blocks of 256, an fp16 d
# and dmin, 12 bytes of 6-bit scales sc and minimums mn for its eight blocks of 32, then 128
# bytes in four runs of 32 whose low nibbles are block 2r and high nibbles block 2r + 1; x =
# u (d sc) - dmin mn, a Q4_1 block of scale d sc and minimum -dmin mn.
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT4_BLOCK = 32


class GGUFFile:
    """A lean GGUF reader: metadata as plain Python values, tensors as memory-mapped bytes.

    (gguf.GGUFReader keeps a numpy view per metadata array element, which for a 49k-token
    vocabulary costs more memory than a small model's weights.)
    """

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                10: "<Q", 11: "<q", 12: "<d"}

    def __init__(self, path: Path):
        import gguf

        self.path = path
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        self._pos = 0
        if self._take(4) != b"GGUF":
            raise ValueError("bad magic")
        version, n_tensors, n_kv = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (llmc reads 2 and 3)")
        self.fields = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            if not 1 <= n_dims <= 4:   # GGML_MAX_DIMS
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            dims = [self._unpack("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), self._unpack("<I"), self._unpack("<Q")))
        align = self.fields.get("general.alignment", 32)
        if type(align) is not int or align <= 0:
            raise ValueError(f"general.alignment is {align!r}")
        data_start = self._pos + (-self._pos % align)
        self.tensors = {}
        for name, shape, qtype, offset in infos:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            if 0 in shape:   # else a zero-byte row would let the other dims claim anything
                raise ValueError(f"tensor {name} has an empty dimension {shape}")
            if shape[-1] % block:
                raise ValueError(f"tensor {name}: rows of {shape[-1]} values are not whole "
                                 f"blocks of {block}")
            row_bytes = shape[-1] // block * type_size
            start = data_start + offset
            nbytes = row_bytes * math.prod(shape[:-1])   # Python ints: no overflow
            if start + nbytes > self._map.size:
                raise ValueError(f"truncated: tensor {name} lies past the end of the file")
            self.tensors[name] = (shape, gguf.GGMLQuantizationType(qtype), start, row_bytes)

    def _take(self, n: int) -> bytes:
        if self._pos + n > self._map.size:
            raise ValueError("truncated metadata")
        b = self._map[self._pos:self._pos + n].tobytes()
        self._pos += n
        return b

    def _unpack(self, fmt: str):
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        return self._take(self._unpack("<Q")).decode("utf-8", errors="replace")

    def _value(self, vtype: int, depth: int = 0):
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, n = self._unpack("<I"), self._unpack("<Q")
            if etype in self._SCALARS:  # one read for the whole numeric array
                fmt = self._SCALARS[etype]
                return list(struct.unpack(f"<{n}{fmt[1]}", self._take(n * struct.calcsize(fmt))))
            if depth >= 4:   # arrays of arrays exist; a deep nest is a damaged file
                raise ValueError("metadata arrays nested too deep")
            return [self._value(etype, depth + 1) for _ in range(n)]
        if vtype not in self._SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self._unpack(self._SCALARS[vtype])

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def dequantize(self, name: str) -> np.ndarray:
        """One tensor as float32, in HF (row-major, slowest dim first) shape."""
        import gguf

        shape, qtype, start, row_bytes = self.tensors[name]
        rows = math.prod(shape[:-1])
        raw = self._map[start:start + rows * row_bytes].reshape(rows, row_bytes)
        try:
            if qtype == gguf.GGMLQuantizationType.BF16:
                w = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                w = gguf.quants.dequantize(raw, qtype)
            return w.reshape(shape).astype(np.float32, copy=False)
        except (NotImplementedError, ValueError) as e:   # a type gguf cannot dequantize
            raise LlmcError(f"{self.path}: tensor {name} of type {qtype.name} cannot be "
                            f"read ({e})") from None


    def int4_blocks(self, name: str, codes: bool = True
                    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None, str]:
        """A Q4_0, Q4_1 or Q4_K matrix [rows, cols] as stored: the codes u (uint8 0..15,
        [rows, cols]; None unless asked), the scales and, but for Q4_0, the minimums of its
        blocks of 32 (float32 [rows, cols / 32]: x = u d + m), and the type's name."""
        import gguf

        (rows, cols), qtype, start, row_bytes = self.tensors[name]
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        raw = self._map[start:start + rows * row_bytes].reshape(rows, cols // block, -1)
        head = {"Q4_0": 2, "Q4_1": 4, "Q4_K": 16}[qtype.name]   # the bytes before the codes
        halves = np.ascontiguousarray(raw[..., :4]).view(np.float16).astype(np.float32)
        d, m = halves[..., 0], halves[..., 1] if head > 2 else None
        if qtype.name == "Q4_K":
            sc, mn = gguf.quants.Q4_K.get_scale_min(raw[..., 4:16].reshape(-1, 12))
            d = (d.reshape(-1, 1) * sc.astype(np.float32)).reshape(rows, -1)
            m = -(m.reshape(-1, 1) * mn.astype(np.float32)).reshape(rows, -1)
        u = None
        if codes:   # Q4_0 / Q4_1: one run of 16 bytes a block; Q4_K: four of 32 a super-block
            qs = raw[..., head:].reshape(rows, cols // block, -1, INT4_BLOCK // 2 *
                                         (2 if qtype.name == "Q4_K" else 1))
            u = np.stack([qs & 0xF, qs >> 4], axis=-2).reshape(rows, cols)
        return u, d, m, qtype.name


def _tokenizer_json(path: Path, reader: GGUFFile) -> str:
    """The HF tokenizers JSON that transformers' GGUF converter makes from the metadata.

    The converter proper is called on the metadata we already hold; transformers' own GGUF
    loading path (AutoTokenizer) imports torch and re-reads the file, so it is the fallback.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:
        convert_gguf_tokenizer = None
    try:
        if convert_gguf_tokenizer is not None:
            renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
            meta = {name: reader.get(f"tokenizer.{key}") for key, name in renames.items()
                    if f"tokenizer.{key}" in reader.fields}
            backend, _ = convert_gguf_tokenizer(reader.get("general.architecture"), meta)
            return backend.to_str()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return tok.backend_tokenizer.to_str()
    except Exception as e:
        raise LlmcError(f"{path}: cannot build a tokenizer from the GGUF metadata ({e})") from None
