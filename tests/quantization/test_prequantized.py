"""Pre-quantized checkpoints: a real ModelOpt FP8 export of a tiny model builds into an FP8
engine whose weights are the checkpoint's own FP8 values, with its activation scales."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from quant_checkpoints import (
    autoawq_checkpoint,
    compressed_tensors_checkpoint,
    compressed_tensors_fp8_checkpoint,
    fp8_block_checkpoint,
    gptq_checkpoint,
)

from llmc.build import BuildOptions, build
from llmc.engine_file import EngineFile
from llmc.errors import LlmcError
from llmc.limits import BuildLimits
from llmc.passes.gemm import fused_name, fused_parts
from llmc.quantization.quantize import QuantOptions

LIMITS = BuildLimits(max_batch_size=4, max_num_tokens=64, max_seq_len=128, kv_block_size=16)


@pytest.fixture(scope="module")
def fp8_export(tiny_models, tmp_path_factory):
    """tiny llama-gqa quantized to FP8 by ModelOpt and exported as an HF folder."""
    return _export(tiny_models["llama-gqa"][0], tmp_path_factory.mktemp("modelopt") / "m",
                   "FP8_DEFAULT_CFG")


@pytest.fixture(scope="module")
def awq_export(tiny_models_d64, tmp_path_factory):
    """tiny llama-gqa (256 wide: whole INT4 blocks of 128) through ModelOpt's INT4 AWQ,
    exported as an HF folder."""
    return _export(tiny_models_d64["llama-gqa"][0], tmp_path_factory.mktemp("awq") / "m",
                   "INT4_AWQ_CFG")


@pytest.fixture(scope="module")
def fp8_kv_export(tiny_models, tmp_path_factory):
    """tiny llama-gqa, FP8 weights and an FP8 KV cache (FP8_DEFAULT_CFG + FP8_KV_CFG): the
    export carries each layer's k_proj.k_scale and v_proj.v_scale."""
    mtq = pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not "
                                                                     "installed")
    cfg = {**mtq.FP8_DEFAULT_CFG, "quant_cfg": [*mtq.FP8_DEFAULT_CFG["quant_cfg"],
                                                *mtq.FP8_KV_CFG["quant_cfg"]]}
    return _export(tiny_models["llama-gqa"][0], tmp_path_factory.mktemp("kv") / "m", cfg)


def _export(src, out, cfg):
    mtq = pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not "
                                                                     "installed")
    import torch
    import transformers
    from modelopt.torch.export import export_hf_checkpoint

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(3, 128, (2, 48)))

    def forward_loop(m):
        with torch.no_grad():
            m(ids)

    mtq.quantize(model, getattr(mtq, cfg) if isinstance(cfg, str) else cfg,
                 forward_loop=forward_loop)
    export_hf_checkpoint(model, export_dir=out)
    for f in src.glob("*token*"):
        shutil.copy(f, out)
    return out


def build_auto(src, tmp_path, words, log=lambda _: None):
    """`src` built as its own format (--quant auto), fp32, on the reference backend, into
    tmp_path / "a.engine"; its QuantInfo."""
    return build(BuildOptions(src, tmp_path / "a.engine", backend="reference", dtype="fp32",
                              limits=LIMITS, quant=QuantOptions("auto", eval_data=words)),
                 log=log).quant


def engine_tensor(engine: EngineFile, name: str) -> bytes:
    """A weight's stored bytes, found through the graph's external-data entry."""
    import onnx

    model = onnx.load_from_string(engine.section("model.onnx").tobytes())
    t = next(t for t in model.graph.initializer if t.name == name)
    info = {e.key: int(e.value) for e in t.external_data if e.key != "location"}
    return engine.section("weights.bin")[info["offset"]:info["offset"] + info["length"]] \
        .tobytes()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_modelopt_fp8_export_keeps_its_fp8_weights(fp8_export, tmp_path, words, dtype):
    lines: list[str] = []
    header = build(BuildOptions(fp8_export, tmp_path / "f.engine", backend="reference",
                                dtype=dtype, limits=LIMITS,
                                quant=QuantOptions("auto", eval_data=words)),
                   log=lines.append)
    assert any("modelopt 0.47.0 fp8 checkpoint" in line for line in lines)
    q = header.quant
    assert q.mode == "fp8" and q.gemms == 8 and "modelopt" in q.details["scales"]
    assert "calibration" not in q.details and q.accuracy.top1_agreement > 0.9
    _fp8_engine_holds(fp8_export, EngineFile(tmp_path / "f.engine"))


def test_modelopt_fp8_kv_export_gives_its_kv_scales(fp8_kv_export, tmp_path, words):
    """--kv-cache-dtype fp8 takes the export's per-layer K/V scales instead of calibrating;
    without it the build says the scales are there and builds the 16-bit cache."""
    from llmc.checkpoint import open_checkpoint

    ckpt = open_checkpoint(fp8_kv_export)   # the file as it is
    want = [[float(ckpt.tensor(f"model.layers.{i}.self_attn.{x}_proj.{x}_scale")) for x in "kv"]
            for i in range(2)]
    lines: list[str] = []
    header = build(BuildOptions(fp8_kv_export, tmp_path / "kv.engine", backend="reference",
                                dtype="fp32", limits=LIMITS,
                                quant=QuantOptions("auto", kv_cache_dtype="fp8",
                                                   eval_data=words)), log=lines.append)
    q = header.quant
    assert q.kv_cache_dtype == "fp8" and "from the modelopt" in q.details["kv_scales"]
    np.testing.assert_array_equal(q.kv_scales, want)   # the file's float32 values, bit for bit
    assert "calibration" not in q.details and not any("calibrated" in x for x in lines)
    assert any("FP8 KV-cache scales for 2 layers" in x for x in lines)
    lines.clear()
    header = build(BuildOptions(fp8_kv_export, tmp_path / "w.engine", backend="reference",
                                dtype="fp32", limits=LIMITS,
                                quant=QuantOptions("auto", eval_data=words)), log=lines.append)
    assert header.quant.kv_cache_dtype == "auto" and not header.quant.kv_scales
    assert any("--kv-cache-dtype fp8 builds an FP8 KV cache with them" in x for x in lines)


