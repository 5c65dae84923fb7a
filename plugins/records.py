"""Serialized plugin records: a plugin's attributes as a fixed little-endian record behind a
magic and a version, so an engine written by one llmc can be checked (and refused by name)
by another. Only PagedAttention stores one (its TensorRT field `record`)."""
from __future__ import annotations

import struct

MAGIC = b"LLMP"
VERSION = 2  # 2: PagedAttention gained sliding_window
FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "PagedAttention": (("num_q_heads", "i"), ("num_kv_heads", "i"), ("head_dim", "i"),
                       ("block_size", "i"), ("scale", "f"), ("write_kv", "B"),
                       ("sliding_window", "i")),
}
# Ids 0-4 belonged to records of plugins since removed; never reuse them, so an old record of
# one of those is refused rather than misread.
PLUGIN_IDS = {"PagedAttention": 5}


def _fmt(plugin: str) -> str:
    if plugin not in FIELDS:
        raise KeyError(f"unknown plugin {plugin!r}")
    return "<" + "".join(f for _, f in FIELDS[plugin])


def serialize(plugin: str, attrs: dict) -> bytes:
    fmt = _fmt(plugin)
    names = [n for n, _ in FIELDS[plugin]]
    missing = set(names) - set(attrs)
    extra = set(attrs) - set(names)
    if missing or extra:
        raise ValueError(f"{plugin}: missing {sorted(missing)}, unexpected {sorted(extra)}")
    head = MAGIC + struct.pack("<HH", VERSION, PLUGIN_IDS[plugin])
    return head + struct.pack(fmt, *(attrs[n] for n in names))


def deserialize(plugin: str, data: bytes) -> dict:
    fmt = _fmt(plugin)
    if data[:4] != MAGIC:
        raise ValueError("not an llmc plugin record")
    version, pid = struct.unpack_from("<HH", data, 4)
    if version != VERSION:
        raise ValueError(f"plugin record version {version}, this llmc reads {VERSION}")
    if pid != PLUGIN_IDS[plugin]:
        raise ValueError(f"record is for plugin id {pid}, not {plugin}")
    body = data[8:]
    if len(body) != struct.calcsize(fmt):
        raise ValueError(f"{plugin} record is {len(body)} bytes")
    return dict(zip((n for n, _ in FIELDS[plugin]), struct.unpack(fmt, body)))
