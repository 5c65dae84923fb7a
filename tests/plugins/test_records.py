"""The PagedAttention record (its TensorRT field `record`): round trip, and refusal by name of
anything another llmc, or another plugin, wrote."""
import struct

import pytest

from llmc.plugins import records

ATTRS = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=32, scale=0.125,
             write_kv=1, sliding_window=4096)


def _with_header(blob: bytes, version: int, plugin_id: int) -> bytes:
    return blob[:4] + struct.pack("<HH", version, plugin_id) + blob[8:]


def test_roundtrip():
    blob = records.serialize("PagedAttention", ATTRS)
    assert blob[:4] == b"LLMP" and len(blob) == 8 + struct.calcsize("<iiiifBi")
    assert records.deserialize("PagedAttention", blob) == ATTRS


def test_refuses_foreign_and_old_records():
    blob = records.serialize("PagedAttention", ATTRS)
    pid = records.PLUGIN_IDS["PagedAttention"]
    with pytest.raises(ValueError, match="plugin id 0, not PagedAttention"):
        records.deserialize("PagedAttention", _with_header(blob, records.VERSION, 0))
    with pytest.raises(ValueError, match="version 1, this llmc reads 2"):
        records.deserialize("PagedAttention", _with_header(blob, 1, pid))
    with pytest.raises(ValueError, match="not an llmc plugin record"):
        records.deserialize("PagedAttention", b"ONNX" + blob[4:])
    with pytest.raises(ValueError, match="bytes"):
        records.deserialize("PagedAttention", blob[:-1])
    with pytest.raises(KeyError, match="RmsNorm"):
        records.deserialize("RmsNorm", blob)


def test_serialize_wants_exactly_the_fields():
    with pytest.raises(ValueError, match="missing \\['sliding_window'\\]"):
        records.serialize("PagedAttention", {k: v for k, v in ATTRS.items()
                                             if k != "sliding_window"})
    with pytest.raises(ValueError, match="unexpected \\['eps'\\]"):
        records.serialize("PagedAttention", {**ATTRS, "eps": 1e-5})
