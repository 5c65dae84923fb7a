"""--quant int4-gguf: a GGUF file's own 4-bit blocks (Q4_0, Q4_1, Q4_K) kept as the engine's INT4
weights, read as llama.cpp stores them and checked against the gguf package's own
dequantization."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from gguf_files import common_meta, permuted_qk, write_gguf

from llmc.build import BuildOptions, build
from llmc.checkpoint import open_checkpoint
from llmc.checkpoint.gguf import GGUFFile
from llmc.errors import LlmcError
from llmc.limits import BuildLimits
from llmc.model_zoo import load_model
from llmc.model_zoo.llama import GGUF_NAMES
from llmc.quantization.quantize import QuantOptions

Q4_0, Q4_1, Q4_K, F32 = (gguf.GGMLQuantizationType[t] for t in ("Q4_0", "Q4_1", "Q4_K", "F32"))
LIMITS = BuildLimits(max_batch_size=4, max_num_tokens=128, max_seq_len=128, kv_block_size=16)


def _q4(t: np.ndarray, qtype) -> np.ndarray:
    t = np.ascontiguousarray(t, np.float32)
    return _q4_k(t) if qtype == Q4_K else gguf.quants.quantize(t, qtype)


def _q4_k(t: np.ndarray) -> np.ndarray:
    """Q4_K bytes of t [rows, cols] (the gguf package only reads them): each block of 32 its
    min/max range in 6-bit multiples of the super-block's d and dmin (llama.cpp searches
    them; plain rounding is enough for a file to read back)."""
    rows, cols = t.shape
    x = t.reshape(rows, cols // 256, 8, 32)
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    d = ((hi - lo).max(-1) / 15 / 63).astype(np.float16)
    dmin = ((-lo).max(-1) / 63).astype(np.float16)
    sc = np.clip(np.rint((hi - lo) / 15 / np.maximum(d, 1e-8)[..., None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.rint(-lo / np.maximum(dmin, 1e-8)[..., None]), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[..., None] * sc
    u = np.clip(np.rint((x + (dmin.astype(np.float32)[..., None] * mn)[..., None]) /
                        step[..., None]), 0, 15).astype(np.uint8)
    scales = np.concatenate([sc[..., :4] | (sc[..., 4:] >> 4) << 6,      # the 6-bit packing
                             mn[..., :4] | (mn[..., 4:] >> 4) << 6,      # gguf's Q4_K
                             (sc[..., 4:] & 15) | (mn[..., 4:] & 15) << 4], axis=-1)  # unpacks
    pairs = u.reshape(rows, cols // 256, 4, 2, 32)
    qs = (pairs[..., 0, :] | pairs[..., 1, :] << 4).reshape(rows, cols // 256, 128)
    return np.concatenate([d[..., None].view(np.uint8), dmin[..., None].view(np.uint8), scales,
                           qs], axis=-1).reshape(rows, -1)


def test_q4_blocks_read_as_stored(tmp_path):
    """Codes, scales and minimums as stored give back the gguf package's dequantization,
    bit for bit; 1-D and other types are not offered as blocks."""
    rng = np.random.default_rng(0)
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(path, "llama")
    mats = {"a": (rng.standard_normal((48, 96)) * 0.1, Q4_0),
            "b": (rng.standard_normal((40, 64)) + 0.3, Q4_1),
            "k": (rng.standard_normal((24, 512)) * 0.1 + 0.02, Q4_K),
            "c": (rng.random((8, 32)), F32)}
    for name, (t, qtype) in mats.items():
        w.add_tensor(name, _q4(t, qtype) if qtype != F32 else t.astype(np.float32),
                     raw_dtype=qtype if qtype != F32 else None)
    w.add_tensor("norm", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = GGUFFile(path)
    assert sorted(open_checkpoint(path).int4_blocks) == ["a", "b", "k"]
    for name in ("a", "b", "k"):
        u, d, m, kind = reader.int4_blocks(name)
        rows, cols = u.shape
        assert u.dtype == np.uint8 and u.max() <= 15 and d.shape == (rows, cols // 32)
        assert kind == mats[name][1].name and (m is None) == (name == "a")
        blocks = u.reshape(rows, -1, 32).astype(np.float32)
        x = (blocks - 8) * d[..., None] if m is None else blocks * d[..., None] + m[..., None]
        np.testing.assert_array_equal(x.reshape(rows, cols), reader.dequantize(name))
        t = mats[name][0]   # (and the test's own Q4_K writer is a 4-bit rounding of t)
        assert np.abs(x.reshape(rows, cols) - t).max() < 0.15 * np.abs(t).max(), name


def _tokenizer_meta(w: gguf.GGUFWriter, cfg) -> None:
    """A byte-level BPE without merges over 127 symbols, so text is ids < 128."""
    from tokenizers.pre_tokenizers import ByteLevel

    w.add_tokenizer_model("gpt2")
    n = cfg.vocab_size - 1   # transformers' converter adds one special token
    w.add_token_list(sorted(ByteLevel.alphabet())[:n])
    w.add_token_types([1] * n)
    w.add_token_scores([0.0] * n)
    w.add_token_merges([])


def _write_tiny_gguf(path, model, types: dict[str, object]) -> None:
    """The tiny llama as llama.cpp writes it (Q/K rows permuted), each GEMM weight stored as
    `types` says by its HF name's ending (Q4_0 / Q4_1 / Q4_K / F32), everything else F32; its
    tokenizer `_tokenizer_meta`'s."""
    cfg = model.config

    def meta(w: gguf.GGUFWriter) -> None:
        common_meta(w, cfg)
        _tokenizer_meta(w, cfg)

    def quantize(name: str, t: np.ndarray):
        qtype = next((q for end, q in types.items() if name.endswith(end)), F32)
        return None if qtype == F32 else (_q4(t, qtype), qtype)

    write_gguf(path, "llama", model, GGUF_NAMES, meta, permuted_qk(cfg), quantize=quantize)