def test_modelopt_fp8_export_builds_unquantized_when_asked(fp8_export, tmp_path):
    header = build(BuildOptions(fp8_export, tmp_path / "f.engine", backend="reference",
                                dtype="fp32", limits=LIMITS, quant=QuantOptions("none")),
                   log=lambda _: None)
    assert header.quant is None


def _refused(folder, tmp_path, match, **quant_config):
    """The checkpoint with these quantization_config entries is one error matching `match`."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(quant_config)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmcError, match=match):
        build(BuildOptions(folder, tmp_path / "a.engine", backend="reference", limits=LIMITS),
              log=lambda _: None)


def test_other_quantized_checkpoints_are_refused_by_name(fp8_export, tmp_path):
    folder = tmp_path / "nvfp4"
    shutil.copytree(fp8_export, folder)
    _refused(folder, tmp_path, "a modelopt NVFP4 checkpoint .* cannot be read yet",
             quant_algo="NVFP4")


@pytest.mark.parametrize("names", [
    ["m.l.0.q_proj.weight", "m.l.0.k_proj.weight", "m.l.0.v_proj.weight"],
    ["m.l.0.mlp.gate_proj.weight", "m.l.0.mlp.up_proj.weight"],
    ["m.l.3.q_proj.bias", "m.l.3.k_proj.bias", "m.l.3.v_proj.bias"],
])
def test_fused_parts_inverts_fused_name(names):
    assert fused_parts(fused_name(names)) == names
    assert fused_parts(names[0]) == [names[0]]


def test_unpacking_undoes_modelopts_int4_packing():
    pytest.importorskip("modelopt", reason="nvidia-modelopt is not installed")
    import torch
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    from llmc.quantization.prequantized import unpack_int4_rows

    q = np.random.default_rng(5).integers(-8, 8, (6, 256))
    scale = torch.ones(6, 2)
    packed = pack_int4_in_uint8(torch.tensor(q, dtype=torch.float32), scale, 128).numpy()
    assert packed.shape == (3, 256) and (unpack_int4_rows(packed) == q).all()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_modelopt_int4_awq_export_keeps_its_int4_weights(awq_export, tmp_path, words, dtype):
    """Built as it is (--quant auto): the engine stores the checkpoint's INT4 values, and
    computes what its dequantized weights compute (exactly in fp32)."""
    from llmc.checkpoint import open_checkpoint
    from llmc.dtypes import np_dtype, to_storage
    from llmc.quantization.prequantized import unpack_int4_rows

    header = build(BuildOptions(awq_export, tmp_path / "a.engine", backend="reference",
                                dtype=dtype, limits=LIMITS,
                                quant=QuantOptions("auto", eval_data=words)),
                   log=lambda _: None)
    q = header.quant
    assert q.mode == "int4-awq" and q.gemms == 8 and "modelopt" in q.details["scales"]
    assert q.details["int4_block_sizes"] == [128]
    assert q.accuracy.top1_agreement >= (1.0 if dtype == "fp32" else 0.98)
    ckpt = open_checkpoint(awq_export)
    engine = EngineFile(tmp_path / "a.engine")
    for names in (["model.layers.0.mlp.down_proj.weight"],
                  [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"]):
        values = np.concatenate([unpack_int4_rows(ckpt.tensor(n)) for n in names])
        stored = engine_tensor(engine, (fused_name(names) if len(names) > 1 else names[0])
                               + ".int4")
        assert stored == to_storage(np.ascontiguousarray(values.T).astype(np_dtype("int4")))
    # o_proj and down_proj read x * pre_quant_scale; q/k/v's and gate/up's is in the norms
    import onnx

    graph = onnx.load_from_string(engine.section("model.onnx").tobytes())
    assert sum(n.name.startswith("AwqScale") for n in graph.graph.node) == 4


@pytest.mark.parametrize("dtype,group", [("fp32", 128), ("fp16", 128), ("fp32", 64)])
def test_autoawq_zero_points_build_exactly(tiny_models_d64, tmp_path, words, dtype, group):
    """An AutoAWQ checkpoint (zero points) built as it is: symmetric INT4 codes u - 8 with
    its scales, plus the (8 - z) s offsets through the block sums of x; it computes what its
    dequantized weights compute (to fp32 rounding), and the engine stores u - 8."""
    import onnx

    from llmc.checkpoint import open_checkpoint
    from llmc.dtypes import np_dtype, to_storage
    from llmc.quantization.prequantized import unpack_awq

    src = autoawq_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "awq", group)
    header = build(BuildOptions(src, tmp_path / "a.engine", backend="reference", dtype=dtype,
                                limits=LIMITS, quant=QuantOptions("auto", eval_data=words)),
                   log=lambda _: None)
    q = header.quant
    assert q.mode == "int4-awq" and q.gemms == 8 and "autoawq" in q.details["scales"]
    assert q.details["int4_block_sizes"] == [group]
    assert q.accuracy.top1_agreement >= (1.0 if dtype == "fp32" else 0.98)
    assert abs(q.accuracy.delta_ppl_pct) < (1e-3 if dtype == "fp32" else 1.0)
    engine = EngineFile(tmp_path / "a.engine")
    name = "model.layers.0.mlp.down_proj.qweight"
    codes = unpack_awq(open_checkpoint(src).tensor(name)).astype(np.int8) - 8   # [in, out]
    stored = engine_tensor(engine, "model.layers.0.mlp.down_proj.weight.int4")
    assert stored == to_storage(np.ascontiguousarray(codes).astype(np_dtype("int4")))
    graph = onnx.load_from_string(engine.section("model.onnx").tobytes())
    assert sum(n.name.startswith("Int4ZeroPoints") for n in graph.graph.node) == 8
    # one block-sum matrix a K (256: q/k/v, o, gate-up; 384: down), shared by the layers
    assert sorted(i.name for i in graph.graph.initializer if "block_sums" in i.name) == [
        f"int4_block_sums.256x{group}", f"int4_block_sums.384x{group}"]


def test_autoawq_formats_it_cannot_take_are_one_error(tiny_models_d64, tmp_path):
    src = autoawq_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "awq", 128)
    _refused(src, tmp_path, "AutoAWQ's 4-bit GEMM format", version="gemv")


@pytest.mark.parametrize("kind,group", [("autoawq", 128), ("autoawq", 64), ("gptq", 128),
                                        ("gptq-sym", 64), ("compressed-tensors", 64)])
def test_zero_point_checkpoints_lower_to_the_zero_point_kernels(tiny_models_d64, tmp_path,
                                                                 words, kind, group):
    """On the cuda backend every INT4 GEMM of an AutoAWQ, asymmetric GPTQ or compressed-tensors
    checkpoint takes its zero points (kernels/qgemv_zp.cu): the engine stores the checkpoint's
    z [out, in / B], a byte each, where the graph's offsets were (a fused GEMM's parts side by
    side along out). A symmetric GPTQ checkpoint's GEMMs are the symmetric kernels'."""
    from llmc.backends.cuda.plan import PLAN, WEIGHTS, Plan
    from llmc.checkpoint import open_checkpoint
    from llmc.quantization.prequantized import GPTQ_ORDER, unpack_awq

    folder = tiny_models_d64["llama-gqa"][0]
    if kind == "compressed-tensors":
        pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
        src = compressed_tensors_checkpoint(folder, tmp_path / "q", group, sym=False)
    elif kind == "autoawq":
        src = autoawq_checkpoint(folder, tmp_path / "q", group)
    else:
        src = gptq_checkpoint(folder, tmp_path / "q", group, sym=kind == "gptq-sym")
    header = build(BuildOptions(src, tmp_path / "a.engine", backend="cuda", gpu_arch="sm_90a",
                                dtype="fp16", limits=LIMITS,
                                quant=QuantOptions("auto", eval_data=words)),
                   log=lambda _: None)
    assert header.quant.mode == ("int4-awq" if kind == "autoawq" else "int4-gptq")
    assert header.quant.accuracy.passed
    engine = EngineFile(tmp_path / "a.engine")
    plan = Plan.from_dict(json.loads(engine.section(PLAN).tobytes()))
    gemms = [op for op in plan.ops if op.attrs.get("quant") == "int4"]
    assert len(gemms) == 8
    if kind == "gptq-sym":
        assert "qgemv_zp" not in plan.modules and not any(op.inputs[5] for op in gemms)
        return
    assert "qgemv_zp" in plan.modules and all(op.inputs[5] for op in gemms)
    ckpt, weights = open_checkpoint(src), engine.section(WEIGHTS)

    def zeros(part):   # the checkpoint's z [in / B, out]
        if kind == "compressed-tensors":   # zp in -8..7, unpacked by compressed-tensors
            import torch
            from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

            base = part.removesuffix("weight")
            n, k = (int(d) for d in ckpt.tensor(base + "weight_shape"))
            zp = unpack_from_int32(torch.from_numpy(np.array(ckpt.tensor(
                base + "weight_zero_point"))), 4, torch.Size([n, k // group]), packed_dim=0)
            return zp.numpy().T + 8
        packed = ckpt.tensor(part.removesuffix("weight") + "qzeros")
        return unpack_awq(packed) if kind == "autoawq" else \
            unpack_awq(packed, GPTQ_ORDER) + 1               # GPTQ's format stores z - 1
    for op in gemms:
        v = plan.values[op.inputs[5]]
        stored = np.asarray(weights[v.offset:v.offset + v.shape[0] * v.shape[1]]
                            ).reshape(v.shape)
        want = np.concatenate([zeros(p).T for p in fused_parts(op.inputs[1].removesuffix(
            ".int4"))])
        assert np.array_equal(stored, want), op.inputs[1]


@pytest.mark.parametrize("sym,fmt,group,act_order", [
    (True, "gptq", 128, False), (False, "gptq", 64, False), (False, "gptq_v2", 128, False),
    (True, "gptq", -1, True), (False, "gptq", -1, False)])
def test_gptq_builds_exactly(tiny_models_d64, tmp_path, words, sym, fmt, group, act_order):
    """A GPTQ checkpoint built as it is (--quant auto -> int4-gptq): its codes u - 8 with its
    scales, plus offsets only where zero points are not 8 (asymmetric); it computes what its
    dequantized weights compute, to fp32 rounding. group_size -1 (a group a row): blocks of
    128, the row's scale and offset repeated, which the cuda backend's kernels take too; act
    order with a single group a row puts every row in it (g_idx all 0), so it is INT4 too."""
    from llmc.checkpoint import open_checkpoint
    from llmc.quantization.prequantized import unpack_gptq_rows

    src = gptq_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "gptq", group, sym, fmt,
                          act_order)
    codes = unpack_gptq_rows(open_checkpoint(src).tensor(
        "model.layers.1.self_attn.o_proj.qweight")).astype(np.int8) - 8
    _built_as_its_own_int4(src, tmp_path, words, 128 if group == -1 else group,
                           "gptqmodel:2.2.0", codes, sym)
    if group == -1:   # one block a row would be K = 256 and 384: past the kernels' blocks
        header = build(BuildOptions(src, tmp_path / "c.engine", backend="cuda", dtype="fp16",
                                    gpu_arch="sm_90a", limits=LIMITS,
                                    quant=QuantOptions("auto", eval_data=words)),
                       log=lambda _: None)
        assert header.quant.details["int4_block_sizes"] == [128]


def _built_as_its_own_int4(src, tmp_path, words, group, producer, o_proj_codes, sym):
    """`src` built by --quant auto as int4-gptq, exact against its dequantized weights in fp32:
    the engine holds layer 1's o_proj codes ([in, out]) as given, offset GEMMs only where the
    checkpoint has zero points. Returns the engine."""
    import onnx

    from llmc.dtypes import np_dtype, to_storage

    q = build_auto(src, tmp_path, words)
    assert q.mode == "int4-gptq" and q.gemms == 8 and producer in q.details["scales"]
    assert q.details["int4_block_sizes"] == [group]
    assert q.accuracy.top1_agreement == 1.0 and abs(q.accuracy.delta_ppl_pct) < 1e-3
    engine = EngineFile(tmp_path / "a.engine")
    stored = engine_tensor(engine, "model.layers.1.self_attn.o_proj.weight.int4")
    assert stored == to_storage(np.ascontiguousarray(o_proj_codes).astype(np_dtype("int4")))
    graph = onnx.load_from_string(engine.section("model.onnx").tobytes())
    offsets = sum(n.name.startswith("Int4ZeroPoints") for n in graph.graph.node)
    assert offsets == (0 if sym else 8)
    return engine


def test_a_gptq_checkpoints_quantized_lm_head_is_built_as_it_is(tiny_models_d64, tmp_path,
                                                                 words):
    """GPTQModel's lm_head=True: the head's own codes and scales, as --quant-lm-head builds
    it, without being asked."""
    from llmc.checkpoint import open_checkpoint
    from llmc.dtypes import np_dtype, to_storage
    from llmc.quantization.prequantized import unpack_gptq_rows

    src = gptq_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "gptq", 128,
                          lm_head=True)
    q = build_auto(src, tmp_path, words)
    assert q.mode == "int4-gptq" and q.gemms == 9 and q.details["lm_head"] == "int4-gptq"
    assert q.accuracy.top1_agreement == 1.0 and abs(q.accuracy.delta_ppl_pct) < 1e-3
    codes = unpack_gptq_rows(open_checkpoint(src).tensor("lm_head.qweight")).astype(np.int8) - 8
    stored = engine_tensor(EngineFile(tmp_path / "a.engine"), "lm_head.weight.int4")
    assert stored == to_storage(np.ascontiguousarray(codes).astype(np_dtype("int4")))


def test_gptq_act_order_is_refused_as_int4_and_builds_requantized(tiny_models_d64, tmp_path,
                                                                   words):
    """Act-order blocks (desc_act) are read dequantized only: --quant auto says why and how
    to build it; --quant int4-rtn quantizes the dequantized weights again."""
    src = gptq_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "gptq", 64,
                          act_order=True)
    _act_order_refused_and_requantized(src, tmp_path, words)


def _act_order_refused_and_requantized(src, tmp_path, words):
    """--quant auto on an act-order checkpoint: one error naming the modes that build it,
    and no engine; --quant int4-rtn builds it."""
    opts = dict(backend="reference", dtype="fp32", limits=LIMITS)
    with pytest.raises(LlmcError, match="14 weights in act-order blocks.* --quant int4-awq, "
                                        "int4-rtn"):
        build(BuildOptions(src, tmp_path / "a.engine", **opts,
                           quant=QuantOptions("auto", eval_data=words)), log=lambda _: None)
    assert not (tmp_path / "a.engine").exists()
    header = build(BuildOptions(src, tmp_path / "b.engine", **opts,
                                quant=QuantOptions("int4-rtn", eval_data=words)),
                   log=lambda _: None)
    # against the dequantized checkpoint: RTN on it rounds once more
    assert header.quant.mode == "int4-rtn" and header.quant.accuracy.passed


def test_int4_block_size_is_refused_for_a_checkpoints_own_int4(tiny_models_d64, tmp_path,
                                                                words):
    """A GPTQ checkpoint's own INT4 keeps its own groups: --int4-block-size is one error;
    requantized (--quant int4-rtn) it applies."""
    src = gptq_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "gptq", 64)
    opts = dict(backend="reference", dtype="fp32", limits=LIMITS)
    with pytest.raises(LlmcError, match="not of the .*own weights: drop it"):
        build(BuildOptions(src, tmp_path / "a.engine", **opts,
                           quant=QuantOptions("auto", eval_data=words, int4_block_size=32)),
              log=lambda _: None)
    assert not (tmp_path / "a.engine").exists()
    header = build(BuildOptions(src, tmp_path / "b.engine", **opts,
                                quant=QuantOptions("int4-rtn", eval_data=words,
                                                   int4_block_size=32)), log=lambda _: None)
    assert header.quant.details["int4_block_sizes"] == [32]


def test_int4_gptq_needs_a_gptq_checkpoint(tiny_models_d64, tmp_path, words):
    with pytest.raises(LlmcError, match="--quant int4-gptq builds a GPTQ checkpoint's own .* "
                                        "an unquantized checkpoint"):
        build(BuildOptions(tiny_models_d64["llama-gqa"][0], tmp_path / "a.engine",
                           backend="reference", limits=LIMITS,
                           quant=QuantOptions("int4-gptq", eval_data=words)),
              log=lambda _: None)


def test_gptq_formats_it_cannot_take_are_one_error(tiny_models_d64, tmp_path):
    src = gptq_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "gptq", 128)
    _refused(src, tmp_path, "llmc reads 4-bit GPTQ", bits=8)


@pytest.mark.parametrize("fmt", ["autoawq", "compressed-tensors"])
def test_tensorrt_rtx_builds_zero_point_checkpoints(tiny_models_d64, tmp_path, words, fmt):
    """The real TensorRT-RTX builder on the CPU takes the zero points' form: the INT4 weights
    behind DEQUANTIZE layers (zero points 0), the offsets as plain GEMMs."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    model = tiny_models_d64["llama-gqa"][0]
    if fmt == "autoawq":
        src, mode = autoawq_checkpoint(model, tmp_path / "awq", 128), "int4-awq"
    else:
        pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
        src, mode = compressed_tensors_checkpoint(model, tmp_path / "ct", 64, sym=False), \
            "int4-gptq"
    header = build(BuildOptions(src, tmp_path / "r.engine", backend="tensorrt-rtx",
                                dtype="fp16", limits=LIMITS,
                                quant=QuantOptions("auto", eval_data=words)),
                   log=lambda _: None)
    net = header.lowering
    assert net["layer_types"].get("DEQUANTIZE", 0) == 8 and net["plan_bytes"] > 0
    assert header.quant.mode == mode and header.quant.accuracy.passed


