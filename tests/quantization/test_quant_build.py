"""`llmc build --quant` end to end on the tiny models: every mode builds, runs, stays within
its accuracy budget and says so in the header and `llmc inspect`; TensorRT-RTX builds the
quantized graphs with the weights kept packed (the cuda backend's quantized builds:
tests/core/backends/test_cuda_quant.py)."""

from __future__ import annotations

import pytest

from llmc.build import BuildOptions, build
from llmc.cli.main import main
from llmc.engine_file import EngineFile
from llmc.errors import LlmcError
from llmc.header import EngineHeader
from llmc.limits import BuildLimits
from llmc.quantization.quantize import QuantOptions

KINDS = ["llama-gqa", "llama-tied-rope3", "mistral-window", "qwen2-bias", "phi3-window",
         "qwen3-qknorm", "gemma2-softcap", "gemma3-local-global",
         "gpt2-learned-pos"]   # tests/conftest.py's
LIMITS = BuildLimits(max_batch_size=4, max_num_tokens=64, max_seq_len=128, kv_block_size=16)
# Random tiny models: perplexity ~ the vocabulary, and quantization noise moves it little;
# top-1 agreement is what tells a broken quantizer (~1/128 by chance) from a working one.
BUDGET = {"fp8": (0.5, 0.93), "fp8-block": (0.5, 0.93), "int4-awq": (1.0, 0.85),
          "int4-rtn": (1.0, 0.85)}
# The random Gemma models' logits are flatter (top-1 among near ties flips under any noise:
# Gemma 3 keeps 59-85% with perplexity unchanged) or soft-capped (Gemma 2 int4-awq: +2.1%
# perplexity at 99.5% agreement); they get a looser budget, still far from broken.
GEMMA_BUDGET = (3.0, 0.5)


GATES = ("*.mlp.gate_proj.*",)   # --quant-exclude: the fused gate-ups stay 16-bit


def quant(mode, words, **kw) -> QuantOptions:
    return QuantOptions(mode, calib_data=words, eval_data=words, **kw)


def _build(folder, out, mode, words, backend="reference", dtype="fp32", log=None, **kw):
    return build(BuildOptions(folder, out, backend=backend, dtype=dtype, limits=LIMITS,
                              quant=quant(mode, words, **kw)), log=log or (lambda _: None))