TYPES = {"0.self_attn.q_proj.weight": Q4_0, "0.self_attn.k_proj.weight": Q4_0,
         "0.self_attn.v_proj.weight": Q4_0, "o_proj.weight": Q4_1, "gate_proj.weight": Q4_1,
         "up_proj.weight": Q4_1, "0.mlp.down_proj.weight": Q4_0,
         "1.self_attn.q_proj.weight": Q4_K, "1.self_attn.k_proj.weight": Q4_K,
         "1.self_attn.v_proj.weight": Q4_K}   # layer 1's down_proj stays F32


def test_stored_int4_is_the_dequantized_model(tiny_models_d64, tmp_path):
    """Each kept weight's codes, scales and offsets give exactly what the model reads
    dequantized (Q and K rows un-permuted alike); F32 weights are not kept."""
    _, model = tiny_models_d64["llama-gqa"]
    path = tmp_path / "t.gguf"
    _write_tiny_gguf(path, model, TYPES)
    m = load_model(path)
    pre = m.stored_int4()
    assert pre.mode == "int4-gguf" and pre.producer == "GGUF Q4_0/Q4_1/Q4_K"
    assert len(pre.int4) == 13 and "model.layers.1.mlp.down_proj.weight" not in pre.int4
    for name, w in pre.int4.items():
        q = w.values().astype(np.float32)                      # [out, in], u - 8
        assert q.min() >= -8 and q.max() <= 7 and w.block == 32
        deq = q * np.repeat(w.scale, 32, axis=1)
        if w.offset is not None:
            deq += np.repeat(w.offset, 32, axis=1)
        qtype = next(q for end, q in TYPES.items() if name.endswith(end))
        assert (w.offset is None) == w.integer_zero_points == (qtype == Q4_0), name
        np.testing.assert_allclose(deq, m.tensor(name), rtol=0, atol=1e-6, err_msg=name)


