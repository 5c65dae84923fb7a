"""Each Q/DQ rewrite: it fires on a weight GEMM, declines where its format does not fit, and
onnxruntime computes the rewritten graph as the numpy reference of the format says."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from llmc import contract
from llmc.dtypes import np_dtype, onnx_type
from llmc.graph import GraphBuilder, save_onnx
from llmc.quantization import numerics as nq
from llmc.quantization import qdq
from llmc.quantization.ort import session_options

# max |y - y_ref| / max |y_ref|: fp32 is exact up to summation order; fp16 and bf16 round
# the GEMM's inputs and output
TOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}
RNG = np.random.default_rng(0)


def gemm_graph(dtype: str, k: int, n: int, head: bool = False, softcap: bool = False,
               positions: bool = False):
    """y = x @ W (W [k, n] a weight); head: the GEMM makes the logits, like an LM head
    (softcap: through Gemma 2's cap * tanh(y / cap)); positions: the graph has the contract's
    position_ids input too."""
    w = RNG.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
    g = GraphBuilder("gemm")
    x = g.input("x", onnx_type(dtype), ["T", k])
    if positions:
        g.input(contract.POSITION_IDS, TensorProto.INT32, ["T"])
    y = g.MatMul(x, g.weight("w", dtype, (k, n), lambda: w.astype(np_dtype(dtype))))
    if softcap:
        cap = g.const(30.0, np_dtype(dtype))
        y = g.Mul(cap, g.Tanh(g.Div(y, cap)))
    if head:
        g.output(g.Cast(y, to=TensorProto.FLOAT), contract.LOGITS, TensorProto.FLOAT, ["T", n])
    else:
        g.output(y, "y", onnx_type(dtype), ["T", n])
    return g.model(), g.weights, w.astype(np_dtype(dtype)).astype(np.float32)


def run(model, weights, folder, x, observe: str | None = None, **feeds):
    """y (and the value ``observe``) as onnxruntime computes them, in float32."""
    import onnx
    import onnxruntime as ort

    if observe:
        model.graph.output.append(onnx.ValueInfoProto(name=observe))
    path = save_onnx(model, weights, folder)
    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    out = [v.astype(np.float32) for v in sess.run(None, {"x": x, **feeds})]
    return out if observe else out[0]


def check(y, ref, dtype, tol=None):
    assert np.abs(y - ref).max() <= (tol or TOL[dtype]) * np.abs(ref).max()


def activations(dtype, k, outliers=False):
    x = RNG.standard_normal((12, k)).astype(np.float32)
    if outliers:
        x[:, :3] *= 20
    return x.astype(np_dtype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("k", [128, 96])   # blocks of 128 and of 32
def test_int4_rtn_numerics(tmp_path, dtype, k):
    model, weights, w = gemm_graph(dtype, k, 40)
    qmodel, qweights, report = qdq.quantize_graph(model, weights, qdq.int4_pass())
    assert report["fired"] == {"int4-rtn": 1}
    dq = [n for n in qmodel.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and next(a.i for a in dq[0].attribute if a.name == "block_size") == \
        nq.int4_block(k)
    assert {w.dtype for w in qweights} == {"int4", dtype}   # the fp weight is gone
    x = activations(dtype, k)
    q, scale = nq.quantize_int4(w, nq.int4_block(k), dtype)
    check(run(qmodel, qweights, tmp_path, x),
          x.astype(np.float32) @ nq.dequantize_int4(q, scale, nq.int4_block(k)), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_int4_awq_numerics(tmp_path, dtype):
    k = 128
    model, weights, w = gemm_graph(dtype, k, 40)
    rows = activations("float32", k, outliers=True)
    qmodel, qweights, report = qdq.quantize_graph(model, weights, qdq.int4_pass({"w": rows}))
    assert report["fired"] == {"int4-awq": 1}
    s, _ = nq.awq_scales(w, rows, 128, dtype)
    assert not np.allclose(s, 1)
    clip = nq.awq_clip(w * s[:, None], rows / s, 128, dtype)
    q, scale = nq.quantize_int4(w * s[:, None], 128, dtype, clip)
    inv = (1 / s).astype(np_dtype(dtype)).astype(np.float32)
    x = activations(dtype, k, outliers=True)
    ref = (x.astype(np.float32) * inv).astype(np_dtype(dtype)).astype(np.float32) \
        @ nq.dequantize_int4(q, scale, 128)
    check(run(qmodel, qweights, tmp_path, x), ref, dtype)


def zero_point_reference(w: np.ndarray, block: int, dtype: str):
    """AutoAWQ's asymmetric round-to-nearest (its pseudo_quantize_tensor with zero_point),
    written as plainly as it reads there, each block's range widened to hold 0: the codes u,
    scales and integer zero points z."""
    k, n = w.shape
    u = np.zeros((k, n), np.float32)
    scales = np.zeros((k // block, n), np.float32)
    zeros = np.zeros((k // block, n), np.float32)
    for b in range(k // block):
        for j in range(n):
            col = w[b * block:(b + 1) * block, j].astype(np.float32)
            hi, lo = max(col.max(), 0), min(col.min(), 0)
            s = np.float32(np.float32((hi - lo) / 15).astype(np_dtype(dtype)))
            z = np.clip(np.rint(-lo / s), 0, 15)
            u[b * block:(b + 1) * block, j] = np.clip(np.rint(col / s) + z, 0, 15)
            scales[b, j], zeros[b, j] = s, z
    return u, scales, zeros


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_int4_zero_point_grid(dtype):
    """The grid with a zero point a block is AutoAWQ's: q = u - 8, offset = (8 - z) s, and
    (u - z) s is within half a step of every weight in its block's range; on weights that
    lean to one side its error is below the symmetric grid's."""
    k, n, block = 128, 24, 32
    w = (RNG.standard_normal((k, n)) * 0.05 + 0.03).astype(np_dtype(dtype)).astype(np.float32)
    q, scale, offset = nq.quantize_int4_zp(w, block, dtype)
    u, s_ref, z_ref = zero_point_reference(w, block, dtype)
    assert q.dtype == np_dtype("int4")
    assert np.array_equal(q.astype(np.float32), u - 8)
    assert np.array_equal(scale.astype(np.float32), s_ref)
    assert np.array_equal(offset, (8 - z_ref) * s_ref)
    deq = nq.dequantize_int4(q, scale, block) + np.repeat(offset, block, axis=0)
    assert np.allclose(deq, nq.fake_quant_int4_zp(w, block, dtype), rtol=0, atol=1e-7)
    steps = np.repeat(s_ref, block, axis=0)
    assert np.all(np.abs(deq - w) <= steps * 0.5001 + 1e-7)
    err_zp = np.mean((deq - w) ** 2)
    err_sym = np.mean((nq.fake_quant_int4(w, block, dtype) - w) ** 2)
    assert err_zp < 0.8 * err_sym
    # AWQ's clipping, as AutoAWQ clips with zero points: the scale and zero point of the
    # block clamped to +-share |max|; the weights past it take the end codes
    share = np.full((k // block, n), 0.8, np.float32)
    amax = np.repeat(np.abs(w).reshape(k // block, block, n).max(axis=1) * share, block, axis=0)
    _, s_ref, z_ref = zero_point_reference(np.clip(w, -amax, amax), block, dtype)
    q, scale, offset = nq.quantize_int4_zp(w, block, dtype, share)
    assert np.array_equal(scale.astype(np.float32), s_ref)
    assert np.array_equal(offset, (8 - z_ref) * s_ref)
    sr, zr = np.repeat(s_ref, block, axis=0), np.repeat(z_ref, block, axis=0)
    assert np.array_equal(q.astype(np.float32), np.clip(np.rint(w / sr) + zr, 0, 15) - 8)
    # a block whose weights all sit on one side of 0 (and a constant one) stays exact-ish
    one_sided = np.full((block, 2), 0.5, np.float32)
    one_sided[:, 1] = np.linspace(0.5, 0.6, block)
    deq = nq.fake_quant_int4_zp(one_sided, block, dtype)
    assert np.abs(deq - one_sided).max() <= 0.6 / 15 / 2 * 1.01


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("awq", [False, True])
def test_int4_zero_point_numerics(tmp_path, dtype, awq):
    """--int4-zero-point: the symmetric DequantizeLinear of q = u - 8 plus the offset GEMM
    (x's block sums times (8 - z) s), as a zero-point checkpoint is built; onnxruntime computes
    x @ ((u - z) s) (with AWQ: x / s against the scaled, clipped weight)."""
    k = 128
    model, weights, w = gemm_graph(dtype, k, 40)
    rows = activations("float32", k, outliers=True)
    qmodel, qweights, report = qdq.quantize_graph(
        model, weights, qdq.int4_pass({"w": rows} if awq else None, zero_point=True))
    assert report["fired"] == {"int4-awq" if awq else "int4-rtn": 1}
    assert [n for n in qmodel.graph.node if n.name.startswith("Int4ZeroPoints")]
    x_in = activations(dtype, k, outliers=awq)
    x = x_in.astype(np.float32)
    if awq:
        s, _ = nq.awq_scales(w, rows, 128, dtype, zero_point=True)
        clip = nq.awq_clip(w * s[:, None], rows / s, 128, dtype, zero_point=True)
        q, scale, offset = nq.quantize_int4_zp(w * s[:, None], 128, dtype, clip)
        x = (x * (1 / s).astype(np_dtype(dtype)).astype(np.float32)).astype(
            np_dtype(dtype)).astype(np.float32)
    else:
        q, scale, offset = nq.quantize_int4_zp(w, 128, dtype)
    offset = offset.astype(np_dtype(dtype)).astype(np.float32)   # stored in the dtype
    ref = x @ (nq.dequantize_int4(q, scale, 128) + np.repeat(offset, 128, axis=0))
    check(run(qmodel, qweights, tmp_path, x_in), ref, dtype)


def norm_graph(dtype: str, k: int, n: int, readers: int):
    """`readers` GEMMs y_i = RMSNorm(x) @ W_i, the norm's weight gamma a graph weight."""
    ws = [RNG.standard_normal((k, n)).astype(np.float32) / np.sqrt(k) for _ in range(readers)]
    gamma = (RNG.random(k) + 0.5).astype(np_dtype(dtype))
    g = GraphBuilder("norm_gemm")
    x = g.input("x", onnx_type(dtype), ["T", k])
    h = g.RMSNormalization(x, g.weight("gamma", dtype, (k,), lambda: gamma), axis=-1,
                           epsilon=1e-5)
    for i, w in enumerate(ws):
        y = g.MatMul(h, g.weight(f"w{i}", dtype, (k, n), lambda w=w: w.astype(np_dtype(dtype))))
        g.output(y, f"y{i}", onnx_type(dtype), ["T", n])
    return g.model(), g.weights, [w.astype(np_dtype(dtype)).astype(np.float32) for w in ws], \
        gamma.astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_int4_awq_scale_goes_into_the_norm(tmp_path, dtype):
    """A GEMM that alone reads an RMSNorm (the fused QKV or gate-up) gets AWQ's 1/s in the
    norm's weight instead of a Mul; with two readers (q and k unfused) each keeps its Mul."""
    import onnxruntime as ort

    k, n = 128, 24
    model, weights, (w,), gamma = norm_graph(dtype, k, n, 1)
    x = activations(dtype, k, outliers=True)
    xf = x.astype(np.float32)
    normed = xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + 1e-5)
    rows = normed * gamma
    qmodel, qweights, report = qdq.quantize_graph(model, weights, qdq.int4_pass({"w0": rows}))
    assert report["fired"] == {"int4-awq": 1}
    assert "Mul" not in {n.op_type for n in qmodel.graph.node}
    folded = next(n for n in qmodel.graph.node if n.op_type == "RMSNormalization").input[1]
    assert folded == "gamma.awq" and "gamma" not in {w.name for w in qweights}
    s, _ = nq.awq_scales(w, rows, 128, dtype)
    clip = nq.awq_clip(w * s[:, None], rows / s, 128, dtype)
    q, scale = nq.quantize_int4(w * s[:, None], 128, dtype, clip)
    gamma2 = (gamma * (1 / s).astype(np_dtype(dtype)).astype(np.float32)).astype(np_dtype(dtype))
    ref = (normed * gamma2.astype(np.float32)).astype(np_dtype(dtype)).astype(np.float32) \
        @ nq.dequantize_int4(q, scale, 128)
    path = save_onnx(qmodel, qweights, tmp_path / "one")   # reads each part of the AWQ once
    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    check(sess.run(None, {"x": x})[0].astype(np.float32), ref, dtype)
    assert np.array_equal(next(w for w in qweights if w.name == folded).read(), gamma2)

    model, weights, _, gamma = norm_graph(dtype, k, n, 2)
    qmodel, qweights, report = qdq.quantize_graph(
        model, weights, qdq.int4_pass({"w0": rows, "w1": rows}))
    assert report["fired"] == {"int4-awq": 2}
    assert sum(n.name.startswith("AwqScale") for n in qmodel.graph.node) == 2
    assert "gamma" in {w.name for w in qweights}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fp8_numerics(tmp_path, dtype):
    k = 64
    model, weights, w = gemm_graph(dtype, k, 24)
    x = activations(dtype, k)
    amax = float(np.abs(x.astype(np.float32)).max()) * 0.8   # the largest values saturate
    qmodel, qweights, report = qdq.quantize_graph(model, weights, qdq.fp8_pass({"w": amax}))
    assert report["fired"] == {"fp8": 1}
    assert sorted(n.op_type for n in qmodel.graph.node if n.op_type != "MatMul") == [
        "DequantizeLinear", "DequantizeLinear", "Identity", "QuantizeLinear"]
    assert {w.dtype for w in qweights} == {"float8e4m3fn", dtype}
    q, scale = nq.quantize_fp8_weight(w, dtype)
    xs = nq.fp8_activation_scale(amax, dtype)
    xq = nq.fake_quant_fp8(x, xs).astype(np_dtype(dtype)).astype(np.float32)
    y, xq_ort = run(qmodel, qweights, tmp_path, x, observe=next(
        n for n in qmodel.graph.node if n.op_type == "MatMul").input[0])
    # onnxruntime divides in fp16 for fp16 inputs: an x / s on the edge between two E4M3
    # values may round to the other one (one step, 1/8 relative), in a few elements
    off = np.abs(xq_ort - xq) > 1e-6 * np.abs(xq).max()
    assert off.mean() <= (0 if dtype == "float32" else 0.03)
    assert (np.abs(xq_ort - xq)[off] <= np.abs(xq)[off] / 8 + 1e-6).all()
    check(y, xq_ort @ nq.dequantize_fp8(q, scale), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fp8_first_token_takes_a_scale_of_its_own(tmp_path, dtype):
    """--fp8-first-token dynamic: the rows at position 0 are rounded to E4M3 with their own
    |max| / 448, the others with the calibrated scale, which they are well past."""
    k = 64
    model, weights, w = gemm_graph(dtype, k, 24, positions=True)
    x = activations(dtype, k)
    x[[0, 5]] *= 40   # two sequences' first tokens, far past the calibrated range
    x[7] = 0          # a first token of zeros: the scale's floor, no NaN
    positions = np.array([0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4], np.int32)
    first = positions == 0
    amax = float(np.abs(x[~first].astype(np.float32)).max())
    qmodel, qweights, report = qdq.quantize_graph(
        model, weights, qdq.fp8_pass({"w": amax}, first_token=True))
    assert report["fired"] == {"fp8": 1}
    assert sum(n.op_type == "Where" for n in qmodel.graph.node) == 1
    x32 = x.astype(np.float32)
    own = np.maximum(np.abs(x32).max(1, keepdims=True) / np.float32(nq.FP8_MAX),
                     qdq.FIRST_TOKEN_MIN_SCALE)
    xs = nq.fp8_activation_scale(amax, dtype)
    want = np.where(first[:, None], nq.fake_quant_fp8(x32, own),
                    nq.fake_quant_fp8(x32, xs)).astype(np_dtype(dtype)).astype(np.float32)
    y, xq = run(qmodel, qweights, tmp_path, x, observe=next(
        n for n in qmodel.graph.node if n.op_type == "MatMul").input[0],
        position_ids=positions)
    # the first rows exactly (float32 arithmetic), the others as test_fp8_numerics allows
    assert np.array_equal(xq[first], want[first])
    off = np.abs(xq - want) > 1e-6 * np.abs(want).max()
    assert off.mean() <= (0 if dtype == "float32" else 0.03)
    assert (np.abs(xq - want)[off] <= np.abs(want)[off] / 8 + 1e-6).all()
    q, scale = nq.quantize_fp8_weight(w, dtype)
    check(y, xq @ nq.dequantize_fp8(q, scale), dtype)
    # a first token quantized with the calibrated scale would have lost most of itself
    clipped = nq.fake_quant_fp8(x32[0], xs)
    assert np.abs(clipped - x32[0]).max() > 10 * np.abs(xq[0] - x32[0]).max()


def test_fp8_first_token_leaves_the_lm_head_and_graphs_without_positions():
    """The LM head's rows are the sequences' last tokens, not position-ordered rows; a graph
    without position_ids has nothing to tell first tokens by: both keep the plain Q/DQ."""
    for head, positions in ((True, True), (False, False)):
        model, weights, _ = gemm_graph("float32", 64, 24, head=head, positions=positions)
        qmodel, _, report = qdq.quantize_graph(
            model, weights, qdq.fp8_pass({"w": 1.0}, with_lm_head=True, first_token=True))
        assert report["fired"] == {"fp8": 1}
        assert not any(n.op_type == "Where" for n in qmodel.graph.node)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("k", [256, 192, 96])   # blocks of 128, 64 and 32
def test_fp8_block_numerics(tmp_path, dtype, k):
    """Weight-only: x as it is, each weight E4M3 of itself over its block's |max| / 448,
    within half an E4M3 step (1/16 of the value, or of 2^-9 of the scale below the
    normals), and the graph's product is x times those weights."""
    model, weights, w = gemm_graph(dtype, k, 40)
    qmodel, qweights, report = qdq.quantize_graph(model, weights, qdq.fp8_block_pass())
    assert report["fired"] == {"fp8-block": 1}
    dq = [n for n in qmodel.graph.node if n.op_type == "DequantizeLinear"]
    block = nq.fp8_block(k)
    assert len(dq) == 1 and next(a.i for a in dq[0].attribute if a.name == "block_size") == \
        block == {256: 128, 192: 64, 96: 32}[k]
    assert {w.dtype for w in qweights} == {"float8e4m3fn", dtype}
    q, scale = nq.quantize_fp8_blocks(w, block, dtype)
    deq = nq.dequantize_fp8_blocks(q, scale)
    step = np.repeat(scale.astype(np.float32), block, axis=0)
    assert (np.abs(deq - w) <= np.maximum(np.abs(w) / 16, step * 2 ** -10) * 1.001).all()
    x = activations(dtype, k)
    check(run(qmodel, qweights, tmp_path, x), x.astype(np.float32) @ deq, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("k", [256, 192, 96])   # blocks of 128, 64 and 32
def test_fp8_block_numerics_of_stacked_experts(tmp_path, dtype, k):
    """A stack of experts' weights [E, K, N] (MatMul(x [T, K], W) -> [E, T, N], as
    layers.routed_experts runs every expert): each expert rounded in its own blocks, the DQ
    on axis 1 with a scale [E, K / B, N], onnxruntime's product each expert's x @ W_e; the
    other modes' sites leave a stack alone."""
    e, n = 3, 24
    w = (RNG.standard_normal((e, k, n)) / np.sqrt(k) * [[[1]], [[4]], [[0.25]]]).astype(
        np.float32)
    g = GraphBuilder("experts")
    x = g.input("x", onnx_type(dtype), ["T", k])
    y = g.MatMul(x, g.weight("experts.gate_up.weight", dtype, (e, k, n),
                             lambda: w.astype(np_dtype(dtype))))
    g.output(y, "y", onnx_type(dtype), [e, "T", n])
    model, weights = g.model(), g.weights
    assert qdq.sites(model, weights) == [] and len(qdq.sites(model, weights, experts=True)) == 1
    qmodel, qweights, report = qdq.quantize_graph(model, weights, qdq.fp8_block_pass())
    assert report["fired"] == {"fp8-block": 1}
    (dq,) = [n for n in qmodel.graph.node if n.op_type == "DequantizeLinear"]
    block = nq.fp8_block(k)
    assert {a.name: a.i for a in dq.attribute} == {"axis": 1, "block_size": block}
    w16 = w.astype(np_dtype(dtype)).astype(np.float32)
    q, scale = nq.quantize_fp8_blocks(w16, block, dtype)
    assert q.shape == (e, k, n) and scale.shape == (e, k // block, n)
    for i in range(e):   # a stack is its experts, each quantized alone
        qi, si = nq.quantize_fp8_blocks(w16[i], block, dtype)
        np.testing.assert_array_equal(q[i].view(np.uint8), qi.view(np.uint8))
        np.testing.assert_array_equal(scale[i], si)
    deq = nq.dequantize_fp8_blocks(q, scale)
    xv = activations(dtype, k)
    check(run(qmodel, qweights, tmp_path, xv), np.einsum("tk,ekn->etn", xv.astype(np.float32),
                                                          deq), dtype)


MOE = {"mixtral-top2": "block_sparse_moe", "qwen2moe-shared": "mlp", "qwen3moe-qknorm": "mlp"}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kind", list(MOE))
def test_the_routing_gemms_stay_16_bit(tiny_models, dtype, kind):
    """In the fused graph of a tiny mixture (as the build quantizes it): the routers (logits
    -> Cast -> Softmax -> TopK) and Qwen2-MoE's shared-expert gate (one column into a
    Sigmoid) are no site in any mode, though their K takes a block; every other weight GEMM
    but the LM head is, the expert stacks with ``experts`` only."""
    from llmc.model_zoo import load_model
    from llmc.passes import run_passes
    from llmc.passes.ir import Graph

    model, weights = load_model(tiny_models[kind][0]).build_graph(dtype, 16)
    model, weights, _ = run_passes(model, weights)
    gemms = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"
             if len(n.input) == 2 and n.input[1] in {w.name for w in weights}}
    moe = MOE[kind]
    sparse = range(2) if kind == "mixtral-top2" else range(1)
    routing = {f"model.layers.{i}.{moe}.gate.weight" for i in sparse} | (
        {"model.layers.0.mlp.shared_expert_gate.weight"} if kind == "qwen2moe-shared" else set())
    stacks = {f"model.layers.{i}.{moe}.experts.{w}.weight" for i in sparse
              for w in ("gate_up", "down")}
    head = {qdq.lm_head(Graph(model, weights)).input[1]}   # (a tied one reads a copy)
    assert routing | stacks <= gemms   # the test sees them
    for experts in (False, True):
        sites = {s.weight for s in qdq.sites(model, weights, experts=experts)}
        assert sites == gemms - routing - head - (set() if experts else stacks)
    # and no pass rewrites them: fp8-block, INT4 (blocks of 32 divide their K of 64) and fp8
    amax = {w: 1.0 for w in gemms}   # every weight GEMM has a scale for x
    for p in (qdq.fp8_block_pass(), qdq.int4_pass(), qdq.fp8_pass(amax)):
        qmodel, qweights, _ = qdq.quantize_graph(model, weights, p)
        readers = {n.input[1]: n.op_type for n in qmodel.graph.node if len(n.input) > 1}
        assert all(readers[r] == "MatMul" for r in routing), p.name
        assert routing <= {w.name for w in qweights} and not any(
            w.name.startswith(tuple(routing)) for w in qweights if w.name not in routing)


def test_routes_is_the_routing_pattern_only():
    """qdq._routes takes a softmax into a TopK, or one column into a Sigmoid: a softmax that
    picks nothing, or a Sigmoid over several columns (a gate of a GLU), stays a site."""
    g = GraphBuilder("routes")
    x = g.input("x", onnx_type("float16"), ["T", 64])
    f32, y = TensorProto.FLOAT, {}
    for name, n in (("router", 4), ("softmax", 4), ("gate", 1), ("glu", 8)):
        y[name] = g.MatMul(x, g.weight(name, "float16", (64, n),
                                       lambda n=n: np.ones((64, n), np.float16)))
    probs = g.Softmax(g.Cast(y["router"], to=f32), axis=-1)
    top, _ = g.TopK(probs, g.const(np.array([2])), axis=-1, outputs=2)
    outs = [top, g.Softmax(g.Cast(y["softmax"], to=f32), axis=-1),
            g.Cast(g.Sigmoid(y["gate"]), to=f32), g.Cast(g.Sigmoid(y["glu"]), to=f32)]
    for i, o in enumerate(outs):
        g.output(o, f"y{i}", f32, ["T", None])
    sites = {s.weight for s in qdq.sites(g.model(), g.weights)}
    assert sites == {"softmax", "glu"}


def test_declines_where_the_format_does_not_fit():
    model, weights, _ = gemm_graph("float32", 100, 8)            # no INT4 block divides 100
    assert qdq.quantize_graph(model, weights, qdq.int4_pass())[2]["fired"] == {"int4-rtn": 0}
    assert qdq.quantize_graph(model, weights, qdq.fp8_block_pass())[2]["fired"] == \
        {"fp8-block": 0}
    model, weights, _ = gemm_graph("float32", 64, 8)              # no calibrated scale for x
    assert qdq.quantize_graph(model, weights, qdq.fp8_pass({}))[2]["fired"] == {"fp8": 0}


@pytest.mark.parametrize("softcap", [False, True])
def test_the_lm_head_stays_unquantized(softcap):
    model, weights, _ = gemm_graph("float32", 64, 8, head=True, softcap=softcap)
    assert qdq.sites(model, weights) == []
    assert qdq.quantize_graph(model, weights, qdq.int4_pass())[2]["fired"] == {"int4-rtn": 0}
    assert qdq.quantize_graph(model, weights, qdq.fp8_pass({"w": 1.0}))[2]["fired"] == \
        {"fp8": 0}
    assert qdq.quantize_graph(model, weights, qdq.fp8_block_pass())[2]["fired"] == \
        {"fp8-block": 0}
