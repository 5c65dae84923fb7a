"""`--kv-cache-dtype fp8`: the E4M3 pool with per-layer K and V scales (quantization/kv.py).

- the rewritten graph on onnxruntime against a numpy reference of the same step (E4M3
  rounding by ml_dtypes), and the bytes it hands back are the ones the reference stores;
- the reference session's pool after a prefill and decode steps equals that reference's;
- tiny models build, run, stay within their accuracy budgets, alone and with --quant fp8;
- the cuda backend refuses it for targets below sm_89 (its kernels:
  tests/core/backends/test_cuda_kv_fp8.py), bad values are one error line, `llmc inspect`
  shows it.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest

from llmc import contract
from llmc.build import BuildOptions, build
from llmc.cli.main import main
from llmc.contract import Chunk
from llmc.engine_file import EngineFile
from llmc.header import EngineHeader
from llmc.limits import BuildLimits
from llmc.quantization import kv
from llmc.quantization.numerics import FP8_MAX
from llmc.quantization.quantize import QuantOptions

E4M3 = ml_dtypes.float8_e4m3fn
LIMITS = BuildLimits(max_batch_size=4, max_num_tokens=64, max_seq_len=128, kv_block_size=16)


def e4m3(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """QuantizeLinear to E4M3 (saturating, round to nearest even) with scale [2] on axis 0."""
    s = scale.astype(np.float32).reshape(2, *[1] * (x.ndim - 1))
    return np.clip(x.astype(np.float32) / s, -FP8_MAX, FP8_MAX).astype(E4M3)


def attend(q, keys, values, scale):
    """Causal GQA attention of one sequence's tokens at positions ``pos`` over keys 0..p."""
    t, hq, d = q.shape
    hkv = keys.shape[1]
    out = np.zeros((t, hq, d), np.float64)
    for i in range(t):
        p = keys.shape[0] - t + i            # the chunk is the sequence's last t tokens
        for h in range(hq):
            kh = h // (hq // hkv)
            s = keys[:p + 1, kh] @ q[i, h] * scale
            w = np.exp(s - s.max())
            out[i, h] = (w / w.sum()) @ values[:p + 1, kh]
    return out


