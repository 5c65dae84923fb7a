"""Pre-quantized checkpoints: a real ModelOpt FP8 export of a tiny model builds into an FP8
engine whose weights are the checkpoint's own FP8 values, with its activation scales."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

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
    from llmc.checkpoint import open_checkpoint

    lines: list[str] = []
    header = build(BuildOptions(fp8_export, tmp_path / "f.engine", backend="reference",
                                dtype=dtype, limits=LIMITS,
                                quant=QuantOptions("auto", eval_data=words)),
                   log=lines.append)
    assert any("modelopt 0.47.0 fp8 checkpoint" in line for line in lines)
    q = header.quant
    assert q.mode == "fp8" and q.gemms == 8 and "modelopt" in q.details["scales"]
    assert "calibration" not in q.details and q.accuracy.top1_agreement > 0.9
    ckpt = open_checkpoint(fp8_export)   # the file as it is: FP8 values
    engine = EngineFile(tmp_path / "f.engine")
    for names in (["model.layers.0.self_attn.o_proj.weight"],
                  [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"]):
        fp8 = np.concatenate([ckpt.tensor(n) for n in names], axis=0)   # [out, in]
        stored = engine_tensor(engine, (fused_name(names) if len(names) > 1 else names[0])
                               + ".fp8")
        assert stored == np.ascontiguousarray(fp8.T).tobytes()   # the graph's [in, out]


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
    np.testing.assert_allclose(q.kv_scales, want, rtol=1e-6)
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


def test_other_quantized_checkpoints_are_refused_by_name(fp8_export, tmp_path):
    folder = tmp_path / "nvfp4"
    shutil.copytree(fp8_export, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["quant_algo"] = "NVFP4"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmcError, match="a modelopt NVFP4 checkpoint .* cannot be read yet"):
        build(BuildOptions(folder, tmp_path / "a.engine", backend="reference", limits=LIMITS),
              log=lambda _: None)


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
