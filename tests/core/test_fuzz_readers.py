"""Fuzz the three readers of files a user hands llmc: the engine file (with its typed
header), a safetensors header and a GGUF file. Whatever the bytes, the reader either reads
them or refuses them with LlmcError: never another exception, a hang, or an allocation
larger than the file warrants (peak traced memory is bounded by a multiple of the file's
size). Each starts from a small valid file and mutates it (bytes flipped, cut, inserted)
or writes a structurally plausible one with random fields; bounded, so CI runs them.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llmc.errors import LlmcError

# random bytes read as floats are NaN and inf now and then: that is data, not a reader's fault
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
SLOW_S = 5.0   # no example takes longer: no hang, no loop over a size the file does not hold


def read_or_refuse(read, path: Path) -> None:
    """`read(path)` returns or raises LlmcError; it allocates at most a fixed multiple of
    the file's size (a dequantized GGUF tensor is up to ~20x its quantized bytes)."""
    size = path.stat().st_size
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        read(path)
        event("read")
    except LlmcError as e:   # what refused it, for --hypothesis-show-statistics
        event("refused: " + re.sub(r"\d+", "N", str(e).replace(str(path), "FILE"))[:56])
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - t0 < SLOW_S
    assert peak < 64 * size + (8 << 20), f"{peak:,} bytes traced for a {size:,}-byte file"


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """`seed` with a few bytes flipped, a range cut or bytes inserted, or cut short."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate", "int"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "truncate":
            del data[at:]
        elif len(data) >= at + 8:   # a plausible-looking size or count: small, huge, -1
            value = draw(st.sampled_from([0, 1, 7, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1]))
            data[at:at + 8] = value.to_bytes(8, "little")
    return bytes(data)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) |
                    st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) |
                    st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def json_mutated(value, draw):
    """`value` (a JSON tree) with one node replaced by random JSON, or a dict key dropped."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        value = dict(value)
        if draw(st.booleans()):
            del value[key]
        else:
            value[key] = json_mutated(value[key], draw)
        return value
    if isinstance(value, list) and value and draw(st.booleans()):
        at = draw(st.integers(0, len(value) - 1))
        return value[:at] + [json_mutated(value[at], draw)] + value[at + 1:]
    return draw(JSON)


# ------------------------------------------------------------------ the engine file

def engine_bytes(header: dict, payload: bytes, version: int = 2) -> bytes:
    """The engine format by hand (llmc/engine_file.py's docstring), so that the fuzzer can
    write any header with a checksum that matches it."""
    from llmc.engine_file import END_MAGIC, MAGIC

    blob = json.dumps(header).encode()
    prefix = struct.pack("<8sIIQ32s", MAGIC, version, 0, len(blob), hashlib.sha256(blob).digest())
    return prefix + blob + payload + hashlib.sha256(payload).digest() + END_MAGIC


@pytest.fixture(scope="module")
def real_header(tiny_models, tmp_path_factory) -> dict:
    """A real engine's header (a tiny model's), its sections replaced by two small ones."""
    from llmc.build import BuildOptions, build
    from llmc.engine_file import EngineFile
    from llmc.limits import BuildLimits

    out = tmp_path_factory.mktemp("fuzz") / "tiny.engine"
    build(BuildOptions(tiny_models["llama-gqa"][0], out, backend="reference", dtype="fp32",
                       limits=BuildLimits(2, 16, 32, 8)), log=lambda _: None)
    raw = dict(EngineFile(out).raw)
    raw["tokenizer"] = dict(raw["tokenizer"], json="{}")   # small: the fuzzer copies it often
    return raw


def _with_sections(header: dict) -> bytes:
    """`header` with two small sections right after it, offsets and checksums right."""
    sections = {"a": [0, 4], "b": [0, 3]}
    for _ in range(3):   # the offsets' digits change the header's length: a fixed point
        start = 56 + len(json.dumps(dict(header, sections=sections)).encode())
        sections = {"a": [start, 4], "b": [start + 4, 3]}
    return engine_bytes(dict(header, sections=sections), b"abcdxyz")


def read_engine(path: Path) -> None:
    from llmc.engine_file import EngineFile

    e = EngineFile(path)
    e.header
    for name in e.raw["sections"]:
        e.section(name)


def test_the_engine_seed_reads(real_header, tmp_path):
    path = tmp_path / "e.engine"
    path.write_bytes(_with_sections(real_header))
    read_engine(path)   # the fuzzers start from a file that reads


@FUZZ
@given(data=st.data())
def test_fuzz_engine_bytes(real_header, tmp_path, data):
    path = tmp_path / "e.engine"
    path.write_bytes(data.draw(mutated(_with_sections(real_header))))
    read_or_refuse(read_engine, path)


@FUZZ
@given(data=st.data())
def test_fuzz_engine_header(real_header, tmp_path, data):
    """Any JSON where the header goes, with a matching checksum: the typed header refuses
    what it did not write. Sections are fuzzed too (offsets, sizes, types)."""
    header = json_mutated(real_header, data.draw)
    path = tmp_path / "e.engine"
    if data.draw(st.booleans()) and isinstance(header, dict):   # sections that fit
        path.write_bytes(_with_sections(header))
    else:
        path.write_bytes(engine_bytes(header, data.draw(st.binary(max_size=64))))
    read_or_refuse(read_engine, path)


