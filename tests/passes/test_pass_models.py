"""Whole models through the whole pipeline: nothing unfused is left, logits still match HF,
greedy generation is unchanged, and TensorRT-RTX builds every fused graph on the CPU."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch
from passes_helpers import (
    BLOCK,
    assert_same,
    ragged_feeds,
    rel_err,
    run_ort,
    tiny_graph,
)

from llmc.backends.tensorrt.lower import build_plan
from llmc.build import BuildOptions, build
from llmc.graph import save_onnx
from llmc.limits import BuildLimits
from llmc.passes import pass_names, run_passes
from llmc.runtime.runner import Runner
from llmc.runtime.sampler import SamplingParams

KINDS = ["llama-gqa", "llama-tied-rope3", "mistral-window", "qwen2-bias", "phi3-window",
         "qwen3-qknorm", "gemma2-softcap", "gemma3-local-global", "gpt2-learned-pos",
         "mixtral-top2", "qwen2moe-shared", "qwen3moe-qknorm"]
# Ops that only the unfused chains use: none may survive the pipeline.
UNFUSED_OPS = {"ReduceMean", "Sqrt", "Reciprocal", "Sigmoid", "Neg", "ScatterND", "Softmax",
               "Erf", "Tanh", "SwiGLU"}
HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


def expected_firings(layers: int, kind: str = "llama-gqa") -> dict[str, int]:
    fired = {"rms_norm": 2 * layers + 1, "add_rms_norm": 2 * layers - 1, "layer_norm": 0,
             "add_layer_norm": 0, "gelu": 0, "swiglu": layers, "geglu": 0, "rope": 2 * layers,
             "qkv_gemm": layers, "gate_up_gemm": layers, "gated_split": layers,
             "paged_attention": layers}
    if kind.startswith("phi3"):   # q/k/v and gate/up come fused in the checkpoint
        fired.update(qkv_gemm=0, gate_up_gemm=0)
    if kind.startswith("gemma"):  # four norms a layer, GeGLU (tanh GELU) for SwiGLU
        fired.update(rms_norm=4 * layers + 1, gelu=layers, geglu=layers, swiglu=0)
    if kind.startswith(("qwen3", "gemma3")):  # and the per-head q/k norms of each layer
        fired.update(rms_norm=fired["rms_norm"] + 2 * layers)
    if kind.startswith("gpt2"):   # LayerNorm (each after a residual or the embedding sum),
        # plain tanh GELU, c_attn fused in the checkpoint, learned positions (no RoPE)
        fired.update(rms_norm=0, add_rms_norm=0, layer_norm=2 * layers + 1,
                     add_layer_norm=2 * layers, gelu=layers, swiglu=0, rope=0, qkv_gemm=0,
                     gate_up_gemm=0, gated_split=0)
    if kind.startswith("mixtral"):   # one batched gate-up GEMM of the stacked experts a layer
        fired.update(gate_up_gemm=0)
    if kind.startswith("qwen2moe"):  # layer 0: experts + a shared expert, layer 1 dense; the
        # shared expert's gate and up read x with the router and the shared gate (four
        # GEMMs: the sibling pass declines), so they stay two GEMMs and a two-input SwiGLU
        fired.update(swiglu=3, gate_up_gemm=1, gated_split=2)
    if kind.startswith("qwen3moe"):  # layer 0: experts (one batched gate-up GEMM), layer 1
        # dense; the q/k norms counted with Qwen3's above
        fired.update(gate_up_gemm=1)
    return fired


def check_fully_fused(model, report, layers: int, tied: bool, kind: str = "llama-gqa") -> None:
    assert report["fired"] == expected_firings(layers, kind)
    ops = [n.op_type for n in model.graph.node]
    if kind.startswith("gemma2"):   # the final logits' soft-cap stays as it is
        ops.remove("Tanh")
    moe = kind.startswith(("mixtral", "qwen2moe", "qwen3moe"))
    if moe:                         # the routers' softmax
        ops = [op for op in ops if op != "Softmax"]
    if kind.startswith("qwen2moe"):  # layer 0's shared expert: its gate and its SwiGLU
        for op in ("Sigmoid", "SwiGLU"):
            ops.remove(op)
    assert not UNFUSED_OPS & set(ops), sorted(UNFUSED_OPS & set(ops))
    # q/k/v and gate/up are one GEMM each: o_proj, gate_up, down, qkv per layer (+ lm_head);
    # a mixture of experts adds its router (Qwen2-MoE's first layer: and the shared
    # expert's gate, up, down and gate GEMMs; its second layer is dense, as Qwen3-MoE's)
    matmuls = {"mixtral-top2": 5 * layers, "qwen2moe-shared": 5 + 4 + 4,
               "qwen3moe-qknorm": 5 + 4}.get(kind, 4 * layers)
    assert ops.count("MatMul") == matmuls + (0 if tied else 1)


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_fuses_everything_and_matches_hf(tiny_models, kind):
    folder, hf = tiny_models[kind]
    model, weights, cfg = tiny_graph(folder)
    fused, fused_weights, report = run_passes(model, weights)
    check_fully_fused(fused, report, cfg.num_hidden_layers, cfg.tie_word_embeddings, kind)

    # A ragged step over a cache full of other data equals the unfused graph ...
    feeds = ragged_feeds(cfg, "float32")
    fused_out = run_ort(fused, fused_weights, feeds)
    assert_same(run_ort(model, weights, feeds), fused_out, "float32")
    # ... as does the graph TensorRT-RTX parses: the function bodies inlined by onnx (their
    # attribute references resolved), as tensorrt/lower.py hands it over ...
    import onnx.inliner

    inlined = onnx.inliner.inline_local_functions(fused)
    assert not inlined.functions and len({n.name for n in inlined.graph.node}) == \
        len(inlined.graph.node)   # every node named once: no TensorRT name collisions
    assert_same(fused_out, run_ort(inlined, fused_weights, feeds), "float32")
    # ... and three fresh prompts in one step equal HF's forward.
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 19, 13)]
    feeds = _prefill(prompts, cfg)
    logits = run_ort(fused, fused_weights, feeds)["logits"]
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        assert rel_err(ref, logits[row]) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_graphs_fuse_as_fp32_ones(tiny_models, kind):
    """A graph built in bf16 (what the cuda and TensorRT backends build for --dtype bf16)
    fuses as the fp32 one: the GELU chain's constants, written in bf16, still match."""
    from llmc.model_zoo import load_model

    m = load_model(tiny_models[kind][0])
    model, weights = m.build_graph("bfloat16", BLOCK)
    _, _, report = run_passes(model, weights)
    assert report["fired"] == expected_firings(m.config.num_hidden_layers, kind)


