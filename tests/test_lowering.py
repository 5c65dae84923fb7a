"""Lowering tests: build limits, profile shapes, and real TensorRT-RTX builds on the CPU.

The graph lowered here is a toy that honours the whole engine I/O contract (ragged tokens,
paged KV pool per layer written with ScatterND, attention that reads the pool through the
block tables, logits of the last token rows), so the real builder sees every input, output,
dtype and dynamic dimension a model_zoo graph has.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from llmc import trt_shim  # noqa: E402
from llmc.lowering import (  # noqa: E402
    DIM_NAMES,
    BuildLimits,
    LoweringError,
    build_plan,
    dim_ranges,
    onnx_graph_inputs,
    profile_shapes,
)

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAVE_RTX, reason="tensorrt_rtx is not installed (llmc[rtx])")

# Small limits keep the CPU build short while every dimension stays dynamic.
LIMITS = BuildLimits(max_batch_size=4, max_num_tokens=64, max_seq_len=256, kv_block_size=16)

ONNX_DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
}
TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16"}

# ------------------------------------------------------------------ the toy contract graph

VOCAB, KV_HEADS, HEAD_DIM = 64, 2, 16
HIDDEN = KV_HEADS * HEAD_DIM


def _weight(name: str, array: np.ndarray, dtype: str) -> onnx.TensorProto:
    if dtype == "bfloat16":  # bf16 = the high half of each float32
        bits = (array.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, bits.tobytes(), True)
    return numpy_helper.from_array(array.astype(dtype), name)


def _ints(name: str, values, dtype=np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


class _Graph:
    """A tiny node builder: `g.op("MatMul", a, b)` returns the new output's name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self.count += 1
        out = out or f"{op_type.lower()}_{self.count}"
        name = f"n{self.count}_{op_type}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def const(self, tensor: onnx.TensorProto) -> str:
        self.inits.append(tensor)
        return tensor.name


def _control_indices(g: _Graph, block_size: int) -> dict[str, str]:
    """Per-token sequence index, the ScatterND indices into the pool, and the attention mask."""
    tok = g.op("Range", g.const(_ints("zero", 0, np.int32)),
               g.op("Squeeze", g.op("Cast", g.op("Shape", "input_ids"), to=TensorProto.INT32)),
               g.const(_ints("one", 1, np.int32)))
    ends = g.op("Slice", "seq_starts", g.const(_ints("s1", [1])), g.const(_ints("big", [2**31])))
    ge = g.op("GreaterOrEqual", g.op("Unsqueeze", tok, g.const(_ints("ax1", [1]))),
              g.op("Unsqueeze", ends, g.const(_ints("ax0", [0]))))
    seq = g.op("ReduceSum", g.op("Cast", ge, to=TensorProto.INT32), "ax1", keepdims=0)
    bs = g.const(_ints("block_size", block_size, np.int32))
    lblk = g.op("Div", "position_ids", bs)
    off = g.op("Sub", "position_ids", g.op("Mul", lblk, bs))
    width = g.op("Cast", g.op("Gather", g.op("Shape", "block_tables"),
                              g.const(_ints("i1", 1)), axis=0), to=TensorProto.INT32)
    flat = g.op("Reshape", "block_tables", g.const(_ints("flat", [-1])))
    pblk = g.op("Gather", flat, g.op("Add", g.op("Mul", seq, width), lblk), axis=0)
    # ScatterND indices [2, T, kv_heads, 4] = (k/v, physical block, head, offset)
    ax02 = g.const(_ints("ax02", [0, 2]))
    parts = [
        g.const(_ints("kv_sel", [[[0]], [[1]]])),
        g.op("Unsqueeze", g.op("Cast", pblk, to=TensorProto.INT64), ax02),
        g.const(_ints("heads", [[list(range(KV_HEADS))]])),
        g.op("Unsqueeze", g.op("Cast", off, to=TensorProto.INT64), ax02),
    ]
    target = g.op("Concat", g.const(_ints("two", [2])), g.op("Shape", "input_ids"),
                  g.const(_ints("kvh", [KV_HEADS])), axis=0)
    last = g.const(_ints("axm1", [-1]))
    parts = [g.op("Unsqueeze", g.op("Expand", p, target), last) for p in parts]
    scatter_idx = g.op("Concat", *parts, axis=-1)
    # mask [T, 1, 1, S]: key j is visible to a token at position p when j <= p < context_len
    span = g.op("Mul", width, bs)
    j = g.op("Unsqueeze", g.op("Range", "zero", span, "one"), "ax0")
    pos = g.op("Unsqueeze", "position_ids", "ax1")
    ctx = g.op("Unsqueeze", g.op("Gather", "context_lens", seq, axis=0), "ax1")
    valid = g.op("And", g.op("LessOrEqual", j, pos), g.op("Less", j, ctx))
    mask = g.op("Unsqueeze", valid, g.const(_ints("ax12", [1, 2])))
    return {"seq": seq, "scatter_idx": scatter_idx, "mask": mask}