def test_a_matrix_the_family_transposes_is_not_kept():
    """GPT-2's reader transposes its Conv1D matrices: their blocks would run down the graph's
    columns, so such a matrix is left to the dequantized path."""
    from llmc.quantization.prequantized import gguf_int4

    def read(codes=True):
        return np.zeros((64, 96), np.uint8) if codes else None, np.ones((64, 3), np.float32), \
            None, "Q4_0"
    assert gguf_int4({"w": read}, "t.gguf", lambda name, a: a).int4.keys() == {"w"}
    assert gguf_int4({"w": read}, "t.gguf", lambda name, a: a.T).int4 == {}


def test_int4_gguf_needs_a_gguf_with_4bit_blocks(tiny_models_d64, tmp_path, words):
    folder, model = tiny_models_d64["llama-gqa"]
    with pytest.raises(LlmcError, match="keeps a GGUF file's own 4-bit blocks, and the model "
                                        "is not a GGUF file"):
        build(BuildOptions(folder, tmp_path / "a.engine", limits=LIMITS,
                           quant=QuantOptions("int4-gguf")), log=lambda _: None)
    path = tmp_path / "f32.gguf"
    _write_tiny_gguf(path, model, {})
    with pytest.raises(LlmcError, match=r"f32.gguf has none: use --quant int4-awq or int4-rtn"):
        build(BuildOptions(path, tmp_path / "b.engine", limits=LIMITS,
                           quant=QuantOptions("int4-gguf")), log=lambda _: None)
    path = tmp_path / "embedding.gguf"   # 4-bit, but no GEMM's weight
    _write_tiny_gguf(path, model, {"embed_tokens.weight": Q4_0})
    with pytest.raises(LlmcError, match=r"none of the GGUF Q4_0 int4-gguf checkpoint \(1 "
                                        r"weights\)'s 4-bit matrices is a GEMM weight"):
        build(BuildOptions(path, tmp_path / "c.engine", limits=LIMITS,
                           quant=QuantOptions("int4-gguf", eval_data=words)), log=lambda _: None)
    assert not list(tmp_path.glob("*.engine"))


@pytest.mark.slow
def test_int4_gguf_builds_smollm2_as_the_file_has_it(smollm2_path, tmp_path):
    """The bundled SmolLM2 (Q4_1): an INT4 engine whose weights are the file's codes, which
    computes what the dequantized fp16 model computes (up to the fp16 rounding of m + 8 d)."""
    import onnx

    from llmc.dtypes import np_dtype, to_storage
    from llmc.engine_file import EngineFile

    header = build(BuildOptions(smollm2_path, tmp_path / "g.engine", backend="reference",
                                dtype="float16", quant=QuantOptions("int4-gguf", eval_size=256)),
                   log=lambda _: None)
    q = header.quant
    assert q.mode == "int4-gguf" and q.gemms == 120 and "GGUF Q4_1" in q.details["scales"]
    assert q.details["int4_block_sizes"] == [32]
    assert abs(q.accuracy.delta_ppl_pct) < 0.2 and q.accuracy.top1_agreement >= 0.99
    engine = EngineFile(tmp_path / "g.engine")
    graph = onnx.load_from_string(engine.section("model.onnx").tobytes())
    assert sum(n.name.startswith("Int4Offsets") for n in graph.graph.node) == 120
    u, *_ = GGUFFile(smollm2_path).int4_blocks("blk.3.ffn_down.weight")     # [out, in]
    t = next(t for t in graph.graph.initializer
             if t.name == "model.layers.3.mlp.down_proj.weight.int4")
    info = {e.key: int(e.value) for e in t.external_data if e.key != "location"}
    stored = engine.section("weights.bin")[info["offset"]:info["offset"] + info["length"]]
    want = np.ascontiguousarray((u.astype(np.int8) - 8).T).astype(np_dtype("int4"))
    assert stored.tobytes() == to_storage(want)


def test_int4_gguf_builds_the_files_blocks(tiny_models_d64, tmp_path, words):
    """Reference backend, fp32: the Q4_0 and Q4_1 GEMMs keep the file's codes and compute
    what the dequantized model computes; the F32 one stays unquantized."""
    _, model = tiny_models_d64["llama-gqa"]
    path = tmp_path / "mixed.gguf"
    _write_tiny_gguf(path, model, TYPES)
    header = build(BuildOptions(path, tmp_path / "r.engine", dtype="float32", limits=LIMITS,
                                quant=QuantOptions("int4-gguf", eval_data=words)),
                   log=lambda _: None)
    q = header.quant
    assert q.mode == "int4-gguf" and q.gemms == 7 and q.details["int4_block_sizes"] == [32]
    assert q.accuracy.top1_agreement == 1.0 and abs(q.accuracy.delta_ppl_pct) < 1e-3