def _prefill(prompts, cfg) -> dict:
    n = [len(p) for p in prompts]
    starts = np.cumsum([0] + n).astype(np.int32)
    blocks = -(-max(n) // BLOCK)
    feeds = ragged_feeds(cfg, "float32", num_blocks=blocks * len(prompts))
    feeds.update({
        "input_ids": np.concatenate(prompts).astype(np.int32),
        "position_ids": np.concatenate([np.arange(k) for k in n]).astype(np.int32),
        "seq_starts": starts, "context_lens": np.array(n, np.int32),
        "block_tables": np.arange(blocks * len(prompts), dtype=np.int32).reshape(-1, blocks),
        "last_token_rows": starts[1:] - 1})
    return feeds


def _greedy(folder, engine, prompts, new_tokens, limits, disable=()):
    """Greedy tokens through the whole runtime on a reference engine built with `disable`d
    passes."""
    build(BuildOptions(folder, engine, backend="reference", dtype="fp32", limits=limits,
                       disable_passes=tuple(disable)), log=lambda _: None)
    runner = Runner(engine)
    results = runner.complete(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    runner.close()
    return [r.token_ids for r in results]


def test_greedy_generation_unchanged(tiny_models, tmp_path):
    folder, hf = tiny_models["llama-gqa"]
    prompts = [[1, 2, 3], list(range(10, 30)), [5] * 9]
    limits = BuildLimits(2, 16, 64, BLOCK)      # two sequences a step, chunked prefill of 16
    before = _greedy(folder, tmp_path / "a.engine", prompts, 12, limits, pass_names())
    after = _greedy(folder, tmp_path / "b.engine", prompts, 12, limits)
    assert after == before
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompts[1]]), max_new_tokens=12, do_sample=False,
                          pad_token_id=0)[0, len(prompts[1]):].tolist()
    assert after[1] == ref