def _layer(g: _Graph, layer: int, h: str, ctl: dict, dtype: str, rng) -> str:
    """Write this layer's K/V into its pool, attend over the pool through the block tables."""
    def w(name, shape):
        return g.const(_weight(f"l{layer}.{name}", rng.standard_normal(shape) * 0.2, dtype))

    heads3 = g.const(_ints(f"l{layer}.shape3", [-1, KV_HEADS, HEAD_DIM]))
    k = g.op("Reshape", g.op("MatMul", h, w("wk", (HIDDEN, HIDDEN))), heads3)
    v = g.op("Reshape", g.op("MatMul", h, w("wv", (HIDDEN, HIDDEN))), heads3)
    kv = g.op("Concat", g.op("Unsqueeze", k, "ax0"), g.op("Unsqueeze", v, "ax0"), axis=0)
    pool = g.op("ScatterND", f"kv_cache_{layer}", ctl["scatter_idx"], kv,
                out=f"kv_cache_out_{layer}")
    per_seq = g.const(_ints(f"l{layer}.per_seq", [0, 0, -1, HEAD_DIM]))

    def gather_side(index: int) -> str:  # pool[index] -> [T, kv_heads, S, head_dim]
        side = g.op("Gather", pool, g.const(_ints(f"l{layer}.side{index}", index)), axis=0)
        blocks = g.op("Gather", side, "block_tables", axis=0)  # [B, MB, KH, BS, D]
        seq_kv = g.op("Reshape", g.op("Transpose", blocks, perm=[0, 2, 1, 3, 4]), per_seq)
        return g.op("Gather", seq_kv, ctl["seq"], axis=0)

    keys, values = gather_side(0), gather_side(1)
    q = g.op("Reshape", g.op("MatMul", h, w("wq", (HIDDEN, HIDDEN))),
             g.const(_ints(f"l{layer}.q4", [-1, KV_HEADS, 1, HEAD_DIM])))
    scale = g.const(_weight(f"l{layer}.scale", np.array(HEAD_DIM**-0.5), dtype))
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", keys, perm=[0, 1, 3, 2])), scale)
    neg = g.const(_weight(f"l{layer}.neg", np.array(-1e4), dtype))
    probs = g.op("Softmax", g.op("Where", ctl["mask"], scores, neg), axis=-1)
    attn = g.op("Reshape", g.op("MatMul", probs, values),
                g.const(_ints(f"l{layer}.flat", [-1, HIDDEN])))
    return g.op("Add", h, g.op("MatMul", attn, w("wo", (HIDDEN, HIDDEN))))