def test_auto_builds_a_gguf_dequantized_and_says_so(tiny_models_d64, tmp_path):
    _, model = tiny_models_d64["llama-gqa"]
    path = tmp_path / "mixed.gguf"
    _write_tiny_gguf(path, model, TYPES)
    logs = []
    header = build(BuildOptions(path, tmp_path / "a.engine", dtype="float32", limits=LIMITS,
                                quant=QuantOptions("auto")), log=logs.append)
    assert header.quant is None
    assert "the GGUF file stores 13 2-D matrices in 4-bit blocks; --quant auto builds them " \
        "dequantized (16-bit), --quant int4-gguf keeps them as they are" in logs


def test_a_mixture_of_experts_gguf_in_4_bit_blocks(make_tiny, tmp_path, words):
    """A qwen3moe file with its attention and its stacked experts in Q4_0 (Qwen3-30B-A3B's
    usual form): read dequantized (each expert as the gguf package dequantizes its stack),
    --quant auto says what each mode does with it and builds it 16-bit, --quant fp8-block
    rounds every weight, the experts' too, and int4-gguf refuses the mixture by name."""
    from gguf_files import qwen3moe_meta, stacked_experts_state

    from llmc.model_zoo.qwen3_moe import GGUF_NAMES as MOE_NAMES

    model = make_tiny("qwen3moe-qknorm", tmp_path / "hf", moe_intermediate_size=64,
                      mlp_only_layers=[])
    cfg = model.config
    state = stacked_experts_state(model, cfg.moe_intermediate_size)
    stored = {}

    def meta(w: gguf.GGUFWriter) -> None:
        qwen3moe_meta(w, cfg)
        _tokenizer_meta(w, cfg)

    def quantize(name: str, t: np.ndarray):
        if not name.endswith(("_proj.weight", "_proj.stacked")):
            return None   # the router, norms and embeddings as they are
        stored[name] = _q4(t, Q4_0)
        return stored[name], Q4_0

    path = tmp_path / "moe-q4.gguf"
    write_gguf(path, "qwen3moe", model, MOE_NAMES, meta, state=state, quantize=quantize)
    stack = "model.layers.1.mlp.experts.up_proj.stacked"
    assert stack in stored   # [E, N, K] in Q4_0 blocks along K
    want = gguf.quants.dequantize(stored[stack], Q4_0)
    m = load_model(path)
    np.testing.assert_array_equal(m.tensor("model.layers.1.mlp.experts.2.up_proj.weight"),
                                  want[2])
    assert len(m.int4_blocks) == 4 * cfg.num_hidden_layers   # the 2-D ones only

    logs = []
    header = build(BuildOptions(path, tmp_path / "a.engine", dtype="float16", limits=LIMITS,
                                quant=QuantOptions("auto")), log=logs.append)
    assert header.quant is None
    assert "the GGUF file stores 8 2-D matrices in 4-bit blocks; --quant auto builds them " \
        "dequantized (16-bit), --quant fp8-block rounds every weight, the experts' too, to " \
        "FP8 blocks (int4-gguf takes no mixture of experts yet)" in logs
    header = build(BuildOptions(path, tmp_path / "f.engine", dtype="float16", limits=LIMITS,
                                quant=QuantOptions("fp8-block", eval_data=words)),
                   log=lambda _: None)
    q = header.quant
    # a layer's fused QKV, o and its two expert stacks; the routers stay 16-bit
    assert q.mode == "fp8-block" and q.gemms == 4 * cfg.num_hidden_layers
    assert abs(q.accuracy.delta_ppl_pct) < 0.5 and q.accuracy.top1_agreement > 0.95
    with pytest.raises(LlmcError, match="^--quant int4-gguf does not quantize a mixture"):
        build(BuildOptions(path, tmp_path / "i.engine", dtype="float16", limits=LIMITS,
                           quant=QuantOptions("int4-gguf", eval_data=words)),
              log=lambda _: None)
    assert not (tmp_path / "i.engine").exists()