def _attention_graph(hq, hkv, d, bs, dtype):
    """One layer's step graph, model_zoo's paged attention fused by the passes (the
    PagedAttention node), q/k/v as inputs and the attention output as the logits."""
    from llmc.graph import GraphBuilder
    from llmc.model_zoo.layers import DecoderGraph
    from llmc.passes import run_passes

    class Cfg:
        num_attention_heads, num_key_value_heads, head_dim = hq, hkv, d
        num_hidden_layers, sliding_window, architecture = 1, None, "x"

        @staticmethod
        def inv_freq():
            return 1.0 / 10000 ** (np.arange(0, d, 2) / d)

    m = DecoderGraph.__new__(DecoderGraph)
    m.c, m.dtype, m.bs, m.elem = Cfg, dtype, bs, onnx.helper.np_dtype_to_tensor_dtype(
        np.dtype(dtype))
    m.g = g = GraphBuilder("x")
    step = m.step_values()
    g.input(contract.INPUT_IDS, onnx.TensorProto.INT32, ["num_tokens"])
    g.input(contract.LAST_TOKEN_ROWS, onnx.TensorProto.INT32, ["batch"])
    q, k, v = (g.input(n, m.elem, ["num_tokens", h, d]) for n, h in (("q", hq), ("k", hkv),
                                                                      ("v", hkv)))
    cache = g.input(contract.kv_cache_input(0), m.elem, [2, "num_blocks", hkv, bs, d])
    out, cache = m.paged_attention(q, k, v, step.for_layer(0) if step.layers else step, cache)
    g.output(out, contract.LOGITS, m.elem, ["num_tokens", hq * d])
    g.output(cache, contract.kv_cache_output(0), m.elem, [2, "num_blocks", hkv, bs, d])
    model, weights, _ = run_passes(g.model(), g.weights)
    return model, weights


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fp8_kv_graph_matches_numpy(tmp_path, dtype):
    """A prefill chunk of 5 tokens after 19 cached ones (two blocks of 16): onnxruntime's
    attention output equals numpy attention over the dequantized E4M3 keys and values, and
    the rows it returns are the E4M3 bytes of the new K/V."""
    import onnxruntime as ort

    from llmc.quantization.ort import feed

    hq, hkv, d, bs = 4, 2, 8, 16
    model, weights = _attention_graph(hq, hkv, d, bs, dtype)
    assert sum(n.op_type == "PagedAttention" for n in model.graph.node) == 1
    scales = np.array([[0.05, 0.02]], np.float32)
    model, weights = kv.fp8_kv(model, weights, scales, dtype)
    ins = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert ins[contract.kv_cache_input(0)] == onnx.TensorProto.FLOAT8E4M3FN
    assert [o.name for o in model.graph.output] == [contract.LOGITS, contract.kv_rows_output(0)]
    onnx.checker.check_model(model)

    rng = np.random.default_rng(0)
    cached, new = 19, 5
    old = rng.standard_normal((2, cached, hkv, d)) * [[[[5]]], [[[2]]]]
    k, v = (rng.standard_normal((new, hkv, d)) * a for a in (5, 2))
    k[0, 0, 0] = 1000.0          # past the scale's range: saturates at 448 * s
    q = rng.standard_normal((new, hq, d))
    s = scales[0].astype(dtype)
    pool = np.zeros((2, 3, hkv, bs, d), E4M3)                 # blocks 2 then 0 hold the sequence
    old_q = e4m3(old, s)
    pool[:, 2] = old_q[:, :bs].transpose(0, 2, 1, 3)
    pool[:, 0, :, :cached - bs] = old_q[:, bs:].transpose(0, 2, 1, 3)
    feeds = contract.pack_step([Chunk(list(range(new)), cached, [2, 0])], bs)
    feeds.update({"q": q.astype(dtype), "k": k.astype(dtype), "v": v.astype(dtype),
                  contract.kv_cache_input(0): feed(pool, "float8e4m3fn")})
    feeds = {n: x for n, x in feeds.items() if n in ins}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out, rows = sess.run(None, feeds)

    new_q = e4m3(np.stack([k, v]).astype(dtype), s)
    assert rows.dtype == np.uint8 and np.array_equal(rows.view(E4M3).view(np.uint8),
                                                     new_q.view(np.uint8))
    assert float(new_q[0, 0, 0, 0].astype(np.float32)) == FP8_MAX
    sf = s.astype(np.float32).reshape(2, 1, 1, 1)
    keys, values = (np.concatenate([old_q[i], new_q[i]]).astype(np.float32) * sf[i]
                    for i in (0, 1))
    want = attend(q.astype(dtype).astype(np.float64), keys, values, d ** -0.5)
    tol = {"float32": 1e-5, "float16": 2e-2}[dtype]
    np.testing.assert_allclose(out.astype(np.float32).reshape(new, hq, d), want, atol=tol,
                               rtol=tol)


def _kv_build(folder, out, words, mode="none", kv_dtype="fp8", dtype="fp16", backend="reference",
              log=None, **kw):
    return build(BuildOptions(folder, out, backend=backend, dtype=dtype, limits=LIMITS, **kw,
                              quant=QuantOptions(mode, calib_data=words, eval_data=words,
                                                 kv_cache_dtype=kv_dtype)),
                 log=log or (lambda _: None))


def test_session_pool_holds_the_graphs_rows(tiny_models, tmp_path, words):
    """The reference session's E4M3 pools after a prefill of two sequences and a decode step
    hold each token's K/V where its block table puts it and nothing anywhere else, and the
    same bytes as a session that ran the sequence one token a step."""
    from llmc.backends import get

    folder, _ = tiny_models["llama-gqa"]
    header = _kv_build(folder, tmp_path / "kv.engine", words, dtype="fp32")
    io = header.io
    assert io.kv_dtype == "float8e4m3fn" and io.kv_rows and not io.kv_outputs
    assert len(header.quant.kv_scales) == io.num_layers
    engine = EngineFile(tmp_path / "kv.engine")
    sess = get("reference").open(engine)
    sess.allocate_kv(8)
    chunks = [Chunk([5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], 0, [3, 5]),
              Chunk([30, 31, 32], 0, [6])]
    sess.step(contract.pack_step(chunks, io.block_size))
    sess.step(contract.pack_step([Chunk([22], 17, [3, 5]), Chunk([33], 3, [6])],
                                 io.block_size))
    for layer, pool in enumerate(sess.kv):
        assert pool.dtype == E4M3
        used = np.zeros(pool.shape[1], bool)
        used[[3, 5, 6]] = True
        assert not pool[:, ~used].view(np.uint8).any()              # nothing else written
        assert pool[:, 5, :, :2].view(np.uint8).any() and not pool[:, 5, :, 2:].view(
            np.uint8).any()                                          # rows 16, 17 of seq 0
        assert pool[:, 6, :, :4].view(np.uint8).any() and not pool[:, 6, :, 4:].view(
            np.uint8).any()
        vals = np.abs(pool[:, [3, 5, 6]].astype(np.float32))
        assert vals.max() <= FP8_MAX
    # the first sequence's prefill K/V, recomputed by a fresh session one token at a time,
    # land on the same bytes (the rows do not depend on how the step was batched)
    solo = get("reference").open(engine)
    solo.allocate_kv(8)
    toks = list(chunks[0].tokens) + [22]
    for p, t in enumerate(toks):
        solo.step(contract.pack_step([Chunk([t], p, [3, 5])], io.block_size))
    for a, b in zip(sess.kv, solo.kv):
        got, ref = a[:, [3, 5]].astype(np.float32), b[:, [3, 5]].astype(np.float32)
        assert np.mean(got == ref) > 0.99   # fp32 GEMM order may flip a rounding tie