def toy_model(path: Path, dtype: str = "float32", num_layers: int = 2,
              limits: BuildLimits = LIMITS, seed: int = 0) -> Path:
    """Write a contract-following toy model to `path`, its weights as external data."""
    rng = np.random.default_rng(seed)
    g = _Graph()
    ctl = _control_indices(g, limits.kv_block_size)
    emb = g.const(_weight("embed", rng.standard_normal((VOCAB, HIDDEN)), dtype))
    pos = g.const(_weight("pos_embed", rng.standard_normal((limits.max_seq_len, HIDDEN)), dtype))
    h = g.op("Add", g.op("Gather", emb, "input_ids", axis=0),
             g.op("Gather", pos, "position_ids", axis=0))
    for layer in range(num_layers):
        h = _layer(g, layer, h, ctl, dtype, rng)
    rows = g.op("Gather", h, "last_token_rows", axis=0)
    lm_head = g.const(_weight("lm_head", rng.standard_normal((HIDDEN, VOCAB)) * 0.2, dtype))
    g.op("Cast", g.op("MatMul", rows, lm_head), to=TensorProto.FLOAT, out="logits")

    i32, kv_t = TensorProto.INT32, ONNX_DTYPES[dtype]
    pool_shape = [2, "num_blocks", KV_HEADS, limits.kv_block_size, HEAD_DIM]
    inputs = [
        helper.make_tensor_value_info("input_ids", i32, ["num_tokens"]),
        helper.make_tensor_value_info("position_ids", i32, ["num_tokens"]),
        helper.make_tensor_value_info("seq_starts", i32, ["batch_plus_one"]),
        helper.make_tensor_value_info("context_lens", i32, ["batch"]),
        helper.make_tensor_value_info("block_tables", i32, ["batch", "max_blocks"]),
        helper.make_tensor_value_info("last_token_rows", i32, ["batch"]),
    ] + [helper.make_tensor_value_info(f"kv_cache_{i}", kv_t, pool_shape)
         for i in range(num_layers)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", VOCAB])] + [
        helper.make_tensor_value_info(f"kv_cache_out_{i}", kv_t, pool_shape)
        for i in range(num_layers)
    ]
    graph = helper.make_graph(g.nodes, "toy_contract", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=path.name + ".data",
                    size_threshold=256)  # shape constants stay inline
    return path


def contract_inputs(num_layers: int = 2, block_size: int = 16):
    """The graph inputs as (name, shape) pairs, as onnx_graph_inputs reports them."""
    pool = (2, "num_blocks", KV_HEADS, block_size, HEAD_DIM)
    return [
        ("input_ids", ("num_tokens",)),
        ("position_ids", ("num_tokens",)),
        ("seq_starts", ("batch_plus_one",)),
        ("context_lens", ("batch",)),
        ("block_tables", ("batch", "max_blocks")),
        ("last_token_rows", ("batch",)),
    ] + [(f"kv_cache_{i}", pool) for i in range(num_layers)]


def ragged_step(num_blocks: int = 8, dtype: str = "float32", num_layers: int = 2) -> dict:
    """Sequence 0 prefills 3 tokens (positions 0-2); sequence 1 decodes position 5."""
    feeds = {
        "input_ids": np.array([1, 2, 3, 4], np.int32),
        "position_ids": np.array([0, 1, 2, 5], np.int32),
        "seq_starts": np.array([0, 3, 4], np.int32),
        "context_lens": np.array([3, 6], np.int32),
        "block_tables": np.array([[2, 0], [5, 1]], np.int32),
        "last_token_rows": np.array([2, 3], np.int32),
    }
    for i in range(num_layers):
        feeds[f"kv_cache_{i}"] = np.zeros((2, num_blocks, KV_HEADS, 16, HEAD_DIM), dtype)
    return feeds


@pytest.fixture(scope="module")
def toy_fp32(tmp_path_factory) -> Path:
    return toy_model(tmp_path_factory.mktemp("toy") / "toy.onnx")


# ------------------------------------------------------------------ build limits