@pytest.mark.parametrize("mode", ["fp8", "fp8-block", "int4-awq", "int4-rtn"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_mode_builds_runs_and_meets_its_budget(tiny_models, tmp_path, words, kind, mode):
    from llmc.runtime.runner import Runner

    folder, model = tiny_models[kind]
    header = _build(folder, tmp_path / "q.engine", mode, words, dtype="fp16")
    q = header.quant
    assert q.mode == mode and q.gemms == 4 * model.config.num_hidden_layers
    max_delta, min_top1 = GEMMA_BUDGET if kind.startswith("gemma") else BUDGET[mode]
    assert abs(q.accuracy.delta_ppl_pct) <= max_delta and q.accuracy.top1_agreement >= min_top1
    assert q.accuracy.passed and q.accuracy.tokens == 600 - 3 and "words.txt" in q.accuracy.text
    # the header on disk says the same, and the engine generates
    assert EngineFile(tmp_path / "q.engine").header.quant == q
    assert EngineHeader.from_dict(header.to_dict()) == header
    assert len(Runner(tmp_path / "q.engine").generate(["w3 w4 w5"], max_new_tokens=4)[0]) > 0


@pytest.mark.parametrize("mode,measure,kind", [
    ("none", True, "llama-gqa"), ("fp8", True, "llama-gqa"), ("fp8-block", True, "llama-gqa"),
    ("int4-awq", True, "llama-gqa"), ("int4-rtn", True, "llama-gqa"),
    ("int4-rtn", False, "llama-gqa"),
    ("fp8-block", True, "qwen2moe-shared")])   # expert stacks; downs (K 48, 80) left 16-bit
def test_the_free_space_check_covers_what_the_build_writes(tiny_models, tmp_path, words, mode,
                                                           measure, kind, monkeypatch):
    """The free-space check (llmc.build.check_space) counts the unquantized graph's weights
    exactly when the build writes them, its estimate of the quantized weights before
    quantizing is not below their real size, and the disk the build takes at its peak (the
    engine written, its temporary folder not yet removed) is within what it asked."""
    from llmc import build as b

    asked, seen = [], {}
    real_check, real_write = b.check_space, b.write_engine

    def check(folder, reference_bytes, weights_bytes):
        asked.append((reference_bytes, weights_bytes))
        return real_check(folder, reference_bytes, weights_bytes)

    def write(path, *args, **kw):
        real_write(path, *args, **kw)
        files = [f for f in path.parent.rglob("*") if f.is_file()]
        seen.update(bytes=sum(f.stat().st_size for f in files),
                    reference=sum(f.stat().st_size for f in files
                                  if f.parent.name == "reference"))

    monkeypatch.setattr(b, "check_space", check)
    monkeypatch.setattr(b, "write_engine", write)
    out = tmp_path / "out"
    out.mkdir()
    _build(tiny_models[kind][0], out / "q.engine", mode, words, dtype="fp16",
           measure=measure)
    (reference, estimate), *exact = asked
    assert (reference > 0) == (seen["reference"] > 0) == (mode != "none" and measure)
    if mode != "none":   # asked again once the graph is rewritten, with the real size
        assert len(exact) == 1 and exact[0][0] == 0
        assert exact[0][1] <= estimate <= 1.25 * exact[0][1]   # a bound, and a close one
    assert seen["bytes"] <= reference + 2 * estimate + b.ENGINE_OVERHEAD


def weight_bytes(engine: EngineFile) -> int:
    """The stored bytes of every weight (without weights.bin's 64 KiB alignment)."""
    import onnx

    model = onnx.load_from_string(engine.section("model.onnx").tobytes())
    return sum(int(e.value) for t in model.graph.initializer for e in t.external_data
               if e.key == "length")


def test_weights_stay_packed(tiny_models, tmp_path, words):
    """The engine stores INT4 (two a byte) and FP8 (one byte) weights: the weights section
    shrinks by the GEMMs' share (embedding and LM head stay fp16)."""
    folder = tiny_models["llama-gqa"][0]
    sizes = {}
    for mode in ("none", "fp8", "int4-rtn"):
        _build(folder, tmp_path / f"{mode}.engine", mode, words, dtype="fp16")
        sizes[mode] = weight_bytes(EngineFile(tmp_path / f"{mode}.engine"))
    gemm_fp16 = 2 * 2 * (64 * 128 + 64 * 64 + 64 * 192 + 96 * 64)   # bytes, 2 layers
    assert sizes["none"] - sizes["fp8"] >= 0.4 * gemm_fp16
    assert sizes["none"] - sizes["int4-rtn"] >= 0.6 * gemm_fp16


def test_inspect_shows_the_accuracy_and_a_bad_build_warns(tiny_models, tmp_path, words,
                                                          capsys):
    folder = tiny_models["llama-gqa"][0]
    out = tmp_path / "q.engine"
    with pytest.raises(SystemExit) as e:
        main(["build", "--model", str(folder), "-o", str(out), "--backend", "reference",
              "--dtype", "fp32", "--quant", "int4-rtn", "--calib-data", str(words),
              "--eval-data", str(words), "--max-ppl-increase", "0", "--max-seq-len", "128"])
    assert e.value.code == 0
    err = capsys.readouterr().err
    acc = EngineFile(out).header.quant.accuracy
    assert "accuracy (int4-rtn): perplexity" in err
    assert ("WARNING: perplexity rose" in err) == (acc.delta_ppl_pct > 0)
    if acc.delta_ppl_pct > 0:   # what an RTN build may try instead
        assert "try --quant int4-awq or fp8, or --int4-zero-point, or --int4-block-size 32, " \
            "or raise --max-ppl-increase" in err
    with pytest.raises(SystemExit):
        main(["inspect", str(out)])
    shown = capsys.readouterr().out
    assert "quant: int4-rtn, 8 GEMMs" in shown and "int4_block_sizes [32, 64]" in shown
    assert f"accuracy: perplexity {acc.ppl:.3f} vs {acc.ppl_reference:.3f}" in shown


@pytest.mark.parametrize("args, message", [
    (["--quant", "int8"], "Invalid value for '--quant'"),
    (["--quant", "fp8", "--calib-data", "/nonexistent/calib.txt"], "cannot read the text file"),
    (["--quant", "int4-rtn", "--eval-size", "4"], "at least 16 tokens"),
    (["--quant", "int4-rtn", "--int4-block-size", "16"], "Invalid value for '--int4-block-size'"),
    (["--quant", "fp8", "--int4-block-size", "32"], "not of --quant fp8"),
    (["--quant", "fp8", "--int4-zero-point"], "not --quant fp8"),
    (["--int4-zero-point"], "not --quant none"),
    (["--quant-exclude", "*.mlp.*"], "nothing is quantized here"),
    (["--quant", "int4-rtn", "--quant-exclude", "gate_proj"], "matches none of the GEMMs"),
    (["--quant", "fp8", "--quant-lm-head", "--quant-exclude", "*"], "names the LM head"),
])
def test_bad_quant_options_are_one_error_line(tiny_models, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["build", "--model", str(tiny_models["llama-gqa"][0]), "-o",
              str(tmp_path / "q.engine"), "--backend", "reference", *args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "q.engine").exists()


@pytest.mark.parametrize("mode", ["int4-awq", "int4-rtn"])
def test_int4_block_size(tiny_models, tmp_path, words, mode):
    """--int4-block-size 32: every INT4 weight in blocks of 32 (the tiny Llama's K are 64 and
    96: by default 64 and 32), its scales twice as many, the accuracy measured as ever."""
    import onnx

    folder = tiny_models["llama-gqa"][0]
    header = _build(folder, tmp_path / "q.engine", mode, words, dtype="fp16",
                    int4_block_size=32)
    assert header.quant.details["int4_block_sizes"] == [32]
    assert header.quant.accuracy.passed
    model = onnx.load_from_string(EngineFile(tmp_path / "q.engine").section(
        "model.onnx").tobytes())
    blocks = {a.i for n in model.graph.node if n.op_type == "DequantizeLinear"
              for a in n.attribute if a.name == "block_size"}
    assert blocks == {32}


@pytest.mark.parametrize("mode", ["int4-awq", "int4-rtn"])
def test_int4_zero_point(tiny_models, tmp_path, words, mode):
    """--int4-zero-point: every INT4 GEMM gets the zero-point checkpoints' offset GEMM, the
    header says so, and the accuracy stays in its budget (the GEMM numerics against numpy:
    tests/quantization/test_qdq.py)."""
    import onnx

    folder = tiny_models["llama-gqa"][0]
    header = _build(folder, tmp_path / "q.engine", mode, words, dtype="fp16",
                    int4_zero_point=True)
    assert header.quant.details["int4_zero_points"] is True
    max_delta, min_top1 = BUDGET[mode]
    acc = header.quant.accuracy
    assert acc.passed and abs(acc.delta_ppl_pct) <= max_delta and acc.top1_agreement >= min_top1
    model = onnx.load_from_string(EngineFile(tmp_path / "q.engine").section(
        "model.onnx").tobytes())
    names = [n.name for n in model.graph.node]
    dq = sum(n.startswith("DequantizeInt4") for n in names)
    assert dq and sum(n.startswith("Int4ZeroPoints") for n in names) == dq


@pytest.mark.parametrize("mode", ["fp8", "fp8-block", "int4-awq", "int4-rtn"])
@pytest.mark.parametrize("kind", ["llama-gqa", "mistral-window", "gemma2-softcap"])
def test_quant_lm_head_quantizes_the_head_too(tiny_models, tmp_path, words, kind, mode):
    """--quant-lm-head: one GEMM more, the logits' producer; a tied head (llama-gqa, Gemma)
    becomes a GEMM on a transposed copy of the table, which stays for the lookup; an untied
    one (mistral-window) is quantized in place. The accuracy report measures it."""
    import onnx

    folder, model = tiny_models[kind]
    header = build(BuildOptions(folder, tmp_path / "q.engine", backend="reference",
                                dtype="fp16", limits=LIMITS,
                                quant=quant(mode, words, lm_head=True)), log=lambda _: None)
    q = header.quant
    assert q.gemms == 4 * model.config.num_hidden_layers + 1 and q.details["lm_head"] == mode
    max_delta, min_top1 = GEMMA_BUDGET if kind.startswith("gemma") else BUDGET[mode]
    assert abs(q.accuracy.delta_ppl_pct) <= 2 * max_delta and q.accuracy.passed
    graph = onnx.load_from_string(EngineFile(tmp_path / "q.engine").section(
        "model.onnx").tobytes()).graph
    names = {t.name for t in graph.initializer}
    table = "model.embed_tokens.weight"
    head = f"{table}.lm_head" if model.config.tie_word_embeddings else "lm_head.weight"
    quantized = f"{head}.{'fp8' if mode.startswith('fp8') else 'int4'}"
    assert quantized in names and head not in names and table in names
    assert not any(n.op_type == "Gemm" for n in graph.node)


@pytest.mark.parametrize("mode", ["fp8", "fp8-block", "int4-awq", "int4-rtn"])
def test_quant_exclude_leaves_the_matching_gemms_16_bit(tiny_models, tmp_path, words, mode):
    """--quant-exclude: the GEMMs whose weight names match stay unquantized (a fused gate-up
    GEMM when its gate part matches), the rest are quantized, the header counts them."""
    import onnx

    folder, model = tiny_models["llama-gqa"]
    layers = model.config.num_hidden_layers
    header = _build(folder, tmp_path / "q.engine", mode, words, dtype="fp16", exclude=GATES)
    assert header.quant.gemms == 3 * layers and header.quant.details["excluded"] == layers
    assert header.quant.accuracy.passed
    graph = onnx.load_from_string(EngineFile(tmp_path / "q.engine").section(
        "model.onnx").tobytes()).graph
    names = {t.name for t in graph.initializer}
    suffix = "fp8" if mode.startswith("fp8") else "int4"
    for i in range(layers):
        mlp = f"model.layers.{i}.mlp"
        assert f"{mlp}.gate_proj+up_proj.weight" in names
        assert f"{mlp}.gate_proj+up_proj.weight.{suffix}" not in names
        assert f"{mlp}.down_proj.weight.{suffix}" in names


def test_quant_exclude_is_refused_for_a_checkpoints_own_weights(tmp_path, capsys):
    """A GGUF file's own 4-bit blocks are kept as stored: nothing for --quant-exclude to
    leave 16-bit."""
    from llmc.build import default_model

    with pytest.raises(SystemExit) as e:
        main(["build", "--model", str(default_model()), "-o", str(tmp_path / "q.engine"),
              "--backend", "reference", "--quant", "int4-gguf", "--quant-exclude", "*"])
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1 and "kept as stored" in errors[0]
    assert not (tmp_path / "q.engine").exists()


def test_quant_lm_head_needs_a_quant_mode(tiny_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["build", "--model", str(tiny_models["llama-gqa"][0]), "-o",
              str(tmp_path / "q.engine"), "--backend", "reference", "--quant-lm-head"])
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1 and "name a --quant mode" in errors[0]


# ------------------------------------------------------------------ the other backends


@pytest.mark.parametrize("mode, layers, targets, head, zp, exclude", [
    ("int4-rtn", {"DEQUANTIZE": 8}, None, False, False, ()),
    ("fp8", {"QUANTIZE": 8, "DEQUANTIZE": 16}, ["8.9", "12.0"], False, False, ()),
    ("fp8-block", {"QUANTIZE": 0, "DEQUANTIZE": 8}, ["8.9", "12.0"], False, False, ()),
    ("int4-rtn", {"DEQUANTIZE": 9}, None, True, False, ()),   # --quant-lm-head: the head's too
    ("int4-awq", {"DEQUANTIZE": 8}, None, False, True, ()),   # --int4-zero-point
    ("int4-rtn", {"DEQUANTIZE": 6}, None, False, False, GATES),   # --quant-exclude
])
def test_tensorrt_rtx_builds_quantized_graphs(tiny_models, tmp_path, words, mode, layers,
                                              targets, head, zp, exclude):
    """The real TensorRT-RTX builder on the CPU: the Q/DQ layers are in the network (weights
    packed behind DEQUANTIZE; with zero points, the symmetric codes and the offset GEMMs; the
    GEMMs --quant-exclude names without; block-wise FP8 weights alone, x unquantized), FP8
    for Ada and Blackwell targets only."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    header = _build(tiny_models["llama-gqa"][0], tmp_path / "r.engine", mode, words,
                    backend="tensorrt-rtx", dtype="fp16", lm_head=head, int4_zero_point=zp,
                    exclude=exclude)
    net = header.lowering
    assert {k: net["layer_types"].get(k, 0) for k in layers} == layers
    assert net["rtx_targets"] == targets
    assert header.quant.accuracy.passed and net["plan_bytes"] > 0


MOE_KINDS = ["mixtral-top2", "qwen2moe-shared", "qwen3moe-qknorm"]
# GEMMs fp8-block quantizes in the tiny mixtures (2 layers; a K that no block of 32 divides
# stays 16-bit): q/k/v and o of both layers; Mixtral's two expert stacks in both layers
# (gate-up K 64, down K 96): 2 x 4 = 8. Qwen2/3-MoE's layer 0 is sparse, layer 1 dense:
# layer 0's gate-up stack (K 64) but not its down (K = the experts' width 48), layer 1's
# gate-up and down (K 96): 3 + 4 = 7 for Qwen3-MoE; Qwen2-MoE adds its shared expert's gate
# and up (two GEMMs, K 64: the sibling pass leaves them apart, docs/families.md), not its
# down (K 80): 9. The routers and Qwen2-MoE's shared-expert gate (K 64, which a block of 64
# would take) stay 16-bit (qdq._routes).
MOE_GEMMS = {"mixtral-top2": 8, "qwen2moe-shared": 9, "qwen3moe-qknorm": 7}
# their blocks: K 64 -> 64, 96 -> 32, 128 (Qwen3-MoE's o_proj, 4 heads of 32) -> 128
MOE_BLOCKS = {"mixtral-top2": [32, 64], "qwen2moe-shared": [32, 64],
              "qwen3moe-qknorm": [32, 64, 128]}
# the quantized expert stacks (E4M3 [E, K, N]) of each, by layer and stack
MOE_STACKS = {"mixtral-top2": [(0, "gate_up"), (0, "down"), (1, "gate_up"), (1, "down")],
              "qwen2moe-shared": [(0, "gate_up")], "qwen3moe-qknorm": [(0, "gate_up")]}


def _moe(kind: str) -> str:
    return "block_sparse_moe" if kind == "mixtral-top2" else "mlp"


def _graph(path):
    import onnx

    return onnx.load_from_string(EngineFile(path).section("model.onnx").tobytes()).graph


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_a_mixture_of_experts_takes_fp8_blocks(tiny_models, tmp_path, words, kind):
    """--quant fp8-block quantizes the experts' stacked [E, in, out] weights (a
    DequantizeLinear of E4M3 [E, K, N] on axis 1, a scale [E, K / B, N], read by the stack's
    MatMul), leaves the routers and Qwen2-MoE's shared-expert gate 16-bit, meets the budget,
    says so in the header and generates."""
    import onnx

    from llmc.runtime.runner import Runner

    header = _build(tiny_models[kind][0], tmp_path / "q.engine", "fp8-block", words,
                    dtype="fp16")
    q = header.quant
    assert q.mode == "fp8-block" and q.gemms == MOE_GEMMS[kind]
    assert q.details["fp8_block_sizes"] == MOE_BLOCKS[kind]
    max_delta, min_top1 = BUDGET["fp8-block"]
    assert abs(q.accuracy.delta_ppl_pct) <= max_delta and q.accuracy.top1_agreement >= min_top1
    assert q.accuracy.passed and EngineFile(tmp_path / "q.engine").header.quant == q
    graph = _graph(tmp_path / "q.engine")
    inits = {t.name: t for t in graph.initializer}
    dqs = {n.input[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    matmuls = {n.input[1]: n for n in graph.node if n.op_type == "MatMul"}
    moe = _moe(kind)
    stacks = [f"model.layers.{i}.{moe}.experts.{w}.weight.fp8" for i, w in MOE_STACKS[kind]]
    assert sorted(n for n in dqs if len(inits[n].dims) == 3) == sorted(stacks)
    for name in stacks:
        dq = dqs[name]
        e, k, n = inits[name].dims
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        assert inits[name].data_type == onnx.TensorProto.FLOAT8E4M3FN and attrs["axis"] == 1
        assert e == 4 and list(inits[dq.input[1]].dims) == [e, k // attrs["block_size"], n]
        assert inits[dq.input[1]].data_type == onnx.TensorProto.FLOAT16
        assert dq.output[0] in matmuls   # the stack's GEMM reads the dequantized experts
        assert name.removesuffix(".fp8") not in inits   # the 16-bit stack is gone
    # the routers (the sparse layers') and the shared-expert gate: 16-bit, read as they are
    sparse = range(2) if kind == "mixtral-top2" else range(1)
    routing = [f"model.layers.{i}.{moe}.gate.weight" for i in sparse] + (
        ["model.layers.0.mlp.shared_expert_gate.weight"] if kind == "qwen2moe-shared" else [])
    for name in routing:
        assert inits[name].data_type == onnx.TensorProto.FLOAT16 and name in matmuls
        assert not any(t.startswith(name) for t in inits if t != name)
    assert len(Runner(tmp_path / "q.engine").generate(["w3 w4 w5"], max_new_tokens=4)[0]) > 0


@pytest.mark.parametrize("mode", ["fp8", "int4-awq", "int4-rtn"])
@pytest.mark.parametrize("kind", MOE_KINDS)
def test_other_modes_refuse_a_mixture_of_experts(tiny_models, tmp_path, words, kind, mode):
    """The other weight modes do not take stacked experts: one clear error that names
    fp8-block, rather than an engine whose bulk stayed 16-bit."""
    with pytest.raises(LlmcError, match=f"^--quant {mode} does not quantize a mixture of "
                       r"experts yet \(the experts' stacked weights, e.g. 'model.layers.0."
                       rf"{_moe(kind)}.experts.gate_up.weight'\); build with --quant "
                       r"fp8-block \(.*\) or --quant none$"):
        _build(tiny_models[kind][0], tmp_path / "q.engine", mode, words)
    assert not (tmp_path / "q.engine").exists()


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_tensorrt_rtx_builds_fp8_block_experts(tiny_models, tmp_path, words, kind):
    """The real TensorRT-RTX builder on the CPU takes the experts' 3-D block-wise DQ (axis 1)
    as it takes the 2-D ones: one DEQUANTIZE layer a quantized GEMM (MOE_GEMMS, the stacks
    among them), none for the routers, no QUANTIZE (x stays 16-bit); FP8 targets Ada and
    Blackwell only."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    header = _build(tiny_models[kind][0], tmp_path / "r.engine", "fp8-block", words,
                    backend="tensorrt-rtx", dtype="fp16")
    net = header.lowering
    assert header.quant.gemms == MOE_GEMMS[kind]
    assert net["layer_types"]["DEQUANTIZE"] == MOE_GEMMS[kind]
    assert net["layer_types"].get("QUANTIZE", 0) == 0 and net["rtx_targets"] == ["8.9", "12.0"]
    assert header.quant.accuracy.passed and net["plan_bytes"] > 0


@pytest.mark.parametrize("kind, exclude, left", [
    # the stacks' own names (model.layers.L.<moe>.experts.{gate_up,down}.weight)
    ("mixtral-top2", "*.experts.*", [(0, "gate_up"), (0, "down"), (1, "gate_up"), (1, "down")]),
    ("mixtral-top2", "*.experts.down.*", [(0, "down"), (1, "down")]),
    # an expert's checkpoint tensor names: Mixtral's w2 (down), Qwen3-MoE's gate_proj (in
    # the stacked gate-up; not the dense layer's mlp.gate_proj, which '*.mlp.gate_proj.*'
    # names)
    ("mixtral-top2", "*.experts.*.w2.weight", [(0, "down"), (1, "down")]),
    ("qwen3moe-qknorm", "*.experts.*.gate_proj.*", [(0, "gate_up")]),
])
def test_quant_exclude_names_the_experts(tiny_models, tmp_path, words, kind, exclude, left):
    """--quant-exclude globs over a stack of experts' name and over its experts' checkpoint
    tensor names (a stack is one GEMM: any expert's name that matches leaves all of it
    16-bit, as a fused q/k/v's parts do)."""
    import onnx

    header = _build(tiny_models[kind][0], tmp_path / "x.engine", "fp8-block", words,
                    exclude=(exclude,))
    assert header.quant.gemms == MOE_GEMMS[kind] - len(left)
    assert header.quant.details["excluded"] == len(left) and header.quant.accuracy.passed
    inits = {t.name: t for t in _graph(tmp_path / "x.engine").initializer}
    for i, w in MOE_STACKS[kind]:
        name = f"model.layers.{i}.{_moe(kind)}.experts.{w}.weight"
        if (i, w) in left:
            assert name + ".fp8" not in inits and inits[name].data_type == onnx.TensorProto.FLOAT
        else:
            assert name + ".fp8" in inits and name not in inits


def test_a_build_without_its_accuracy_report_reads_no_evaluation_text(tiny_models, tmp_path):
    """QuantOptions(measure=False) (the benchmarks' builds) does not tokenize the evaluation
    text: the bundled English one, all unknown words to the tiny tokenizer, is one error
    before any work when the report is asked for, and no error when it is not."""
    def options(measure):
        return BuildOptions(tiny_models["llama-gqa"][0], tmp_path / f"{measure}.engine",
                            backend="reference", dtype="fp32", limits=LIMITS,
                            quant=QuantOptions("int4-rtn", measure=measure))

    header = build(options(False), log=lambda _: None)
    assert header.quant.mode == "int4-rtn" and header.quant.accuracy is None
    with pytest.raises(LlmcError, match="the evaluation text is .* distinct tokens"):
        build(options(True), log=lambda _: None)
    assert not (tmp_path / "True.engine").exists()


def test_fp8_calibration_takes_the_step_of_each_inputs_amax(tiny_models, tmp_path, words,
                                                            monkeypatch):
    """--quant fp8 calibrates its GEMM inputs' scales with numerics.fp8_activation_amax (a
    step of FP8_SCALE_STEPS above each |max|, chosen on the observed values); the other modes
    take the plain |max| (int4-awq keeps rows only)."""
    import numpy as np

    from llmc.contract import EngineIO
    from llmc.graph import save_onnx
    from llmc.model_zoo import load_model
    from llmc.passes import run_passes
    from llmc.quantization import measure, numerics, qdq

    folder = tiny_models["llama-gqa"][0]
    model = load_model(folder)
    graph, weights = model.build_graph("float32", 16)
    graph, weights, _ = run_passes(graph, weights)
    path = save_onnx(graph, weights, tmp_path / "g")
    c = model.config
    io = EngineIO(c.num_hidden_layers, c.vocab_size, "float32", c.num_key_value_heads, 16,
                  c.head_dim)
    seqs = [list(np.random.default_rng(k).integers(3, 128, n)) for k, n in enumerate((40, 23))]
    inputs = {s.weight: s.x for s in qdq.sites(graph, weights)}
    plain = measure.calibrate(path, io, inputs, seqs).amax
    stepped = measure.calibrate(path, io, inputs, seqs, fp8_scale_dtype="float32").amax
    _, seen = measure.GraphRunner(path, io, sorted(set(inputs.values()))).run(seqs)
    for weight, x in inputs.items():
        v = seen[x].reshape(-1, seen[x].shape[-1])
        assert stepped[weight] == numerics.fp8_activation_amax(v, "float32")
        assert any(stepped[weight] == pytest.approx(plain[weight] * s, rel=1e-12)
                   for s in numerics.FP8_SCALE_STEPS)
    assert any(stepped[w] > plain[w] for w in plain)   # the steps are taken, not just 1

    asked = []
    real = measure.calibrate
    monkeypatch.setattr(measure, "calibrate",
                        lambda *a, **kw: asked.append(kw.get("fp8_scale_dtype")) or real(*a, **kw))
    for mode in ("fp8", "int4-awq"):
        _build(folder, tmp_path / f"{mode}.engine", mode, words, dtype="fp16")
    assert asked == ["float16", None]
