"""llmc calibrates the graph it ships, on onnxruntime; NVIDIA ModelOpt calibrates the HF
torch model. On the same tokens their FP8 activation amax of every GEMM input agree, and so do
the FP8 KV cache's K and V amax of every layer, so the graph's calibration is ModelOpt's
(docs/quantization.md says why the build uses its own)."""

from __future__ import annotations

import pytest

from llmc.graph import save_onnx
from llmc.model_zoo import load_model
from llmc.passes import run_passes
from llmc.quantization import kv, measure, qdq

mtq = pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not "
                                                                 "installed")

# ModelOpt's module (the one whose input is observed) -> llmc's GEMM weight, per layer
GEMMS = {"self_attn.q_proj": "self_attn.q_proj+k_proj+v_proj.weight",
         "self_attn.o_proj": "self_attn.o_proj.weight",
         "mlp.gate_proj": "mlp.gate_proj+up_proj.weight",
         "mlp.down_proj": "mlp.down_proj.weight"}


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-bias"])
def test_fp8_amax_matches_modelopt(tiny_models, tmp_path, kind):
    model, graph, weights, path, seqs = _both_sides(tiny_models[kind][0], tmp_path)
    sites = qdq.sites(graph, weights)
    ours = measure.calibrate(path, _io(model.config), {s.weight: s.x for s in sites},
                             seqs).amax
    hf = _modelopt(tiny_models[kind][0], mtq.FP8_DEFAULT_CFG, seqs)
    theirs = {}
    for name, module in hf.named_modules():
        for part, weight in GEMMS.items():
            if name.endswith(part):
                theirs[name.removesuffix(part) + weight] = float(module.input_quantizer.amax)
    assert set(ours) == set(theirs) and len(ours) == 4 * model.config.num_hidden_layers
    for weight, amax in theirs.items():
        assert ours[weight] == pytest.approx(amax, rel=1e-4), weight


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen3-qknorm"])
def test_fp8_kv_amax_matches_modelopt(tiny_models, tmp_path, kind):
    """ModelOpt's FP8_KV_CFG observes the K (after RoPE and Qwen3's k norm) and V that
    attention reads (k_bmm_quantizer, v_bmm_quantizer); llmc the rows its pool stores."""
    import numpy as np

    model, graph, weights, path, seqs = _both_sides(tiny_models[kind][0], tmp_path)
    sites = kv.kv_sites(graph, weights)
    calib = measure.calibrate(path, _io(model.config), {}, seqs,
                              values=[v for s in sites for v in s.observed])
    ours = [kv.kv_amax(s, calib.values) for s in sites]

    only_kv = {"algorithm": "max", "quant_cfg": [{"quantizer_name": "*", "enable": False},
                                                 *mtq.FP8_KV_CFG["quant_cfg"]]}
    hf = _modelopt(tiny_models[kind][0], only_kv, seqs)
    attn = [m for n, m in hf.named_modules() if n.endswith("self_attn")]
    theirs = [(float(a.k_bmm_quantizer.amax), float(a.v_bmm_quantizer.amax)) for a in attn]
    assert len(ours) == len(theirs) == model.config.num_hidden_layers
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def _both_sides(folder, tmp_path):
    """The tiny model's fused fp32 graph saved for onnxruntime, and two token sequences."""
    import numpy as np

    seqs = [list(np.random.default_rng(k).integers(3, 128, n)) for k, n in
            enumerate((40, 23))]
    model = load_model(folder)
    graph, weights = model.build_graph("float32", 16)
    graph, weights, _ = run_passes(graph, weights)
    return model, graph, weights, save_onnx(graph, weights, tmp_path), seqs


def _modelopt(folder, config, seqs):
    """The HF model (fp32) calibrated by ModelOpt with `config` over the sequences."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def forward_loop(m):
        with torch.no_grad():
            for s in seqs:
                m(torch.tensor([s]))

    mtq.quantize(hf, config, forward_loop=forward_loop)
    return hf


def _io(cfg):
    from llmc.contract import EngineIO

    return EngineIO(cfg.num_hidden_layers, cfg.vocab_size, "float32", cfg.num_key_value_heads,
                    16, cfg.head_dim)