def test_build_limits_defaults_and_derived():
    limits = BuildLimits()
    assert (limits.max_batch_size, limits.max_num_tokens) == (8, 512)
    assert (limits.max_seq_len, limits.kv_block_size) == (2048, 16)
    assert limits.max_blocks_per_seq == 128
    assert limits.max_num_blocks == 8 * 128
    odd = BuildLimits(max_batch_size=3, max_num_tokens=64, max_seq_len=100, kv_block_size=16)
    assert odd.max_blocks_per_seq == 7  # ceil(100 / 16): the last block is partly used
    assert odd.max_num_blocks == 21


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_batch_size": 0}, "max_batch_size must be a positive integer"),
        ({"max_seq_len": -5}, "max_seq_len must be a positive integer"),
        ({"max_num_tokens": 2.5}, "max_num_tokens must be a positive integer"),
        ({"max_batch_size": True}, "max_batch_size must be a positive integer"),
        ({"kv_block_size": 12}, "power of two from 8 to 128, got 12"),
        ({"kv_block_size": 4}, "power of two from 8 to 128, got 4"),
        ({"kv_block_size": 256}, "power of two from 8 to 128, got 256"),
        ({"max_batch_size": 16, "max_num_tokens": 8}, r"max_num_tokens \(8\) must be at least"),
    ],
)
def test_build_limits_validate_rejects_nonsense(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BuildLimits(**kwargs).validate()


@pytest.mark.parametrize("block", [8, 16, 32, 64, 128])
def test_build_limits_accepts_every_block_size(block):
    assert BuildLimits(kv_block_size=block).validate().kv_block_size == block


def test_build_limits_header_round_trip():
    limits = BuildLimits(max_batch_size=2, max_num_tokens=32, max_seq_len=300, kv_block_size=32)
    data = limits.to_dict()
    assert data == {"max_batch_size": 2, "max_num_tokens": 32, "max_seq_len": 300,
                    "kv_block_size": 32}
    assert BuildLimits.from_dict(data) == limits
    with pytest.raises(ValueError, match="unknown build limits \\['max_beams'\\]"):
        BuildLimits.from_dict({**data, "max_beams": 4})
    with pytest.raises(ValueError, match="kv_block_size"):
        BuildLimits.from_dict({**data, "kv_block_size": 3})


# ------------------------------------------------------------------ profile shapes


def test_dim_ranges_cover_decode_and_full_limits():
    ranges = dim_ranges(LIMITS)
    assert ranges == {
        "num_tokens": (1, 4, 64),  # opt: one decode token per sequence of a full batch
        "batch": (1, 4, 4),
        "batch_plus_one": (2, 5, 5),
        "max_blocks": (1, 16, 16),  # 256 / 16
        "num_blocks": (1, 64, 64),  # 4 sequences x 16 blocks
    }
    assert set(ranges) == set(DIM_NAMES)
    for lo, opt, hi in ranges.values():
        assert lo <= opt <= hi


def test_profile_shapes_of_the_contract():
    shapes = profile_shapes(contract_inputs(), LIMITS)
    assert shapes["input_ids"] == ((1,), (4,), (64,))
    assert shapes["seq_starts"] == ((2,), (5,), (5,))
    assert shapes["block_tables"] == ((1, 1), (4, 16), (4, 16))
    assert shapes["kv_cache_1"] == (
        (2, 1, KV_HEADS, 16, HEAD_DIM), (2, 64, KV_HEADS, 16, HEAD_DIM),
        (2, 64, KV_HEADS, 16, HEAD_DIM),
    )
    assert list(shapes) == [name for name, _ in contract_inputs()]


@pytest.mark.parametrize("dim", ["sequence_length", None, -1])
def test_profile_shapes_unknown_dim_is_a_clear_error(dim):
    with pytest.raises(ValueError, match=r"graph input 'input_ids' axis 0 has dimension"):
        profile_shapes([("input_ids", (dim,))], LIMITS)


def test_onnx_graph_inputs_reads_names_and_dims(toy_fp32):
    assert onnx_graph_inputs(onnx.load(str(toy_fp32), load_external_data=False)) == \
        contract_inputs()


# ------------------------------------------------------------------ the toy graph itself


def test_toy_graph_writes_the_pool_where_the_block_tables_say(toy_fp32):
    """The contract graph is honest: onnxruntime writes each token's K/V at its slot."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(toy_fp32), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, ragged_step())))
    assert out["logits"].shape == (2, VOCAB) and out["logits"].dtype == np.float32
    written = np.argwhere(np.abs(out["kv_cache_out_0"]).sum(axis=(2, 4)) > 0)
    # (k/v, physical block, offset): seq 0 -> block 2 offsets 0-2, seq 1 pos 5 -> block 5
    expected = [(kv, blk, off) for kv in (0, 1) for blk, off in [(2, 0), (2, 1), (2, 2), (5, 5)]]
    assert sorted(map(tuple, written)) == expected


# ------------------------------------------------------------------ real TensorRT-RTX builds


def expected_io(dtype: str, num_layers: int = 2):
    kv_type = TRT_DTYPES[dtype]
    pool = [2, -1, KV_HEADS, 16, HEAD_DIM]
    inputs = [
        {"name": "input_ids", "dtype": "INT32", "shape": [-1]},
        {"name": "position_ids", "dtype": "INT32", "shape": [-1]},
        {"name": "seq_starts", "dtype": "INT32", "shape": [-1]},
        {"name": "context_lens", "dtype": "INT32", "shape": [-1]},
        {"name": "block_tables", "dtype": "INT32", "shape": [-1, -1]},
        {"name": "last_token_rows", "dtype": "INT32", "shape": [-1]},
    ] + [{"name": f"kv_cache_{i}", "dtype": kv_type, "shape": pool} for i in range(num_layers)]
    outputs = [{"name": "logits", "dtype": "FLOAT", "shape": [-1, VOCAB]}] + [
        {"name": f"kv_cache_out_{i}", "dtype": kv_type, "shape": pool} for i in range(num_layers)
    ]
    return inputs, outputs


@needs_rtx
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_rtx_builds_the_contract_graph_on_the_cpu(tmp_path, dtype):
    import tensorrt_rtx

    model = toy_model(tmp_path / f"toy_{dtype}.onnx", dtype=dtype)
    assert (tmp_path / f"toy_{dtype}.onnx.data").stat().st_size > 0  # weights are external
    lines: list[str] = []
    plan, summary = build_plan(model, LIMITS, "tensorrt-rtx", log=lines.append)

    assert isinstance(plan, bytes) and len(plan) > 10_000
    assert summary["plan_bytes"] == len(plan)
    inputs, outputs = expected_io(dtype)
    assert summary["inputs"] == inputs
    assert summary["outputs"] == outputs
    # the profile TensorRT holds, read back from it, is exactly dim_ranges at every input
    expected = profile_shapes(contract_inputs(), LIMITS)
    assert summary["profile"] == {n: [list(s) for s in rng] for n, rng in expected.items()}
    assert summary["layer_types"]["SCATTER"] == 2  # one pool update per layer
    assert summary["layer_types"]["SOFTMAX"] == 2
    assert summary["layer_types"]["MATRIX_MULTIPLY"] >= 2 * 6 + 1
    assert summary["num_layers"] == sum(summary["layer_types"].values())
    assert summary["backend"] == "tensorrt-rtx"
    assert summary["library_version"] == tensorrt_rtx.__version__
    assert summary["limits"] == LIMITS.to_dict()
    assert any(line.startswith("parsed ") for line in lines)
    assert any(line.startswith("built in ") for line in lines)


@needs_rtx
def test_rtx_build_with_default_limits(tmp_path):
    """The default limits (2048 tokens of context, 1024 KV blocks) build as well."""
    limits = BuildLimits()
    model = toy_model(tmp_path / "toy.onnx", dtype="float16", num_layers=1, limits=limits)
    plan, summary = build_plan(model, limits, "tensorrt-rtx", log=lambda _: None)
    assert plan
    assert summary["profile"]["kv_cache_0"][2] == [2, 1024, KV_HEADS, 16, HEAD_DIM]
    assert summary["profile"]["block_tables"][2] == [8, 128]


@needs_rtx
def test_unsupported_node_is_a_clear_error(tmp_path, toy_fp32):
    model = onnx.load(str(toy_fp32), load_external_data=False)
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    softmax.op_type = "NoSuchOp"
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    data = toy_fp32.name + ".data"  # the broken copy refers to the same weights file
    (tmp_path / data).symlink_to(toy_fp32.parent / data)
    lines: list[str] = []
    with pytest.raises(LoweringError) as info:
        build_plan(broken, LIMITS, "tensorrt-rtx", log=lines.append)
    message = str(info.value)
    assert f"node {softmax.name} (NoSuchOp)" in message
    assert "Plugin not found" in message
    # TensorRT's own log reached this build's log (the shared logger was redirected)
    assert any(line.startswith("[tensorrt_rtx ERROR]") for line in lines)


def test_block_size_mismatch_between_graph_and_limits(toy_fp32):
    limits = BuildLimits(max_batch_size=4, max_num_tokens=64, max_seq_len=256, kv_block_size=32)
    with pytest.raises(ValueError, match="'kv_cache_0' has KV block size 16 .* kv_block_size=32"):
        build_plan(toy_fp32, limits, "tensorrt-rtx", log=lambda _: None)


def test_missing_external_weights_name_the_tensor(tmp_path):
    model = toy_model(tmp_path / "toy.onnx")
    (tmp_path / "toy.onnx.data").unlink()
    with pytest.raises(FileNotFoundError, match="weights file 'toy.onnx.data' of initializer"):
        build_plan(model, LIMITS, "tensorrt-rtx", log=lambda _: None)


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX model at"):
        build_plan(tmp_path / "nope.onnx", LIMITS, "tensorrt-rtx")


def test_unknown_symbolic_dim_fails_before_tensorrt(tmp_path, toy_fp32):
    model = onnx.load(str(toy_fp32), load_external_data=False)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "seq_len"
    path = tmp_path / "renamed.onnx"
    onnx.save(model, str(path))
    (tmp_path / "toy.onnx.data").symlink_to(toy_fp32.parent / "toy.onnx.data")
    with pytest.raises(ValueError, match="'input_ids' axis 0 has dimension 'seq_len'"):
        build_plan(path, LIMITS, "tensorrt-rtx")


# ------------------------------------------------------------------ the shim


def test_shim_names_the_pip_extra_for_a_missing_library():
    with pytest.raises(ValueError, match="unknown TensorRT backend 'tensorrtx'"):
        trt_shim.import_trt("tensorrtx")
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(trt_shim.TensorRTMissingError, match=r"pip install 'llmc\[trt\]'"):
        trt_shim.import_trt("tensorrt")
    ok, reason = trt_shim.is_importable("tensorrt")
    assert not ok and "llmc[trt]" in reason


def test_version_tuple():
    assert trt_shim.version_tuple("1.7.1.116") == (1, 7, 1, 116)
    assert trt_shim.version_tuple("10.15.1rc2") == (10, 15, 1)
    assert trt_shim.version_tuple("unknown") == ()


@needs_rtx
def test_shim_versions_for_rtx():
    versions = trt_shim.versions("tensorrt-rtx")
    assert versions["module"] == "tensorrt_rtx"
    assert trt_shim.version_tuple(versions["library_version"]) >= (1, 7)


# ------------------------------------------------------------------ TensorRT-RTX targets


@needs_rtx
def test_rtx_build_for_one_named_target(toy_fp32):
    plan, summary = build_plan(toy_fp32, LIMITS, "tensorrt-rtx", rtx_targets=["8.9"],
                               log=lambda _: None)
    assert plan and summary["rtx_targets"] == ["8.9"]


@needs_rtx
def test_rtx_has_no_hopper_target(toy_fp32):
    with pytest.raises(ValueError, match=r"unknown TensorRT-RTX target '9.0'; known: .*8\.9"):
        build_plan(toy_fp32, LIMITS, "tensorrt-rtx", rtx_targets=["9.0"], log=lambda _: None)


@needs_rtx
def test_rtx_current_target_needs_a_gpu_and_fails_clearly(toy_fp32):
    """A real build failure: "current" asks the CUDA driver for the GPU; none is here."""
    from llmc.runtime.trt_backend import list_gpus

    if list_gpus()[0]:
        pytest.skip("this machine has an NVIDIA GPU, so a 'current' build can succeed")
    with pytest.raises(LoweringError, match=r"TensorRT could not build .*\n.*CUDA"):
        build_plan(toy_fp32, LIMITS, "tensorrt-rtx", rtx_targets=["current"], log=lambda _: None)


def test_rtx_targets_only_for_rtx(toy_fp32):
    with pytest.raises(ValueError, match="tensorrt-rtx backend only"):
        build_plan(toy_fp32, LIMITS, "tensorrt", rtx_targets=["8.9"])