def test_disable_and_dump_graphs(tiny_folders, tmp_path):
    model, weights, _ = tiny_graph(tiny_folders["llama-gqa"])
    _, _, report = run_passes(model, weights, disable=["rope"], dump_dir=tmp_path)
    assert report["fired"]["rope"] == 0 and report["fired"]["rms_norm"] == 5
    names = sorted(p.name for p in tmp_path.glob("*.onnx"))
    assert names[0] == "00-input.onnx" and len(names) == len(pass_names()) + 1
    assert "09-qkv_gemm.onnx" in names
    with pytest.raises(ValueError, match="unknown pass"):
        run_passes(model, weights, disable=["ropee"])
    assert len(model.graph.node) == report["nodes_before"]  # the input is not modified


# --- SmolLM2 ------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_pipeline_counts_and_greedy_tokens(smollm2_path, tmp_path):
    from llmc.model_zoo import load_model

    m = load_model(smollm2_path)
    cfg = m.config
    model, weights = m.build_graph("float32", BLOCK)
    t0 = time.perf_counter()
    fused, fused_weights, report = run_passes(model, weights)
    assert time.perf_counter() - t0 < 10
    check_fully_fused(fused, report, cfg.num_hidden_layers, cfg.tie_word_embeddings)
    prompt = [[504, 3575, 282, 4649, 314]]   # "The capital of France is"
    limits = BuildLimits(1, 64, 64, BLOCK)
    before = _greedy(smollm2_path, tmp_path / "a.engine", prompt, 6, limits, pass_names())
    after = _greedy(smollm2_path, tmp_path / "b.engine", prompt, 6, limits)
    assert after == before


# --- TensorRT-RTX -------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_RTX, reason="tensorrt_rtx is not installed (llmc[rtx])")
@pytest.mark.parametrize("kind,dtype", [("llama-gqa", "float16"), ("mistral-window", "float16"),
                                        ("qwen2-bias", "bfloat16"),
                                        ("llama-tied-rope3", "float32")])
def test_rtx_builds_the_fused_graph(tiny_folders, tmp_path, kind, dtype):
    from llmc.model_zoo import load_model

    m = load_model(tiny_folders[kind])
    layers = m.config.num_hidden_layers
    limits = BuildLimits(4, 64, 256, BLOCK)
    model, weights = m.build_graph(dtype, BLOCK)
    fused, fused_weights, _ = run_passes(model, weights)
    assert any(n.domain == "llmc" for n in fused.graph.node)
    types = {}
    for name, (m, w) in {"unfused": (model, weights), "fused": (fused, fused_weights)}.items():
        path = save_onnx(m, w, tmp_path / name)
        _, summary = build_plan(path, limits, "tensorrt-rtx", log=lambda _: None)
        types[name] = summary["layer_types"]
    print(kind, dtype, "fused network layers:", types["fused"])
    assert types["fused"]["ROTARY_EMBEDDING"] == 2 * layers
    assert "ROTARY_EMBEDDING" not in types["unfused"]
    # 3 fewer GEMMs a layer (q+k+v -> 1, gate+up -> 1); attention's 2 stay (inlined body).
    assert types["fused"]["MATRIX_MULTIPLY"] == types["unfused"]["MATRIX_MULTIPLY"] - 3 * layers
    # With no plugin registered the PagedAttention body is inlined: its ScatterND still
    # writes a new pool each step, so the KV cache is still copied (docs/passes.md).
    assert types["fused"]["SCATTER"] == layers


def test_cli_build_reports_passes(tiny_folders, tmp_path):
    from click.testing import CliRunner

    from llmc.cli.main import cli
    from llmc.engine_file import EngineFile

    out = tmp_path / "t.engine"
    args = ["build", "--model", str(tiny_folders["llama-gqa"]), "-o", str(out), "--backend",
            "reference", "--dtype", "fp32", "--kv-block-size", "16", "--max-seq-len", "64",
            "--disable-pass", "rope", "--dump-graphs", str(tmp_path / "dump")]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    fired = EngineFile(out).header.passes["fired"]
    assert fired["rope"] == 0 and fired["paged_attention"] == 2
    assert (tmp_path / "dump" / "12-paged_attention.onnx").is_file()
