"""Shared by the pass tests: the tolerance table, graphs of the tiny models, ragged feeds, and
onnxruntime runs of a (model, lazy weights) pair without writing an engine file."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from llmc.dtypes import np_dtype
from llmc.model_zoo import load_model

BLOCK = 16
# The one tolerance table: max |rewritten - unrewritten| / max |unrewritten| per compute
# dtype, on onnxruntime. fp32 differs only by summation order; fp16 by where a product is
# rounded (RMSNormalization scales in fp32, the chain in fp16). bf16 models are computed in
# fp32 on bf16-rounded weights by the reference backend (llmc.build.compute_dtype), and
# bf16-typed synthetic graphs round every op to 8 mantissa bits.
TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-6))


def materialize(model: onnx.ModelProto, weights) -> onnx.ModelProto:
    """An in-memory copy with every lazy weight loaded (tiny models only)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    data = {w.name: w.load() for w in weights}
    for t in m.graph.initializer:
        if t.name in data:
            t.CopyFrom(numpy_helper.from_array(np.asarray(data[t.name]), t.name))
    return m


def run_ort(model: onnx.ModelProto, weights, feeds: dict) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(materialize(model, weights).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def assert_same(before: dict, after: dict, dtype: str) -> None:
    assert before.keys() == after.keys()
    for name in before:
        err = rel_err(before[name], after[name])
        assert err < TOLERANCE[dtype], f"{name}: rel err {err:.2e} ({dtype})"


def tiny_graph(folder, dtype: str = "float32"):
    """(model, weights, config) of a tiny HF folder; bf16 computes in fp32 on rounded
    weights, as the reference backend does."""
    m = load_model(folder)
    compute = "float32" if dtype == "bfloat16" else dtype
    model, weights = m.build_graph(compute, BLOCK,
                                   weights_rounded_to=dtype if compute != dtype else None)
    return model, weights, m.config


def ragged_feeds(cfg, dtype: str, seed: int = 0, num_blocks: int = 16) -> dict:
    """One ragged step: a decode token, a prefill chunk over cached blocks and a new prompt,
    over shuffled blocks of a cache already holding random K/V."""
    rng = np.random.default_rng(seed)
    new, ctx = [1, 9, 5], [6, 30, 5]
    starts = np.cumsum([0] + new).astype(np.int32)
    tables = rng.permutation(num_blocks)[:6].reshape(3, 2).astype(np.int32)
    feeds = {
        "input_ids": rng.integers(0, cfg.vocab_size, sum(new)).astype(np.int32),
        "position_ids": np.concatenate([np.arange(c - n, c) for n, c in zip(new, ctx)])
        .astype(np.int32),
        "seq_starts": starts, "context_lens": np.array(ctx, np.int32), "block_tables": tables,
        "last_token_rows": (starts[1:] - 1).astype(np.int32)}
    kv = (2, num_blocks, cfg.num_key_value_heads, BLOCK, cfg.head_dim)
    for i in range(cfg.num_hidden_layers):
        feeds[f"kv_cache_{i}"] = rng.standard_normal(kv).astype(np_dtype(dtype))
    return feeds