def _hf_compressed(folder):
    """HF transformers' model of a compressed-tensors checkpoint, decompressed on load by
    compressed-tensors itself."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32,
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True)).eval()


@pytest.mark.parametrize("sym,group", [(True, 128), (False, 64), (False, -1)])
def test_compressed_tensors_w4a16_builds_its_own_int4(tiny_models_d64, tmp_path, words, sym,
                                                     group):
    """A compressed-tensors W4A16 checkpoint (llm-compressor's format) builds as it is (--quant
    auto -> int4-gptq): the engine stores its codes, offsets only where it has zero points,
    and computes what HF transformers computes on the weights compressed-tensors decompresses
    (fp32, ragged steps). -1: a scale a channel, built as blocks of 128 of it."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from hf_steps import check_ragged_steps

    from llmc.backends.reference import ReferenceSession
    from llmc.checkpoint import open_checkpoint

    src = compressed_tensors_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "ct", group,
                                        sym)
    packed = open_checkpoint(src).tensor("model.layers.1.self_attn.o_proj.weight_packed")
    codes = unpack_from_int32(torch.from_numpy(np.array(packed)), 4,
                              torch.Size([256, 256])).numpy()      # compressed-tensors' own
    engine = _built_as_its_own_int4(src, tmp_path, words, 128 if group == -1 else group,
                                    "compressed-tensors", codes.T, sym)
    # HF decompresses in fp16 (the scales' dtype): 4.5-4.8e-4 of the logits' range measured
    check_ragged_steps(ReferenceSession(engine), _hf_compressed(src), 16, "fp32", 1e-3,
                       "compressed-tensors")


