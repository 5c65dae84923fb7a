"""TensorRT lowering: build limits, profile shapes, and real TensorRT-RTX builds on the CPU.

The graph lowered here is model_zoo's llama block on random weights (toy_graph.py): small,
and it has every input, output, dtype and dynamic dimension of the engine I/O contract.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from toy_graph import HEAD_DIM, KV_HEADS, LIMITS, VOCAB, contract_inputs, ragged_step, toy_model

from llmc import contract
from llmc.backends.tensorrt import shim as trt_shim
from llmc.backends.tensorrt.lower import (
    LoweringError,
    build_plan,
    onnx_graph_inputs,
    profile_shapes,
)
from llmc.devices import list_gpus
from llmc.limits import BuildLimits

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAVE_RTX, reason="tensorrt_rtx is not installed (llmc[rtx])")
TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16"}


@pytest.fixture(scope="module")
def toy_fp32(tmp_path_factory) -> Path:
    return toy_model(tmp_path_factory.mktemp("toy"))


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
    ranges = contract.dim_ranges(LIMITS)
    assert ranges == {
        "num_tokens": (1, 4, 64),  # opt: one decode token per sequence of a full batch
        "batch": (1, 4, 4),
        "batch_plus_one": (2, 5, 5),
        "max_blocks": (1, 16, 16),  # 256 / 16
        "num_blocks": (1, 64, 64),  # 4 sequences x 16 blocks
    }
    assert set(ranges) == set(contract.DIMS)
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

    model = toy_model(tmp_path, dtype=dtype)
    assert (tmp_path / "weights.bin").stat().st_size > 0  # weights are external
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
    model = toy_model(tmp_path, dtype="float16", num_layers=1, limits=limits)
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
    # the broken copy refers to the same weights file
    (tmp_path / "weights.bin").symlink_to(toy_fp32.parent / "weights.bin")
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
    model = toy_model(tmp_path)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(FileNotFoundError, match="weights file 'weights.bin' of initializer"):
        build_plan(model, LIMITS, "tensorrt-rtx", log=lambda _: None)


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX model at"):
        build_plan(tmp_path / "nope.onnx", LIMITS, "tensorrt-rtx")


def test_unknown_symbolic_dim_fails_before_tensorrt(tmp_path, toy_fp32):
    model = onnx.load(str(toy_fp32), load_external_data=False)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "seq_len"
    path = tmp_path / "renamed.onnx"
    onnx.save(model, str(path))
    (tmp_path / "weights.bin").symlink_to(toy_fp32.parent / "weights.bin")
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
    if list_gpus()[0]:
        pytest.skip("this machine has an NVIDIA GPU, so a 'current' build can succeed")
    with pytest.raises(LoweringError, match=r"TensorRT could not build .*\n.*CUDA"):
        build_plan(toy_fp32, LIMITS, "tensorrt-rtx", rtx_targets=["current"], log=lambda _: None)


def test_rtx_targets_only_for_rtx(toy_fp32):
    with pytest.raises(ValueError, match="tensorrt-rtx backend only"):
        build_plan(toy_fp32, LIMITS, "tensorrt", rtx_targets=["8.9"])


@needs_rtx
def test_a_quiet_build_says_it_is_still_building(toy_fp32, monkeypatch):
    """The builder child reports nothing while TensorRT works: the parent says so."""
    from llmc.backends.tensorrt import builder

    monkeypatch.setattr(builder, "PROGRESS_EVERY", 0.05)
    lines: list[str] = []
    build_plan(toy_fp32, LIMITS, "tensorrt-rtx", log=lines.append)
    assert any(x.startswith("tensorrt-rtx: still building (") for x in lines), lines
