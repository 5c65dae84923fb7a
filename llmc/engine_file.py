"""The .engine file: one file, a checked header and the payload. No pickle, nothing executable.

    offset 0   magic "LLMCENG1" | u32 format version | u32 0 | u64 header length
               | sha256 of the header (32 bytes)
               header: UTF-8 JSON (model config, build options, I/O contract, tokenizer,
               library versions, and where each payload section lies)
    aligned    payload sections, each at a 64 KiB boundary (a TensorRT plan, or for the
               reference backend the ONNX graph and its weights, which onnxruntime maps)
    end        sha256 of the payload (32 bytes) | "LLMCEND1"

A truncated, corrupted or version-mismatched file is refused with a message that says so.
The writer builds the file under a temporary name and renames it only when it is complete,
so a failed build never leaves a partial engine behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import LlmcError
from llmc.header import EngineHeader

MAGIC, END_MAGIC = b"LLMCENG1", b"LLMCEND1"
FORMAT_VERSION = 2  # 2: typed header (llmc/header.py), io as contract.EngineIO
ALIGN = 1 << 16
_PREFIX = struct.Struct("<8sIIQ32s")
_TRAILER = 32 + len(END_MAGIC)


def _pad(n: int) -> int:
    return -n % ALIGN


def write_engine(path: str | os.PathLike, header: EngineHeader | dict[str, Any],
                 sections: dict[str, Path | bytes]) -> None:
    """Write header + sections (files are streamed, not read whole) atomically to ``path``."""
    path = Path(path)
    if isinstance(header, EngineHeader):
        header = header.to_dict()
    sizes = {k: len(v) if isinstance(v, bytes) else Path(v).stat().st_size
             for k, v in sections.items()}
    header = dict(header, format_version=FORMAT_VERSION)
    # Offsets depend on the header's length, which depends on the offsets' digits: fix point.
    layout: dict[str, list[int]] = {k: [0, n] for k, n in sizes.items()}
    for _ in range(3):
        blob = json.dumps(dict(header, sections=layout), sort_keys=True).encode()
        offset = _PREFIX.size + len(blob)
        for k, n in sizes.items():
            offset += _pad(offset)
            layout[k] = [offset, n]
            offset += n
    blob = json.dumps(dict(header, sections=layout), sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(blob),
                                 hashlib.sha256(blob).digest()))
            f.write(blob)
            digest = hashlib.sha256()
            for k, data in sections.items():
                f.write(b"\0" * (layout[k][0] - f.tell()))
                if isinstance(data, bytes):
                    f.write(data)
                    digest.update(data)
                else:
                    with open(data, "rb") as src:
                        while chunk := src.read(1 << 24):
                            f.write(chunk)
                            digest.update(chunk)
            f.write(digest.digest() + END_MAGIC)
        umask = os.umask(0)   # mkstemp makes 0600; an engine is an ordinary output file
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EngineFile:
    """A read-only view of an engine file; sections are memory-mapped.

    `raw` is the header's JSON as stored (with `sections` and `format_version`); `header` is
    the same, typed (EngineHeader)."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        if self.path.is_dir():
            raise LlmcError(f"{self.path} is a folder, not an engine file; give the .engine "
                            "file that `llmc build -o` wrote")
        if not self.path.is_file():
            raise LlmcError(f"engine file {self.path} does not exist")
        self.raw = self._read_header()
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._check_size()
        if verify:
            self.verify_payload()

    def _read_header(self) -> dict[str, Any]:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size or not prefix.startswith(MAGIC):
                raise LlmcError(f"{self.path} is not an llmc engine file (bad magic)")
            _, version, _, n, digest = _PREFIX.unpack(prefix)
            if version != FORMAT_VERSION:
                raise LlmcError(
                    f"{self.path} has engine format {version}; this llmc reads format "
                    f"{FORMAT_VERSION}. Rebuild it with this llmc's `llmc build`."
                )
            if n > size - _PREFIX.size - _TRAILER:   # before reading n bytes, not after
                raise LlmcError(f"{self.path} is truncated (header incomplete); rebuild it")
            blob = f.read(n)
        if hashlib.sha256(blob).digest() != digest:
            raise LlmcError(f"{self.path} is corrupted (header checksum mismatch); rebuild it")
        try:
            raw = json.loads(blob)
            sections = raw["sections"]
            # each section is [offset, length], after the header (the end: _check_size)
            ok = isinstance(sections, dict) and all(
                isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v)
                and _PREFIX.size + n <= v[0] and 0 <= v[1] for v in sections.values())
        except (ValueError, KeyError, TypeError):   # bad UTF-8 or JSON, not an object
            ok = False
        if not ok:
            raise LlmcError(f"{self.path} has a header this llmc did not write (no JSON "
                            "object with valid sections); rebuild it")
        return raw

    def _check_size(self) -> None:
        ends = [off + n for off, n in self.raw["sections"].values()]
        expected = max(ends, default=_PREFIX.size) + _TRAILER
        if self._map.size != expected or bytes(self._map[-len(END_MAGIC):]) != END_MAGIC:
            raise LlmcError(
                f"{self.path} is truncated or has trailing data ({self._map.size} bytes, "
                f"expected {expected}); rebuild it"
            )

    def verify_payload(self) -> None:
        digest = hashlib.sha256()
        # in file order: the JSON header lists sections by name, the writer wrote them in
        # the order it was given
        for off, n in sorted(self.raw["sections"].values()):
            for start in range(off, off + n, 1 << 24):
                digest.update(self._map[start:min(start + (1 << 24), off + n)])
        if digest.digest() != bytes(self._map[-_TRAILER:-len(END_MAGIC)]):
            raise LlmcError(f"{self.path} is corrupted (payload checksum mismatch); rebuild it")

    @functools.cached_property
    def header(self) -> EngineHeader:
        return EngineHeader.from_dict(self.raw)

    def section_range(self, name: str) -> tuple[int, int]:
        try:
            off, n = self.raw["sections"][name]
        except KeyError:
            raise LlmcError(f"{self.path} has no {name!r} section; is it a "
                            f"{self.raw.get('backend')} engine?") from None
        return off, n

    def section(self, name: str) -> np.ndarray:
        off, n = self.section_range(name)
        return self._map[off:off + n]