def test_compressed_tensors_act_order_reads_dequantized(tiny_models_d64, tmp_path, words):
    """actorder "group" (weight_g_idx scattering a group's rows, as compressed-tensors wrote
    it before 0.20): read dequantized, each input row with its own group's scale and zero
    point; refused as INT4 with the way to build it, and built by --quant int4-rtn."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from llmc.checkpoint import open_checkpoint
    from llmc.quantization.prequantized import read_prequantized

    src = compressed_tensors_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "ct", 64,
                                        sym=False, act_order=True)
    ckpt = open_checkpoint(src)
    readers, pq = read_prequantized(ckpt.config, ckpt.readers, src)
    assert pq.unkept == 14 and not pq.int4
    for base in ("model.layers.0.mlp.down_proj.", "model.layers.1.self_attn.q_proj."):
        t = {k: torch.from_numpy(np.array(ckpt.tensor(base + k))) for k in (
            "weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx")}
        n, k = (int(d) for d in ckpt.tensor(base + "weight_shape"))
        q = unpack_from_int32(t["weight_packed"], 4, torch.Size([n, k])).numpy()
        zp = unpack_from_int32(t["weight_zero_point"], 4, torch.Size([n, k // 64]),
                               packed_dim=0).numpy()
        g = t["weight_g_idx"].numpy()
        want = (q.astype(np.float32) - zp[:, g]) * t["weight_scale"].numpy()[:, g]
        assert np.array_equal(readers[base + "weight"](), want), base
    _act_order_refused_and_requantized(src, tmp_path, words)


def _fp8_engine_holds(src, engine: EngineFile):
    """The engine stores the checkpoint's E4M3 bytes, fused GEMMs' parts side by side."""
    from llmc.checkpoint import open_checkpoint

    ckpt = open_checkpoint(src)   # the file as it is: FP8 values
    for names in (["model.layers.0.self_attn.o_proj.weight"],
                  [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"],
                  [f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up")]):
        fp8 = np.concatenate([ckpt.tensor(n) for n in names], axis=0)   # [out, in]
        stored = engine_tensor(engine, (fused_name(names) if len(names) > 1 else names[0])
                               + ".fp8")
        assert stored == np.ascontiguousarray(fp8.T).tobytes()   # the graph's [in, out]


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors_fp8_builds_its_own_fp8(tiny_models_d64, tmp_path, words, strategy):
    """A compressed-tensors FP8 checkpoint with static input scales (llm-compressor's FP8
    scheme, weight scales a row or a tensor) builds as it is (--quant auto -> fp8, nothing
    calibrated): the engine stores its E4M3 weights and computes what HF transformers
    computes on it through compressed-tensors, which quantizes the inputs with the same
    scales (fp32, ragged steps)."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    import onnx
    import torch
    import transformers
    from hf_steps import check_ragged_steps

    from llmc.backends.reference import ReferenceSession
    from llmc.checkpoint import open_checkpoint

    src = compressed_tensors_fp8_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "ct",
                                            strategy)
    lines: list[str] = []
    q = build_auto(src, tmp_path, words, lines.append)
    assert any("a compressed-tensors fp8 checkpoint (14 weights)" in x for x in lines)
    assert q.mode == "fp8" and q.gemms == 8 and "compressed-tensors" in q.details["scales"]
    assert "calibration" not in q.details and q.accuracy.top1_agreement > 0.9
    # its own input scales, for every token alike (--fp8-first-token auto: static)
    assert "fp8_first_token" not in q.details
    engine = EngineFile(tmp_path / "a.engine")
    _fp8_engine_holds(src, engine)
    ckpt = open_checkpoint(src)
    given = {float(ckpt.tensor(n)[0]) for n in ckpt.names() if n.endswith("input_scale")}
    graph = onnx.load_from_string(engine.section("model.onnx").tobytes())
    consts = {t.name: t for t in graph.graph.initializer}
    x_scales = [float(onnx.numpy_helper.to_array(consts[n.input[1]]))
                for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert len(x_scales) == 8 and set(x_scales) <= given   # bit for bit

    def worst(tolerance, **kw):
        hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
        return check_ragged_steps(ReferenceSession(engine), hf.eval(), 16, "fp32", tolerance,
                                  "compressed-tensors fp8")

    # W8A8 as compressed-tensors runs it, the inputs quantized with the checkpoint's scales:
    # measured 6e-7 of the logits' range with weight scales a row and 1.9e-2 with one a
    # tensor. Traced: every GEMM input's E4M3 bytes agree with HF's but one, an x / s of
    # -21.000004 (HF) on the midpoint between E4M3's -20 and -22, which llmc's fp32 sums
    # (another order) put a float32 ulp or two to the other side; that one input moves 26
    # of the down projection's after it. The weights alone (W8A16) are further off (5.3e-2,
    # 6.3e-2).
    w8a16 = transformers.CompressedTensorsConfig(dequantize=True)
    assert worst(3e-2) < 0.5 * worst(1.0, quantization_config=w8a16)


def test_compressed_tensors_fp8_dynamic_calibrates_its_inputs(tiny_models_d64, tmp_path,
                                                              words):
    """FP8_DYNAMIC (inputs quantized a token at run time, no input_scale): the build keeps
    the checkpoint's FP8 weights and calibrates a static scale a tensor for every GEMM input,
    as llmc's FP8 GEMMs take them; with --no-measure too (calibration runs the graph)."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    src = compressed_tensors_fp8_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "ct",
                                            dynamic=True)
    lines: list[str] = []
    header = build(BuildOptions(src, tmp_path / "a.engine", backend="reference", dtype="fp32",
                                limits=LIMITS, quant=QuantOptions(
                                    "auto", calib_data=words, calib_size=16, eval_data=words,
                                    measure=False)),
                   log=lines.append)
    assert any("fp8 checkpoint (14 weights, no input scales)" in x for x in lines)
    assert any("calibrated 8 GEMM inputs" in x for x in lines)
    q = header.quant
    assert q.mode == "fp8" and q.gemms == 8 and "compressed-tensors" in q.details["scales"]
    assert "tokens of" in q.details["calibration"]
    assert q.details["fp8_first_token"] == "dynamic"   # its inputs' scales are llmc's
    _fp8_engine_holds(src, EngineFile(tmp_path / "a.engine"))


def test_compressed_tensors_fp8_kv_scheme_gives_its_kv_scales(tiny_models_d64, tmp_path,
                                                              words):
    """An FP8 KV-cache scheme (kv_cache_scheme, each layer's self_attn.k_scale and v_scale):
    --kv-cache-dtype fp8 takes the scales instead of calibrating; a config that names the
    scheme without the scales is one error."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from llmc.checkpoint import open_checkpoint

    src = compressed_tensors_fp8_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "ct",
                                            kv=True)
    ckpt = open_checkpoint(src)
    want = [[float(ckpt.tensor(f"model.layers.{i}.self_attn.{x}_scale")[0]) for x in "kv"]
            for i in range(2)]
    lines: list[str] = []
    header = build(BuildOptions(src, tmp_path / "kv.engine", backend="reference", dtype="fp32",
                                limits=LIMITS, quant=QuantOptions(
                                    "auto", kv_cache_dtype="fp8", eval_data=words)),
                   log=lines.append)
    q = header.quant
    assert q.mode == "fp8" and q.kv_cache_dtype == "fp8"
    assert "from the compressed-tensors" in q.details["kv_scales"]
    np.testing.assert_array_equal(q.kv_scales, want)   # the file's float32 values, bit for bit
    assert "calibration" not in q.details and q.accuracy.top1_agreement > 0.9
    assert any("FP8 KV-cache scales for 2 layers" in x for x in lines)
    tensors = src / "model.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({k: v for k, v in load_file(tensors).items()
               if k != "model.layers.1.self_attn.v_scale"}, tensors)
    with pytest.raises(LlmcError, match="layer 1's KV-cache scales are not one positive K and "
                                        "one V scale"):
        build(BuildOptions(src, tmp_path / "b.engine", backend="reference", limits=LIMITS),
              log=lambda _: None)
    save_file({k: v for k, v in load_file(tensors).items()
               if k.rsplit(".", 1)[1] not in ("k_scale", "v_scale")}, tensors)
    with pytest.raises(LlmcError, match="kv_cache_scheme says FP8, but no tensor"):
        build(BuildOptions(src, tmp_path / "c.engine", backend="reference", limits=LIMITS),
              log=lambda _: None)
    assert not any(p.name.endswith(".engine") and p.name != "kv.engine"
                   for p in tmp_path.iterdir())