# ------------------------------------------------------------------ safetensors

def read_safetensors(path: Path) -> None:
    from llmc.checkpoint.hf_folder import _safetensors_readers

    for read in _safetensors_readers(path).values():
        read()


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


SEED_ST = safetensors_bytes({
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
    "c": {"dtype": "F16", "shape": [1], "data_offsets": [22, 24]},
    "d": {"dtype": "F64", "shape": [], "data_offsets": [24, 32]},
}, bytes(range(32)))


def test_the_safetensors_seed_reads(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(SEED_ST)
    read_safetensors(tmp_path / "m.safetensors")


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_bytes(tmp_path, data):
    path = tmp_path / "m.safetensors"
    path.write_bytes(data.draw(mutated(SEED_ST)))
    read_or_refuse(read_safetensors, path)


DIMS = st.integers(0, 4) | st.sampled_from([2**31, 2**62, 2**63, 2**64 + 3, -1]) | JSON


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(tmp_path, data):
    """Entries with any dtype, shape and offsets, well-formed or not."""
    entry = st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8"]) | JSON,
        "shape": st.lists(DIMS, max_size=3) | JSON,
        "data_offsets": st.lists(DIMS, min_size=2, max_size=2) | JSON,
    }) | JSON
    header = data.draw(st.dictionaries(st.text(max_size=4), entry, max_size=4))
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes(header, data.draw(st.binary(max_size=64))))
    read_or_refuse(read_safetensors, path)


# ------------------------------------------------------------------ GGUF

def read_gguf(path: Path) -> None:
    from llmc.checkpoint.gguf import open_gguf

    ckpt = open_gguf(path)
    for name in ckpt.names():
        ckpt.tensor(name)


@pytest.fixture(scope="module")
def seed_gguf(tmp_path_factory) -> bytes:
    """A small GGUF file from the gguf package's own writer: metadata of every kind, and
    tensors float, bf16 and block-quantized."""
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "seed.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("x.flag", True)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_array("x.ints", [1, 2, 3])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((2, 32), dtype=np.float32))
    w.add_tensor("f16", rng.standard_normal((32,)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 32), dtype=np.float32),
                              gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    q4 = gguf.quants.quantize(rng.standard_normal((1, 64), dtype=np.float32),
                              gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("q4", q4, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_the_gguf_seed_reads(seed_gguf, tmp_path):
    (tmp_path / "m.gguf").write_bytes(seed_gguf)
    read_gguf(tmp_path / "m.gguf")


@FUZZ
@given(data=st.data())
def test_fuzz_gguf_bytes(seed_gguf, tmp_path, data):
    path = tmp_path / "m.gguf"
    path.write_bytes(data.draw(mutated(seed_gguf)))
    read_or_refuse(read_gguf, path)


def _gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


@st.composite
def gguf_value(draw, depth: int = 0) -> bytes:
    """A metadata value: its type, then the value, the type sometimes one llmc does not know
    and arrays sometimes nested or claiming more elements than follow."""
    vtype = draw(st.integers(0, 13))
    if vtype == 8:
        return struct.pack("<I", 8) + _gguf_string(draw(st.binary(max_size=8)))
    if vtype == 9 and depth < 3:
        etype = draw(st.integers(0, 13))
        n = draw(st.integers(0, 4) | st.sampled_from([2**32, 2**63, 2**64 - 1]))
        items = [draw(gguf_value(depth + 1))[4:] for _ in range(min(n, 4))]
        return struct.pack("<IIQ", 9, etype, n) + b"".join(items)
    return struct.pack("<I", vtype) + draw(st.binary(min_size=0, max_size=8))


@st.composite
def gguf_tensor_info(draw) -> bytes:
    name = _gguf_string(draw(st.binary(min_size=1, max_size=6)))
    dims = draw(st.lists(st.integers(0, 64) | st.sampled_from([2**32, 2**63, 2**64 - 1]),
                         max_size=3))
    qtype = draw(st.integers(0, 40) | st.sampled_from([2**32 - 1]))
    offset = draw(st.integers(0, 128) | st.sampled_from([2**63, 2**64 - 1]))
    return name + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) \
        + struct.pack("<IQ", qtype, offset)


@FUZZ
@given(data=st.data())
def test_fuzz_gguf_structure(tmp_path, data):
    """Well-framed GGUF files with random metadata (alignment included) and tensor infos."""
    kvs = data.draw(st.lists(st.tuples(st.sampled_from([b"general.alignment", b"a.b", b""]),
                                       gguf_value()), max_size=4))
    infos = data.draw(st.lists(gguf_tensor_info(), max_size=3))
    version = data.draw(st.sampled_from([3, 3, 3, 2, 1, 4]))
    blob = b"GGUF" + struct.pack("<IQQ", version, len(infos), len(kvs))
    blob += b"".join(_gguf_string(k) + v for k, v in kvs) + b"".join(infos)
    blob += data.draw(st.binary(max_size=256))
    path = tmp_path / "m.gguf"
    path.write_bytes(blob)
    read_or_refuse(read_gguf, path)