# (max |Δppl| %, min top-1): the recorded results (bench/results/quantization.md) with a
# margin; with fp8 weights, test_quant_build.py's fp8 budget
KV_BUDGET = {"none": (0.2, 0.95), "fp8": (0.5, 0.93)}
GEMMA_BUDGET = (3.0, 0.5)   # random Gemma logits are near ties (test_quant_build.py)


@pytest.mark.parametrize("mode", ["none", "fp8"])
@pytest.mark.parametrize("kind", ["llama-gqa", "qwen3-qknorm", "gemma2-softcap",
                                  "gemma3-local-global"])
def test_tiny_models_meet_their_budget(tiny_models, tmp_path, words, kind, mode):
    from llmc.runtime.runner import Runner

    folder, model = tiny_models[kind]
    header = _kv_build(folder, tmp_path / "q.engine", words, mode=mode)
    q = header.quant
    assert q.mode == mode and q.kv_cache_dtype == "fp8"
    assert q.gemms == (0 if mode == "none" else 4 * model.config.num_hidden_layers)
    max_delta, min_top1 = GEMMA_BUDGET if kind.startswith("gemma") else KV_BUDGET[mode]
    acc = q.accuracy
    assert abs(acc.delta_ppl_pct) <= max_delta and acc.top1_agreement >= min_top1, acc
    assert EngineHeader.from_dict(header.to_dict()) == header
    out = Runner(tmp_path / "q.engine").generate(["w3 w4 w5"], max_new_tokens=4)[0]
    assert len(out) > 0


@pytest.mark.parametrize("mode", ["none", "fp8-block"])
@pytest.mark.parametrize("kind", ["mixtral-top2", "qwen2moe-shared", "qwen3moe-qknorm"])
def test_mixtures_of_experts_take_the_fp8_pool(tiny_models, tmp_path, words, kind, mode):
    """The pool does not care what the MLP is: a mixture of experts takes E4M3 K/V (its
    every layer's scales calibrated), alone and with its experts in block-wise FP8."""
    from llmc.runtime.runner import Runner

    folder, model = tiny_models[kind]
    header = _kv_build(folder, tmp_path / "q.engine", words, mode=mode)
    q = header.quant
    assert q.mode == mode and q.kv_cache_dtype == "fp8"
    assert len(q.kv_scales) == model.config.num_hidden_layers
    assert np.all(np.asarray(q.kv_scales) > 0)
    acc = q.accuracy
    max_delta, min_top1 = KV_BUDGET["none" if mode == "none" else "fp8"]
    assert abs(acc.delta_ppl_pct) <= max_delta and acc.top1_agreement >= min_top1, acc
    model_onnx = onnx.load_from_string(EngineFile(tmp_path / "q.engine").section(
        "model.onnx").tobytes())
    pools = [i for i in model_onnx.graph.input if i.name.startswith("kv_cache")]
    assert pools and all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT8E4M3FN
                         for i in pools)
    out = Runner(tmp_path / "q.engine").generate(["w3 w4 w5"], max_new_tokens=4)[0]
    assert len(out) > 0


