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
    mtq = pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not "
                                                                     "installed")
    import torch
    import transformers
    from modelopt.torch.export import export_hf_checkpoint

    src = tiny_models["llama-gqa"][0]
    out = tmp_path_factory.mktemp("modelopt") / "tiny-fp8"
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(3, 128, (2, 48)))

    def forward_loop(m):
        with torch.no_grad():
            m(ids)

    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop=forward_loop)
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


def test_modelopt_fp8_export_builds_unquantized_when_asked(fp8_export, tmp_path):
    header = build(BuildOptions(fp8_export, tmp_path / "f.engine", backend="reference",
                                dtype="fp32", limits=LIMITS, quant=QuantOptions("none")),
                   log=lambda _: None)
    assert header.quant is None


def test_other_quantized_checkpoints_are_refused_by_name(fp8_export, tmp_path):
    folder = tmp_path / "awq"
    shutil.copytree(fp8_export, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["quant_algo"] = "W4A16_AWQ"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmcError, match="a modelopt W4A16_AWQ checkpoint .* cannot be read yet"):
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
