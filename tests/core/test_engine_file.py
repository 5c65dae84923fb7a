"""The engine file: round trip, and clear refusals of damaged or foreign files."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from llmc.build import BuildOptions, build
from llmc.engine_file import FORMAT_VERSION, EngineFile, write_engine
from llmc.errors import LlmcError
from llmc.limits import BuildLimits


@pytest.fixture
def engine(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(np.arange(100_000, dtype=np.float32).tobytes())
    path = tmp_path / "e.engine"
    write_engine(path, {"backend": "reference", "note": "x"},
                 {"model.onnx": b"graph", "weights.bin": weights})
    return path


def test_round_trip_and_alignment(engine):
    e = EngineFile(engine)
    assert e.raw["format_version"] == FORMAT_VERSION and e.raw["note"] == "x"
    assert e.section("model.onnx").tobytes() == b"graph"
    np.testing.assert_array_equal(e.section("weights.bin").view(np.float32),
                                  np.arange(100_000, dtype=np.float32))
    assert all(off % (1 << 16) == 0 for off, _ in e.raw["sections"].values())
    with pytest.raises(LlmcError, match="has no 'plan' section"):
        e.section("plan")


def _damage(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_truncated(engine):
    raw = engine.read_bytes()
    engine.write_bytes(raw[:-100])
    with pytest.raises(LlmcError, match="truncated"):
        EngineFile(engine)
    engine.write_bytes(raw[:30])
    with pytest.raises(LlmcError, match="truncated"):
        EngineFile(engine)


def test_sections_in_any_name_order(tmp_path):
    """The checksum follows the file's order, whatever order the names sort in."""
    path = tmp_path / "o.engine"
    write_engine(path, {"backend": "cuda"}, {"z": b"1" * 70_000, "a": b"2" * 10, "m": b"3"})
    e = EngineFile(path)
    assert [bytes(e.section(k)[:1]) for k in "zam"] == [b"1", b"2", b"3"]


def test_corrupted_payload_and_header(engine):
    e = EngineFile(engine)
    off, _ = e.raw["sections"]["weights.bin"]
    _damage(engine, off + 1000, b"\xff\xff")
    with pytest.raises(LlmcError, match="corrupted \\(payload checksum"):
        EngineFile(engine)
    _damage(engine, 70, b"#")
    with pytest.raises(LlmcError, match="corrupted \\(header checksum"):
        EngineFile(engine)


def test_foreign_and_other_versions(engine, tmp_path):
    _damage(engine, 8, struct.pack("<I", FORMAT_VERSION + 1))
    with pytest.raises(LlmcError, match=f"engine format {FORMAT_VERSION + 1}; this llmc reads"):
        EngineFile(engine)
    other = tmp_path / "x.engine"
    other.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(LlmcError, match="not an llmc engine file"):
        EngineFile(other)
    with pytest.raises(LlmcError, match="does not exist"):
        EngineFile(tmp_path / "absent.engine")


def test_failed_write_leaves_no_file(tmp_path):
    (tmp_path / "a_folder").mkdir()       # stat works, reading fails half-way through the write
    with pytest.raises(IsADirectoryError):
        write_engine(tmp_path / "out.engine", {}, {"a": b"x" * 1000, "b": tmp_path / "a_folder"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder"]


def test_failed_build_leaves_no_file(tiny_models, tmp_path):
    """A checkpoint that breaks while its weights stream: clear error, nothing left behind."""
    src, _ = tiny_models["llama-gqa"]
    folder = tmp_path / "model"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (folder / f).write_text((src / f).read_text())
    data = (src / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) * 3 // 4])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(LlmcError, match="truncated"):
        build(BuildOptions(folder, out_dir / "m.engine", limits=BuildLimits(2, 16, 64, 8)),
              log=lambda _: None)
    assert list(out_dir.iterdir()) == []


def _header_of_a_real_build(tiny_models, tmp_path) -> dict:
    out = tmp_path / "real.engine"
    build(BuildOptions(tiny_models["llama-gqa"][0], out, limits=BuildLimits(2, 16, 64, 8)),
          log=lambda _: None)
    raw = dict(EngineFile(out).raw)
    del raw["sections"], raw["format_version"]
    return raw


def test_typed_header_round_trip(tiny_models, tmp_path):
    from llmc.header import EngineHeader

    raw = _header_of_a_real_build(tiny_models, tmp_path)
    header = EngineHeader.from_dict(raw)
    assert json.loads(json.dumps(header.to_dict())) == raw   # what the file stores
    assert header.build.limits == BuildLimits(2, 16, 64, 8)
    assert header.io.kv_block_shape == (2, 8, 16) and header.model.family == "llama"


def test_header_this_llmc_did_not_write_says_rebuild(tmp_path):
    path = tmp_path / "odd.engine"
    write_engine(path, {"backend": "reference"}, {"model.onnx": b"graph"})
    with pytest.raises(LlmcError, match="not one this llmc wrote .*rebuild"):
        EngineFile(path).header


def test_tensorrt_plan_of_another_library_version(tiny_models, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from llmc.runtime.runner import Runner

    path = tmp_path / "old.engine"
    raw = _header_of_a_real_build(tiny_models, tmp_path)
    raw.update(backend="tensorrt-rtx", versions={"library_version": "1.0.0.1"})
    write_engine(path, raw, {"plan": b"plan bytes"})
    with pytest.raises(LlmcError, match="built with tensorrt-rtx 1.0.0.1, but this machine has "
                                        "tensorrt-rtx 1.7"):
        Runner(path)


def test_build_reports_each_weight_to_a_progress_callback(tiny_models, tmp_path):
    """What `llmc build` draws its weights bar from on a terminal: every weight, in order,
    and no "weights: k/n" log lines in its place."""
    calls, lines = [], []
    build(BuildOptions(tiny_models["llama-gqa"][0], tmp_path / "m.engine",
                       limits=BuildLimits(2, 16, 64, 8)),
          log=lines.append, progress=lambda k, n: calls.append((k, n)))
    n = calls[-1][1]
    assert calls == [(k, n) for k in range(1, n + 1)] and n > 5
    assert not any(line.startswith("weights:") for line in lines)