def test_int4_gguf_lowers_to_the_offset_kernels(tiny_models_d64, tmp_path, words):
    """cuda backend: the GEMMs with Q4_1 parts take the offsets m + 8 d themselves, [out,
    in / 32] in the dtype where the graph's offsets were (kernels/qgemv_zp.cu: w4off); the
    all-Q4_0 ones are the symmetric kernels'."""
    from llmc.backends.cuda.plan import PLAN, WEIGHTS, Plan
    from llmc.engine_file import EngineFile
    from llmc.passes.gemm import fused_parts

    _, model = tiny_models_d64["llama-gqa"]
    path = tmp_path / "mixed.gguf"
    _write_tiny_gguf(path, model, TYPES)
    header = build(BuildOptions(path, tmp_path / "c.engine", backend="cuda", gpu_arch="sm_90a",
                                dtype="float16", limits=LIMITS,
                                quant=QuantOptions("int4-gguf", eval_data=words)),
                   log=lambda _: None)
    assert header.quant.gemms == 7 and header.quant.accuracy.passed
    engine = EngineFile(tmp_path / "c.engine")
    plan = Plan.from_dict(json.loads(engine.section(PLAN).tobytes()))
    gemms = {op.inputs[1].removesuffix(".int4"): op for op in plan.ops
             if op.attrs.get("quant") == "int4"}
    assert "qgemv_zp" in plan.modules and len(gemms) == 7
    with_offsets = {name for name, op in gemms.items() if len(op.inputs) > 5 and op.inputs[5]}
    assert with_offsets == {name for name in gemms if any(
        q != Q4_0 for end, q in TYPES.items() for part in fused_parts(name)
        if part.endswith(end))}
    assert all(gemms[name].attrs.get("offsets") for name in with_offsets)
    op = gemms["model.layers.0.self_attn.o_proj.weight"]
    v = plan.values[op.inputs[5]]
    stored = np.frombuffer(engine.section(WEIGHTS)[v.offset:v.offset + 2 * v.shape[0] *
                                                   v.shape[1]], np.float16).reshape(v.shape)
    _, d, m, _ = GGUFFile(path).int4_blocks("blk.0.attn_output.weight")
    np.testing.assert_array_equal(stored, (m + 8 * d).astype(np.float16))


def _why_not_gpu() -> str:
    from llmc.devices import list_gpus

    gpus, why = list_gpus()
    if not gpus:
        return f"needs an NVIDIA GPU ({why})"
    from llmc.backends.cuda.session import runtime_missing

    return runtime_missing()


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_not_gpu()), reason=_why_not_gpu() or "-")
@pytest.mark.parametrize("graphs", [True, False])
def test_int4_gguf_cuda_engine_matches_the_reference_backend(tiny_models_d64, tmp_path, words,
                                                            graphs):
    """Q4_0 and Q4_1 GEMMs (the symmetric and the offset kernels) on the GPU against the
    reference backend's engine of the same file, over ragged prefill, decode and mixed steps
    (prefill steps of up to 37 tokens: the small-M GEMM too)."""
    from hf_steps import compare_engines

    _, model = tiny_models_d64["llama-gqa"]
    path = tmp_path / "mixed.gguf"
    _write_tiny_gguf(path, model, TYPES)
    for backend, out in (("cuda", "c.engine"), ("reference", "r.engine")):
        build(BuildOptions(path, tmp_path / out, backend=backend, dtype="float16",
                           limits=LIMITS, quant=QuantOptions("int4-gguf", eval_data=words)),
              log=lambda _: None)
    compare_engines(tmp_path / "c.engine", tmp_path / "r.engine", model.config.vocab_size,
                    LIMITS.kv_block_size, "int4-gguf", 3e-2, graphs)