@pytest.mark.parametrize("change,match", [
    ({"format": "int-quantized"}, "format 'int-quantized'"),
    ({"kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "attn_head"}},
     "a KV-cache scheme other than FP8 a tensor"),
    ({"config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "int", "strategy": "channel"}, "input_activations": {
        "num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}}},
     r"8-bit int channel \+ activations"),
    ({"format": "float-quantized", "config_groups": {"group_0": {"targets": ["Linear"],
      "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                  "block_structure": [128, 128]}, "output_activations": {
          "num_bits": 8, "type": "float", "strategy": "tensor"}}}}, r"8-bit float block"),
    ({"config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 48}}}},
     "groups of a multiple of 32"),
])
def test_compressed_tensors_schemes_it_cannot_take_are_one_error(tiny_models_d64, tmp_path,
                                                                 change, match):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    src = compressed_tensors_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "ct", 128)
    _refused(src, tmp_path, "a compressed-tensors checkpoint .*" + match, **change)


@pytest.mark.parametrize("fmt,block", [("fp8", (128, 128)), ("fp8", (64, 128)),
                                       ("fp8", (96, 128)), ("compressed-tensors", (128, 128))])
def test_block_fp8_checkpoint_builds_its_own_blocks(tiny_models_d64, tmp_path, words, fmt,
                                                    block):
    """A block-wise FP8 checkpoint (HF's fine-grained FP8, DeepSeek-V3's and Qwen3-FP8's
    format; llm-compressor's FP8_BLOCK) builds as fp8-block with its own E4M3 bytes and
    scales, nothing calibrated, and computes what HF transformers computes on the
    checkpoint's dequantized weights (fp32, ragged steps; to 1e-5: the same weights). Rows
    in blocks of 96 leave a ragged last block, which HF refuses to dequantize and llmc
    takes: there the stored scales alone are checked."""
    import torch
    import transformers
    from hf_steps import check_ragged_steps

    from llmc.backends.reference import ReferenceSession
    from llmc.checkpoint import open_checkpoint

    if fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    src = fp8_block_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "q", block, fmt)
    lines: list[str] = []
    q = build_auto(src, tmp_path, words, lines.append)
    assert any("fp8-block checkpoint (14 weights)" in x for x in lines)
    assert q.mode == "fp8-block" and q.gemms == 8 and q.details["fp8_block_sizes"] == [128]
    assert "calibration" not in q.details and q.accuracy.top1_agreement > 0.9
    engine = EngineFile(tmp_path / "a.engine")
    _fp8_engine_holds(src, engine)
    name = "model.layers.0.self_attn.o_proj.weight"
    given = open_checkpoint(src).tensor(name.removesuffix("weight") + (
        "weight_scale_inv" if fmt == "fp8" else "weight_scale"))         # [out / bn, in / bk]
    n = 256
    stored = np.frombuffer(engine_tensor(engine, name + ".fp8_block_scale"), np.float32)
    np.testing.assert_array_equal(stored.reshape(-1, n), np.repeat(given, block[0], 0)[:n].T)
    if block[0] == 96:
        return
    config = {} if fmt == "fp8" else {
        "quantization_config": transformers.CompressedTensorsConfig(dequantize=True)}
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **config)
    check_ragged_steps(ReferenceSession(engine), hf.eval(), 16, "fp32", 1e-5, "block fp8")