def test_unfused_attention_takes_the_fp8_pool_too(tiny_models, tmp_path, words):
    """With the paged_attention pass off, the model's own ScatterND writes the dequantized
    pool: the same scales, the same accuracy as the fused graph's (one computation)."""
    folder, _ = tiny_models["llama-gqa"]
    fused = _kv_build(folder, tmp_path / "f.engine", words, dtype="fp32").quant
    plain = _kv_build(folder, tmp_path / "u.engine", words, dtype="fp32",
                      disable_passes=("paged_attention",)).quant
    model = onnx.load_from_string(EngineFile(tmp_path / "u.engine").section(
        "model.onnx").tobytes())
    assert sum(n.op_type == "ScatterND" for n in model.graph.node) == 2
    assert not any(n.op_type == "PagedAttention" for n in model.graph.node)
    np.testing.assert_allclose(plain.kv_scales, fused.kv_scales, rtol=1e-6)
    assert abs(plain.accuracy.ppl - fused.accuracy.ppl) < 1e-3 * fused.accuracy.ppl


def test_inspect_shows_the_kv_dtype(tiny_models, tmp_path, words, capsys):
    folder, _ = tiny_models["llama-gqa"]
    _kv_build(folder, tmp_path / "kv.engine", words)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tmp_path / "kv.engine")])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "KV cache float8e4m3fn" in out and "KV cache fp8 (E4M3, per-layer scales" in out
    assert "weights unquantized" in out


@pytest.mark.parametrize("args, message", [
    (["--kv-cache-dtype", "int8"], "Invalid value for '--kv-cache-dtype'"),
    (["--kv-cache-dtype", "fp8", "--backend", "cuda", "--gpu-arch", "sm_86"],
     "error: --kv-cache-dtype fp8: the cuda backend's FP8 KV cache needs a GPU of compute "
     "capability 8.9 or newer"),
])
def test_bad_kv_options_are_one_error_line(tiny_models, tmp_path, capsys, args, message):
    folder, _ = tiny_models["llama-gqa"]
    with pytest.raises(SystemExit) as e:
        main(["build", "--model", str(folder), "-o", str(tmp_path / "x.engine"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and not (tmp_path / "x.engine").exists()
    if message.startswith("error:"):
        assert len(err.splitlines()) == 1 and "--gpu-arch sm_89" in err


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen3moe-qknorm"])
def test_tensorrt_rtx_builds_the_fp8_kv_graph(tiny_models, tmp_path, words, kind):
    """The real TensorRT-RTX builder on the CPU takes the FP8 pools and rows (for compute
    capability 8.9 and 12.0), a mixture of experts' too: a QUANTIZE layer per layer's rows,
    a DEQUANTIZE for its pool and one for its rows; its session refuses the engine, naming
    what is missing."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    from llmc.backends import get
    from llmc.errors import LlmcError

    folder, model = tiny_models[kind]
    layers = model.config.num_hidden_layers
    header = _kv_build(folder, tmp_path / "r.engine", words, backend="tensorrt-rtx")
    net = header.lowering
    assert net["rtx_targets"] == ["8.9", "12.0"]
    assert {k: net["layer_types"].get(k, 0) for k in ("QUANTIZE", "DEQUANTIZE")} == {
        "QUANTIZE": layers, "DEQUANTIZE": 2 * layers}
    pools = {t["name"]: t["dtype"] for t in net["inputs"] + net["outputs"]
             if contract.kv_layer(t["name"]) is not None or t["name"].startswith("kv_rows")}
    assert pools == {name: "FP8" for i in range(layers)
                     for name in (contract.kv_cache_input(i), contract.kv_rows_output(i))}
    with pytest.raises(LlmcError, match="FP8 KV cache .* does not write them yet"):
        get("tensorrt-rtx").open(EngineFile(tmp_path / "r.engine"))


def test_kv_scales_take_the_step_of_each_layers_amax():
    """The build's K and V |max| (kv_amax with the scales' dtype) are each the calibrated
    |max| times the step of FP8_SCALE_STEPS that rounds those values best; without a dtype,
    the plain |max| (what ModelOpt's calibration is compared with)."""
    import numpy as np

    from llmc.quantization import kv, numerics

    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((2, 50, 3, 64)) * [[[[3.0]]], [[[0.2]]]]).astype(np.float16)
    site = kv.KvSite(0, None, rows="rows")
    plain = kv.kv_amax(site, {"rows": rows})
    stepped = kv.kv_amax(site, {"rows": rows}, "float16")
    assert plain == (float(np.abs(rows[0]).max()), float(np.abs(rows[1]).max()))
    for p, s, x in zip(plain, stepped, rows):
        assert s == numerics.fp8_activation_amax(x, "float16")
        assert any(s == pytest.approx(p * c, rel=1e-12) for c in numerics.FP8_SCALE_STEPS)
    split = kv.KvSite(0, None, k="k", v="v")
    assert kv.kv_amax(split, {"k": rows[0], "v": rows[1]}, "float16") == stepped
