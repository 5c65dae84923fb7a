"""Quantized engines on the cuda backend (`--quant int4-rtn | int4-awq | fp8 | fp8-block`).

CPU (the build half): every mode lowers to quantized GEMM ops; the weights file holds the
INT4 codes packed as kernels/qgemv.cu reads them, the FP8 weights [out, in] and their fp32
channel scales, the block-wise FP8 weights [out, in] and their scales [out, in / block];
FP8's GEMMs scale first tokens on their own (--fp8-first-token auto), or not with static;
FP8 is refused for targets other than Hopper and bf16 quantized builds say why they cannot
be measured.
GPU (marked `gpu`): each quantized cuda engine against the reference backend's engine of
the same model, mode and calibration (the same quantized weights) over ragged prefill,
decode and mixed steps on shuffled blocks, CUDA-graphed decode included.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmc.backends.cuda.lower import pack_int4
from llmc.backends.cuda.plan import ALIGN, PLAN, Plan, itemsize
from llmc.build import BuildOptions, build
from llmc.devices import list_gpus
from llmc.engine_file import EngineFile
from llmc.errors import LlmcError
from llmc.limits import BuildLimits
from llmc.quantization.quantize import QuantOptions

pytest.importorskip("cuda.bindings.nvrtc", reason="the kernels extra (NVRTC) is not installed")

LIMITS = BuildLimits(max_batch_size=4, max_num_tokens=128, max_seq_len=128, kv_block_size=16)
MODES = ("int4-rtn", "int4-awq", "fp8", "fp8-block")
KIND = {"int4-rtn": "int4", "int4-awq": "int4", "fp8": "fp8", "fp8-block": "fp8-block"}


def _build(folder, out, mode, words, backend="cuda", dtype="fp16", arch="sm_90a", **kw):
    q = QuantOptions(mode, calib_data=words, eval_data=words, **kw)
    extra = {"gpu_arch": arch} if backend == "cuda" else {}
    return build(BuildOptions(folder, out, backend=backend, dtype=dtype, limits=LIMITS,
                              quant=q, **extra), log=lambda _: None)


def _plan(engine: EngineFile) -> Plan:
    return Plan.from_dict(json.loads(engine.section(PLAN).tobytes()))


def unpack_int4(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """What kernels/qgemv.cu reads from the packed layout, written out the slow way: word j
    of row r holds k 8j..8j+7; (word >> 4e) & 0xf is k 8j+2e and (word >> 16+4e) & 0xf is
    k 8j+2e+1, each q + 8."""
    words = packed.view("<u4").reshape(n, k // 8)
    q = np.empty((n, k), np.int16)
    for e in range(4):
        q[:, 2 * e::8] = ((words >> (4 * e)) & 0xF).astype(np.int16) - 8
        q[:, 2 * e + 1::8] = ((words >> (16 + 4 * e)) & 0xF).astype(np.int16) - 8
    return q


def test_pack_int4_is_what_the_kernel_reads():
    rng = np.random.default_rng(0)
    n, k = 48, 96
    q = rng.integers(-8, 8, (n, k)).astype(np.int8)
    flat = (q.T.reshape(-1) & 0xF).astype(np.uint8)     # ONNX INT4 [K, N], low nibble first
    packed = pack_int4(flat[0::2] | (flat[1::2] << 4), n, k)
    assert packed.size == n * k // 2
    np.testing.assert_array_equal(unpack_int4(packed, n, k), q)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_zero_points_are_recovered_exactly_from_the_offsets(dtype):
    """lower.zero_points: z from the graph's offsets (8 - z) s and scales s, both rounded to
    the dtype (a checkpoint's fp16 scales taken to bf16 too), for every z of 0..16 and scales
    over six decades."""
    from llmc.backends.cuda.lower import zero_points
    from llmc.dtypes import np_dtype

    rng = np.random.default_rng(0)
    z = rng.integers(0, 17, (6, 300))
    s16 = (10.0 ** rng.uniform(-6, 0, z.shape)).astype(np.float16)
    s16[0, :17], z[0, :17] = 0, 8            # an all-zero block: scale 0, offset 0
    offsets = ((8 - z) * s16.astype(np.float32)).astype(np_dtype(dtype))
    got = zero_points(offsets, s16.astype(np_dtype(dtype)))
    assert got.dtype == np.uint8 and np.array_equal(got, z.T)


def test_zero_points_that_are_not_integers_are_one_error():
    from llmc.backends.cuda.lower import UnsupportedGraph, zero_points

    s = np.full((2, 3), 0.01, np.float16)
    with pytest.raises(UnsupportedGraph, match="integer zero point"):
        zero_points((s.astype(np.float32) * 2.5).astype(np.float16), s, "w")
    with pytest.raises(UnsupportedGraph, match="0..16"):
        zero_points((s.astype(np.float32) * 9).astype(np.float16), s, "w")   # z = -1


@pytest.mark.parametrize("mode,zero_point", [(m, False) for m in MODES] +
                         [("int4-rtn", True), ("int4-awq", True)])
def test_a_quantized_lm_head_writes_fp32_logits(tiny_models_d64, tmp_path, words, mode,
                                                zero_point):
    """--quant-lm-head: the logits' GEMM is quantized too and writes the fp32 logits itself
    (the INT4 kernels' _f32 entries, FP8's f32 ones); a tied head's copy is what it reads.
    With --int4-zero-point the head has its zero points too."""
    from llmc.backends.cuda.plan import int4_block_offsets

    folder, model = tiny_models_d64["llama-tied-rope3"]
    header = _build(folder, tmp_path / "h.engine", mode, words, lm_head=True,
                    int4_zero_point=zero_point)
    assert header.quant.details["lm_head"] == mode
    plan = _plan(EngineFile(tmp_path / "h.engine"))
    head = [op for op in plan.ops if op.op == "gemm"][-1]
    assert head.attrs["quant"] == KIND[mode]
    assert (int4_block_offsets(head) is not None) == zero_point
    assert head.attrs["out_dtype"] == "float32" and head.attrs["n"] == model.config.vocab_size
    assert head.inputs[1].startswith("model.embed_tokens.weight.lm_head.")
    assert not any(op.op == "cast_f32" for op in plan.ops)
    if KIND[mode] == "int4":
        _check_int4_scratch(plan, head)


def _check_int4_scratch(plan, head):
    """The quantized GEMMs' workspace: an INT4 weight dequantized only where a step can pass
    the small-M GEMM's rows (the head's rows are the step's sequences, not its tokens).
    (This model's K of 64 is one chunk: the small-M GEMM never splits it.)"""
    from llmc.backends.cuda.program import qgemm_scratch
    from llmc.plugins import launch_rules as lr

    def deq(op):
        return op.attrs["n"] * op.attrs["k"] * 2

    layers = max(deq(op) for op in plan.ops if op.op == "gemm" and op is not head)
    assert qgemm_scratch(plan, lr.W4_GEMM_MAX_M, lr.W4_GEMM_MAX_M, 132) == (0, 0)
    assert qgemm_scratch(plan, 2048, lr.W4_GEMM_MAX_M, 132) == (layers, 0)   # long prompts
    assert qgemm_scratch(plan, 2048, 256, 132) == (max(layers, deq(head)), 0)   # and batches
    assert qgemm_scratch(plan, lr.W4_GEMM_MAX_M, 256, 132) == (deq(head), 0)    # the head alone


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_lowers_to_quantized_gemms(tiny_models_d64, tmp_path, words, mode):
    import onnx

    folder, model = tiny_models_d64["llama-gqa"]
    out = tmp_path / f"{mode}.engine"
    header = _build(folder, out, mode, words)
    assert header.quant.mode == mode and header.quant.accuracy.passed
    engine = EngineFile(out)
    plan = _plan(engine)
    gemms = [op for op in plan.ops if op.op == "gemm"]
    layers = model.config.num_hidden_layers
    kind = KIND[mode]
    # compiled only for quantized plans, the block-wise FP8 kernels apart
    assert ("qgemv" in plan.modules) == (kind != "fp8-block")
    assert ("qgemv_fp8b" in plan.modules) == (kind == "fp8-block")
    # q/k/v, o, gate-up (SwiGLU fused), down per layer quantized; the LM head stays 16-bit
    assert [op.attrs.get("quant") for op in gemms] == [kind] * 4 * layers + [None]
    assert [op.attrs.get("act") for op in gemms[:4]] == [None, None, "swiglu", None]
    # AWQ's 1/s: in the norms before q/k/v and gate-up (their only reader), on x for o, down
    awq = [False, True, False, True] if mode == "int4-awq" else [False] * 4
    assert [op.inputs[4] is not None for op in gemms[:-1]] == awq * layers
    # FP8: a sequence's first token scaled on its own (--fp8-first-token auto: dynamic here)
    assert [bool(op.attrs.get("first_token")) for op in gemms] == \
        [kind == "fp8"] * 4 * layers + [False]
    assert ("fp8_first_token" in header.quant.details) == (kind == "fp8")

    # the stored weights against the reference backend's graph of the same build
    ref_out = tmp_path / f"{mode}-ref.engine"
    _build(folder, ref_out, mode, words, backend="reference")
    ref = EngineFile(ref_out)
    graph = onnx.load_from_string(ref.section("model.onnx").tobytes())
    ref_weights = ref.section("weights.bin")
    weights = engine.section("weights")

    def graph_tensor(name):
        t = next(i for i in graph.graph.initializer if i.name == name)
        info = {e.key: e.value for e in t.external_data}
        lo = int(info["offset"])
        return np.asarray(ref_weights[lo:lo + int(info["length"])]), list(t.dims), t.data_type

    def stored(name):
        v = plan.values[name]
        size = int(np.prod(v.shape)) * itemsize(v.dtype)
        return np.asarray(weights[v.offset:v.offset + size]), v.shape

    for op in gemms[:-1]:
        raw, dims, _ = graph_tensor(op.inputs[1])
        k, n = dims
        got, shape = stored(op.inputs[1])
        if kind != "fp8":
            if kind == "int4":
                assert shape == [n, k // 2]
                np.testing.assert_array_equal(got, pack_int4(raw, n, k))
            else:
                assert shape == [n, k]
                np.testing.assert_array_equal(got.reshape(n, k), raw.reshape(k, n).T)
            sraw, sdims, _ = graph_tensor(op.inputs[3])
            sgot, _ = stored(op.inputs[3])
            np.testing.assert_array_equal(sgot.view("<u2").reshape(n, -1),
                                          sraw.view("<u2").reshape(sdims).T)
        else:
            assert shape == [n, k]
            np.testing.assert_array_equal(got.reshape(n, k), raw.reshape(k, n).T)
            sraw, _, _ = graph_tensor(op.attrs["scale_from"])
            sgot, _ = stored(op.inputs[3])
            assert op.attrs["x_scale"] > 0
            np.testing.assert_array_equal(
                sgot.view("<f4"), sraw.view("<f2").astype(np.float32) * np.float32(
                    op.attrs["x_scale"]))


def test_fp8_static_first_token_lowers_the_plain_gemms(tiny_models_d64, tmp_path, words):
    """--fp8-first-token static: the Q/DQ alone, as TensorRT takes it; no GEMM reads the
    first-token flags, and the session allocates none."""
    from llmc.backends.cuda.program import first_tokens

    folder, _ = tiny_models_d64["llama-gqa"]
    header = _build(folder, tmp_path / "s.engine", "fp8", words, fp8_first_token="static")
    assert "fp8_first_token" not in header.quant.details
    plan = _plan(EngineFile(tmp_path / "s.engine"))
    assert not first_tokens(plan)
    assert sum(op.attrs.get("quant") == "fp8" for op in plan.ops) > 0


@pytest.mark.parametrize("mode", MODES)
def test_quant_exclude_lowers_the_excluded_gemms_16_bit(tiny_models_d64, tmp_path, words, mode):
    """--quant-exclude: the matching GEMMs (here the fused gate-ups) lower to 16-bit GEMMs
    (llmc's GEMV at decode, SwiGLU still fused) beside the quantized ones."""
    folder, model = tiny_models_d64["llama-gqa"]
    _build(folder, tmp_path / "x.engine", mode, words, exclude=("*.mlp.gate_proj.*",))
    gemms = [op for op in _plan(EngineFile(tmp_path / "x.engine")).ops if op.op == "gemm"]
    kind = KIND[mode]
    assert [op.attrs.get("quant") for op in gemms] == \
        [kind, kind, None, kind] * model.config.num_hidden_layers + [None]
    assert [op.attrs.get("act") for op in gemms[:4]] == [None, None, "swiglu", None]


@pytest.mark.parametrize("mode", ["int4-rtn", "int4-awq"])
def test_int4_zero_point_builds_take_the_zero_point_kernels(tiny_models_d64, tmp_path, words,
                                                            mode):
    """--int4-zero-point: the graph's offsets become a zero point a row and block (a byte,
    0..15), and the plan compiles the zero-point kernels, as for an AutoAWQ checkpoint."""
    from llmc.backends.cuda.plan import int4_block_offsets

    folder, model = tiny_models_d64["llama-gqa"]
    out = tmp_path / "zp.engine"
    header = _build(folder, out, mode, words, int4_zero_point=True)
    assert header.quant.details["int4_zero_points"] is True
    engine = EngineFile(out)
    plan = _plan(engine)
    assert "qgemv_zp" in plan.modules
    gemms = [op for op in plan.ops if op.op == "gemm" and op.attrs.get("quant") == "int4"]
    assert len(gemms) == 4 * model.config.num_hidden_layers
    weights = engine.section("weights")
    for op in gemms:
        zp = int4_block_offsets(op)
        assert zp is not None and not op.attrs.get("offsets")
        v = plan.values[zp]
        z = np.asarray(weights[v.offset:v.offset + int(np.prod(v.shape))])
        assert z.max() <= 15 and (z != 8).any()   # asymmetric blocks: not all z = 8


MOE_KINDS = ["mixtral-top2", "qwen2moe-shared", "qwen3moe-qknorm"]


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_fp8_block_experts_lower_to_the_moe_ops_fp8_kernels(tiny_models_d64, tmp_path, words,
                                                           kind):
    """A mixture of experts with --quant fp8-block: each moe op reads the experts' E4M3
    bytes as [E, out, in] (each expert's matrix of the reference graph transposed, byte for
    byte) and their block scales as the graph holds them, [E, in / B, out]; the plan compiles
    kernels/moe_fp8b.cu; the router and the shared-expert gate stay 16-bit GEMMs. The Qwen
    models' experts are 48 wide, which no block of 32 divides: their down stacks stay 16-bit
    beside FP8 gate-ups (the op takes each GEMM's kind on its own)."""
    import onnx

    folder, model = tiny_models_d64[kind]
    out = tmp_path / "m.engine"
    _build(folder, out, "fp8-block", words)
    engine = EngineFile(out)
    plan = _plan(engine)
    assert "moe" in plan.modules and "moe_fp8b" in plan.modules
    # every weight where cuBLASLt takes it (the small ones too: scales, Qwen2-MoE's [H, 1] gate)
    assert all(v.offset % ALIGN == 0 for v in plan.values.values() if v.where == "weight")
    moes = [op for op in plan.ops if op.op == "moe"]
    assert moes
    _build(folder, tmp_path / "r.engine", "fp8-block", words, backend="reference")
    ref = EngineFile(tmp_path / "r.engine")
    graph = onnx.load_from_string(ref.section("model.onnx").tobytes())
    inits = {t.name: t for t in graph.graph.initializer}
    ref_weights, weights = ref.section("weights.bin"), engine.section("weights")

    def graph_tensor(name):
        info = {e.key: e.value for e in inits[name].external_data}
        lo = int(info["offset"])
        return np.asarray(ref_weights[lo:lo + int(info["length"])]), list(inits[name].dims)

    def stored(name):
        v = plan.values[name]
        size = int(np.prod(v.shape)) * itemsize(v.dtype)
        return np.asarray(weights[v.offset:v.offset + size]), v.shape, v.dtype

    fp8_down = kind == "mixtral-top2"
    for op in moes:
        assert (op.inputs[7] is not None) == fp8_down
        assert ("down_group" in op.attrs) == fp8_down
        for w, scale, group in ((op.inputs[2], op.inputs[6], "gate_up_group"),
                                (op.inputs[3], op.inputs[7], "down_group")):
            if scale is None:
                assert not w.endswith(".fp8") and stored(w)[2] == "float16"
                continue
            raw, (e, k, n) = graph_tensor(w)
            got, shape, dtype = stored(w)
            assert w.endswith(".fp8") and dtype == "float8e4m3fn" and shape == [e, n, k]
            np.testing.assert_array_equal(got.reshape(e, n, k),
                                          raw.reshape(e, k, n).transpose(0, 2, 1))
            sraw, sdims = graph_tensor(scale)
            sgot, sshape, _ = stored(scale)
            assert sshape == sdims == [e, k // op.attrs[group], n]
            np.testing.assert_array_equal(sgot, sraw)
    # the router's logits (and Qwen2-MoE's shared-expert gate) from 16-bit GEMMs
    gemms = {o: op for op in plan.ops if op.op == "gemm" for o in op.outputs}
    for op in moes:
        for v in (op.inputs[0], op.inputs[4]):
            if v is not None:
                assert gemms[v].attrs.get("quant") is None


def test_fp8_needs_a_hopper_target(tiny_models_d64, tmp_path, words):
    folder = tiny_models_d64["llama-gqa"][0]
    with pytest.raises(LlmcError, match="--quant fp8: FP8 engines are built for Hopper "
                                        r"\(sm_90a\), and the target is sm_89"):
        _build(folder, tmp_path / "f.engine", "fp8", words, arch="sm_89")
    assert not (tmp_path / "f.engine").exists()
    _build(folder, tmp_path / "i.engine", "int4-rtn", words, arch="sm_80")   # INT4: any GPU


def test_bf16_quantized_builds_say_why_they_cannot_be_measured(tiny_models_d64, tmp_path,
                                                               words):
    folder = tiny_models_d64["llama-gqa"][0]
    with pytest.raises(LlmcError, match="no bf16 MatMul on the CPU; build with --dtype fp16"):
        _build(folder, tmp_path / "b.engine", "int4-rtn", words, dtype="bf16")
    # a benchmark build, unmeasured, needs no onnxruntime: RTN on bf16 builds
    header = _build(folder, tmp_path / "b.engine", "int4-rtn", words, dtype="bf16",
                    measure=False)
    assert header.quant.accuracy is None and header.quant.gemms == 8


# --------------------------------------------------------------------------- on the GPU

GPUS, WHY = list_gpus()


def _why_not() -> str:
    if not GPUS:
        return f"needs an NVIDIA GPU ({WHY})"
    from llmc.backends.cuda.session import runtime_missing

    return runtime_missing()


# Max |cuda - reference| over max |reference| of a row of logits, fp16. Both run the same
# quantized weights; the cuda kernels multiply exact products (FP8) or fold AWQ's 1 / s into
# the dequantized weight (INT4 prefill), where onnxruntime rounds each to fp16 first. FP8
# also quantizes every GEMM's input: an fp16 rounding difference upstream moves a value across
# an E4M3 rounding boundary now and then, a step of 1/16 of it, so the two backends drift
# apart faster than with 16-bit activations (measured: 3-4% at the first decode step; with
# the LM head quantized too, whose every input crossing lands on the logits, up to 6.02% on an
# H200 once the scales became numerics.FP8_SCALE_STEPS' choice, under 6% before).
TOLERANCE = {"int4-rtn": 3e-2, "int4-awq": 3e-2, "fp8": 8e-2, "fp8-block": 3e-2}


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")
@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-bias"])
def test_quantized_engine_matches_the_reference_backend(tiny_models_d64, tmp_path, words,
                                                        kind, mode, graphs):
    from llmc.plugins.launch_rules import FP8_ARCHS

    if mode == "fp8" and GPUS[0].arch not in FP8_ARCHS:
        pytest.skip("FP8 engines are built for Hopper (sm_90a)")
    folder, model = tiny_models_d64[kind]
    _build_both(folder, tmp_path, mode, words)
    _compare_engines(tmp_path, model, f"{kind} {mode}", TOLERANCE[mode], graphs)


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")
@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("kind", MOE_KINDS)
def test_fp8_block_moe_engine_matches_the_reference_backend(tiny_models_d64, tmp_path, words,
                                                            kind, graphs):
    """Block-wise FP8 experts (kernels/moe_fp8b.cu: the decode GEMM at up to 8 tokens, the
    tiled one past that; hf_steps' ragged steps take both) against onnxruntime's
    DequantizeLinear and batched MatMul over the same E4M3 bytes and scales."""
    folder, model = tiny_models_d64[kind]
    _build_both(folder, tmp_path, "fp8-block", words)
    _compare_engines(tmp_path, model, f"{kind} fp8-block", TOLERANCE["fp8-block"], graphs)


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")
def test_int4_engine_for_hopper_takes_the_wgmma_gemm(tiny_models_d64, tmp_path, words):
    """An sm_90a INT4 engine holds the small-M GEMM's wgmma kernel, and its session runs it
    (the engine tests above then cover it: their prefill steps have 33-128 rows)."""
    from llmc.backends.cuda.session import CudaSession

    if GPUS[0].arch != "sm_90a":
        pytest.skip("the wgmma kernel is sm_90a's")
    folder, _ = tiny_models_d64["llama-gqa"]
    _build(folder, tmp_path / "c.engine", "int4-rtn", words, arch=None)
    with CudaSession(EngineFile(tmp_path / "c.engine"), max_kv_blocks=64) as session:
        assert session.w4_sm90


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")
@pytest.mark.parametrize("mode", ["int4-awq", "int4-rtn"])
def test_int4_blocks_of_32_engine_matches_the_reference_backend(tiny_models_d64, tmp_path,
                                                               words, mode):
    """--int4-block-size 32: every GEMM in blocks of 32 (the kernels without chunk scales,
    each pair scaled as it is dequantized), against the reference backend's engine."""
    folder, model = tiny_models_d64["llama-gqa"]
    header = _build_both(folder, tmp_path, mode, words, int4_block_size=32)
    assert header.quant.details["int4_block_sizes"] == [32]
    _compare_engines(tmp_path, model, f"{mode} blocks of 32", TOLERANCE[mode], True)


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")
@pytest.mark.parametrize("mode", ["int4-awq", "int4-rtn"])
def test_int4_steps_past_the_small_m_gemm_dequantize_for_cublaslt(tiny_models_d64, tmp_path,
                                                                   words, mode, monkeypatch):
    """With the small-M GEMM's limit lowered to the GEMV's, every prefill step of more than 16
    tokens takes the other INT4 path: the weight dequantized into the workspace, cuBLASLt."""
    from llmc.plugins import launch_rules

    monkeypatch.setattr(launch_rules, "W4_GEMM_MAX_M", launch_rules.QGEMV_MS[-1])
    folder, model = tiny_models_d64["llama-gqa"]
    _build_both(folder, tmp_path, mode, words)
    _compare_engines(tmp_path, model, f"{mode} dequantized", TOLERANCE[mode], True)


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied-rope3"])   # untied, tied
def test_quantized_lm_head_engine_matches_the_reference_backend(tiny_models_d64, tmp_path,
                                                                words, kind, mode):
    """--quant-lm-head on both backends: the fp32 logits from the quantized head's kernels."""
    from llmc.plugins.launch_rules import FP8_ARCHS

    if mode == "fp8" and GPUS[0].arch not in FP8_ARCHS:
        pytest.skip("FP8 engines are built for Hopper (sm_90a)")
    folder, model = tiny_models_d64[kind]
    _build_both(folder, tmp_path, mode, words, lm_head=True)
    _compare_engines(tmp_path, model, f"{mode} head", TOLERANCE[mode], True)


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")
@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("kind,group", [("autoawq", 128), ("autoawq", 64), ("gptq", 128),
                                        ("gptq", -1), ("compressed-tensors", 64)])
def test_zero_point_engine_matches_the_reference_backend(tiny_models_d64, tmp_path, words,
                                                         kind, group, graphs):
    """An AutoAWQ, asymmetric GPTQ or compressed-tensors checkpoint's own codes and zero points
    (the kernels with chunk scales at 128, without at 64; GPTQ's group -1, a group a row, as
    blocks of 128): the cuda kernels compute (u - z) s, the reference backend (u - 8) s plus
    the offset GEMM; the same weights either way."""
    from quant_checkpoints import autoawq_checkpoint, compressed_tensors_checkpoint, gptq_checkpoint

    folder, model = tiny_models_d64["llama-gqa"]
    if kind == "compressed-tensors":
        pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    src = {"autoawq": lambda: autoawq_checkpoint(folder, tmp_path / "q", group),
           "gptq": lambda: gptq_checkpoint(folder, tmp_path / "q", group, sym=False),
           "compressed-tensors": lambda: compressed_tensors_checkpoint(
               folder, tmp_path / "q", group, sym=False)}[kind]()
    _build_both(src, tmp_path, "auto", words)
    _compare_engines(tmp_path, model, f"{kind} group {group}", TOLERANCE["int4-awq"], graphs)


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")
@pytest.mark.parametrize("strategy,dynamic,kv", [("tensor", False, False),
                                                 ("channel", True, False),
                                                 ("channel", False, True)])
def test_compressed_tensors_fp8_engine_matches_the_reference_backend(tiny_models_d64, tmp_path,
                                                                      words, strategy, dynamic,
                                                                      kv):
    """A compressed-tensors FP8 checkpoint (static input scales, or dynamic ones the build
    calibrates; kv: its FP8 KV-cache scales, an E4M3 pool) on the FP8 kernels, against the
    reference backend's engine of it."""
    from quant_checkpoints import compressed_tensors_fp8_checkpoint

    from llmc.plugins.launch_rules import FP8_ARCHS

    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    if GPUS[0].arch not in FP8_ARCHS:
        pytest.skip("FP8 engines are built for Hopper (sm_90a)")
    folder, model = tiny_models_d64["llama-gqa"]
    src = compressed_tensors_fp8_checkpoint(folder, tmp_path / "q", strategy, dynamic, kv)
    _build_both(src, tmp_path, "auto", words, kv_cache_dtype="fp8" if kv else "auto")
    _compare_engines(tmp_path, model, f"compressed-tensors fp8 {strategy}", TOLERANCE["fp8"],
                     True)


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")
@pytest.mark.parametrize("fmt,block", [("fp8", (128, 128)), ("compressed-tensors", (64, 64))])
def test_block_fp8_checkpoint_engine_matches_the_reference_backend(tiny_models_d64, tmp_path,
                                                                   words, fmt, block):
    """A block-wise FP8 checkpoint (HF's fine-grained FP8; llm-compressor's FP8_BLOCK) on
    the block-wise FP8 kernels, its own E4M3 weights and scales, against the reference
    backend's engine of it."""
    from quant_checkpoints import fp8_block_checkpoint

    if fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    folder, model = tiny_models_d64["llama-gqa"]
    src = fp8_block_checkpoint(folder, tmp_path / "q", block, fmt)
    header = _build_both(src, tmp_path, "auto", words)
    assert header.quant.mode == "fp8-block" and header.quant.details["fp8_block_sizes"] == \
        [block[1]]
    _compare_engines(tmp_path, model, f"{fmt} blocks {block}", TOLERANCE["fp8-block"], True)


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")
@pytest.mark.parametrize("kind,lm_head", [("llama-gqa", False), ("llama-tied-rope3", True)])
@pytest.mark.parametrize("mode", ["int4-rtn", "int4-awq"])
def test_int4_zero_point_engine_matches_the_reference_backend(tiny_models_d64, tmp_path, words,
                                                              mode, kind, lm_head):
    """--int4-zero-point built by llmc: the cuda engine against the reference backend's;
    with --quant-lm-head, the tied head's zero-point GEMM writes the fp32 logits."""
    folder, model = tiny_models_d64[kind]
    _build_both(folder, tmp_path, mode, words, int4_zero_point=True, lm_head=lm_head)
    _compare_engines(tmp_path, model, f"{mode} zero points", TOLERANCE[mode], True)


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")
@pytest.mark.parametrize("mode", MODES)
def test_quant_exclude_engine_matches_the_reference_backend(tiny_models_d64, tmp_path, words,
                                                            mode):
    """--quant-exclude: 16-bit gate-ups between quantized GEMMs, on both backends."""
    from llmc.plugins.launch_rules import FP8_ARCHS

    if mode == "fp8" and GPUS[0].arch not in FP8_ARCHS:
        pytest.skip("FP8 engines are built for Hopper (sm_90a)")
    folder, model = tiny_models_d64["llama-gqa"]
    _build_both(folder, tmp_path, mode, words, exclude=("*.mlp.gate_proj.*",))
    _compare_engines(tmp_path, model, f"{mode}, gate-ups excluded", TOLERANCE[mode], True)


def _build_both(folder, tmp_path, mode, words, **kw):
    """The same build twice, for _compare_engines: c.engine on the cuda backend for the GPU
    present, r.engine on the reference backend. Returns the cuda build's header."""
    header = _build(folder, tmp_path / "c.engine", mode, words, arch=None, **kw)
    _build(folder, tmp_path / "r.engine", mode, words, backend="reference", **kw)
    return header


def _compare_engines(tmp_path, model, what: str, tolerance: float, graphs: bool) -> None:
    """c.engine (cuda) against r.engine (reference) over hf_steps' ragged steps."""
    from hf_steps import compare_engines

    compare_engines(tmp_path / "c.engine", tmp_path / "r.engine", model.config.vocab_size,
                    LIMITS.kv_block_size, what, tolerance, graphs)