def test_block_fp8_checkpoints_that_do_not_fit_are_one_error(tiny_models_d64, tmp_path):
    """Blocks that do not divide a weight's inputs, or no block size at all."""
    src = fp8_block_checkpoint(tiny_models_d64["llama-gqa"][0], tmp_path / "q", (128, 96))
    with pytest.raises(LlmcError, match="has 256 inputs, not whole blocks of 96"):
        build(BuildOptions(src, tmp_path / "a.engine", backend="reference", limits=LIMITS),
              log=lambda _: None)
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]["weight_block_size"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlmcError, match="weight_block_size None cannot be read yet"):
        build(BuildOptions(src, tmp_path / "a.engine", backend="reference", limits=LIMITS),
              log=lambda _: None)
    assert not (tmp_path / "a.engine").exists()


# The tiny mixtures with 64-wide heads (hidden 256) and experts whose widths are whole blocks
# of 128 (Qwen2-MoE's shared expert too): (the experts' module, the sparse layers, each stack's
# checkpoint projections, config changes, GEMMs quantized, E4M3 tensors in the checkpoint).
# GEMMs: q/k/v and o a layer, a sparse layer's two stacks (Qwen2-MoE: and its shared expert's
# gate, up and down, the gate and up apart), a dense layer's gate-up and down; the routers and
# the shared-expert gate stay 16-bit. Tensors: q, k, v, o a layer, 3 a routed expert (4 of
# them), 3 the shared expert, 3 a dense MLP.
MOE_CHECKPOINTS = {
    "mixtral-top2": ("block_sparse_moe", [0, 1], {"gate_up": ("w1", "w3"), "down": ("w2",)},
                     {}, 8, 2 * (4 + 12)),
    "qwen3moe-qknorm": ("mlp", [0], {"gate_up": ("gate_proj", "up_proj"),
                                     "down": ("down_proj",)},
                        {"moe_intermediate_size": 128}, 8, (4 + 12) + (4 + 3)),
    "qwen2moe-shared": ("mlp", [0], {"gate_up": ("gate_proj", "up_proj"),
                                     "down": ("down_proj",)},
                        {"moe_intermediate_size": 128, "shared_expert_intermediate_size": 128},
                        11, (4 + 12 + 3) + (4 + 3)),
}


@pytest.mark.parametrize("kind", list(MOE_CHECKPOINTS))
def test_block_fp8_mixture_of_experts_builds_its_own_experts(make_tiny, tmp_path, words, kind):
    """A block-wise FP8 mixture of experts in HF's fine-grained format, as Qwen3-30B-A3B-FP8
    stores it (every expert's projections E4M3 in [128, 128] blocks, each with its
    weight_scale_inv; the routers and Qwen2-MoE's shared-expert gate unquantized, in
    modules_to_not_convert): --quant auto builds fp8-block with the checkpoint's scales,
    stacks each layer's experts' own E4M3 bytes and scales bit for bit (the graph's
    [E, in, out] and [E, in / 128, out]), and computes what HF transformers computes on the
    checkpoint's dequantized weights (fp32, ragged steps, 1e-5: the same weights)."""
    import torch
    import transformers
    from hf_steps import check_ragged_steps

    from llmc.backends.reference import ReferenceSession
    from llmc.checkpoint import open_checkpoint

    moe, sparse, stacks, config, gemms, tensors = MOE_CHECKPOINTS[kind]
    src = tmp_path / "m"
    make_tiny(kind, src, head_dim_64=True, **config)
    q_src = fp8_block_checkpoint(src, tmp_path / "q")
    qc = json.loads((q_src / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"][1:] == [f"model.layers.{i}.{moe}.gate" for i in sparse] \
        + (["model.layers.0.mlp.shared_expert_gate"] if kind == "qwen2moe-shared" else [])
    lines: list[str] = []
    q = build_auto(q_src, tmp_path, words, lines.append)
    said = f"the checkpoint is a transformers fp8-block checkpoint ({tensors} weights): " \
        "building --quant fp8-block with its scales"
    assert said in lines
    assert q.mode == "fp8-block" and q.gemms == gemms and q.details["fp8_block_sizes"] == [128]
    assert q.details["scales"] == f"from the transformers fp8-block checkpoint ({tensors} " \
        "weights)" and "calibration" not in q.details and q.accuracy.top1_agreement > 0.9
    engine = EngineFile(tmp_path / "a.engine")
    ckpt = open_checkpoint(q_src)   # the file as it is: E4M3 values, float32 scales
    for layer in sparse:
        experts = [f"model.layers.{layer}.{moe}.experts.{j}" for j in range(4)]
        for stack, parts in stacks.items():
            name = f"model.layers.{layer}.{moe}.experts.{stack}.weight"
            fp8 = [np.concatenate([ckpt.tensor(f"{e}.{p}.weight") for p in parts])
                   for e in experts]                                      # each [out, in]
            want = np.stack([np.ascontiguousarray(w.T) for w in fp8])    # [E, in, out]
            assert engine_tensor(engine, name + ".fp8") == want.tobytes()
            scales = np.stack([np.repeat(np.concatenate(
                [ckpt.tensor(f"{e}.{p}.weight_scale_inv") for p in parts]), 128, 0)[
                :w.shape[0]].T for e, w in zip(experts, fp8)])          # [E, in / 128, out]
            stored = np.frombuffer(engine_tensor(engine, name + ".fp8_block_scale"), np.float32)
            assert stored.size == scales.size
            np.testing.assert_array_equal(stored.reshape(scales.shape), scales)
    hf = transformers.AutoModelForCausalLM.from_pretrained(q_src, dtype=torch.float32)
    check_ragged_steps(ReferenceSession(engine), hf.eval(), 16, "fp32", 1e-5, "block fp8 MoE")
