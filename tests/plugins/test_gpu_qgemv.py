"""The quantized GEMMs of decode and their prefill helpers (plugins/kernels/qgemv.cu,
qgemv_zp.cu for INT4 with zero points, qgemv_fp8b.cu for block-wise FP8) against float64
references on the GPU (marked `gpu`; skipped without CUDA). Outputs are poisoned (NaN)
before each launch, so an element a kernel skips fails the check.

INT4: the reference dequantizes the same codes and scales in torch (q * s rounded to the
dtype, as DequantizeLinear does; x * pre rounded to the dtype, as the graph's Mul does) and
multiplies in float64; tolerance 1e-2 relative max error (the output's rounding), as the
16-bit GEMV tests hold. FP8: the reference quantizes x with torch's own E4M3 conversion of
x / sx and multiplies the E4M3 values in float64, scaled by sx * sw; the kernel multiplies by
1 / sx, which may round a value at a tie the other way, so the tolerance is the same 1e-2
(2e-3 for fp32 output). FP8 with first tokens (--fp8-first-token dynamic): the flagged
rows' reference takes each row's own scale, and every row is checked against its own |max|.
Block-wise FP8: as INT4, the reference dequantizes the same codes and scales (q * s rounded
to the dtype)."""
import math

import numpy as np
import pytest

from llmc.plugins import launch_rules as lr

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and torch.cuda"),
    pytest.mark.usefixtures("poison"),
]

DTYPES = [torch.float16, torch.bfloat16]
MS = (1, 3, 8, 9, 16)    # one tile of 8 x rows (1-8), two (9-16)
# (N, K, group): SmolLM2's projections (K = 576: group 64), Llama-3.1-8B's QKV and down, a
# ragged N with group 32.
SHAPES = ((576, 576, 64), (1728, 576, 64), (6144, 4096, 128), (4096, 14336, 128),
          (1000, 256, 32))
TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 2e-3}


def fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


# A fused gate rounds gate, up, act(gate) and their product to the dtype: where the kernel's
# fp32 gate or up lands on the other side of a rounding boundary than the float64
# reference's, each of the four roundings can move the output by a unit in the last place,
# up to 2^-7 of the value in bf16: 2^-5 in all (1.9e-2 was seen with AWQ's 1 / s).
GATE_TOL = {torch.float16: 1e-2, torch.bfloat16: 2 ** -5}


def check(y, ref, dtype, tol=None):
    tol = tol or TOL[dtype]
    assert not y.isnan().any(), "unwritten (poisoned) or NaN output"
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, f"relative max error {err:.2e} >= {tol:.1e}"


def int4_weight(n, k, group, dtype, seed=0, zero_points=False, offsets=False):
    """Random codes and scales; the packed engine layout and the dequantized reference.
    zero_points: also zero points z [N, K / group] (uint8, 0..16), the codes then u - z; the
    result is (packed, scale, deq, z). offsets: also offsets o [N, K / group] in dtype, the
    weight (u - 8) scale + o rounded once; the result is (packed, scale, deq, o)."""
    from llmc.backends.cuda.lower import pack_int4

    rng = np.random.default_rng(seed)
    u = rng.integers(0, 16, (n, k)).astype(np.int8)
    # ONNX's INT4 [K, N]: element i = k * N + n in byte i / 2, low nibble first; u - 8 signed
    flat = ((u - 8).T.reshape(-1) & 0xF).astype(np.uint8)
    onnx_bytes = flat[0::2] | (flat[1::2] << 4)
    packed = torch.from_numpy(pack_int4(onnx_bytes, n, k).reshape(n, k // 2)).cuda()
    scale = (torch.rand(n, k // group, device="cuda") * 0.02 + 0.005).to(dtype)
    z = rng.integers(0, 17, (n, k // group)).astype(np.uint8) if zero_points else \
        np.full((n, k // group), 8, np.uint8)
    q = u.astype(np.int16) - np.repeat(z, group, axis=1)
    deq = (torch.from_numpy(q).cuda().to(dtype) * scale.repeat_interleave(group, 1)).to(dtype)
    if zero_points:
        return packed, scale, deq, torch.from_numpy(z).cuda()
    if offsets:   # of either sign, up to 8 scales (a GGUF Q4_1 block's m + 8 d)
        o = ((torch.rand(n, k // group, device="cuda") * 16 - 8) * scale.float()).to(dtype)
        deq = (torch.from_numpy(q).cuda().double() * scale.double().repeat_interleave(group, 1)
               + o.double().repeat_interleave(group, 1)).to(dtype)
        return packed, scale, deq, o
    return packed, scale, deq


def x_rows(m, k, dtype, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(m, k, generator=g, device="cuda").to(dtype)


# The small-M GEMM (w4_gemm, steps of 17 to W4_GEMM_MAX_M rows) from 1 row: one or more CTAs
# of x rows, ragged last tiles of rows and weight rows; its mma.sync kernel (w4_gemm, every
# architecture) and its wgmma one (w4_gemm_sm90: sm_90a, 64 or 128 x rows a CTA, from
# launch_rules.W4GW_MIN_M rows).
GEMM_MS = (1, 17, 32, 33, 64, 100, 128, 256)
GEMMS = ("w4_gemm", "w4_gemm_sm90")


def int4_kernel(K, kernel, *args, **kw):
    """K's GEMV or one of the small-M GEMM's kernels (GEMMS)."""
    if kernel == "w4_gemm_sm90":
        if K.arch != "sm_90a":
            pytest.skip(f"the wgmma kernel is sm_90a's, this GPU is {K.arch}")
        if args[0].shape[0] < lr.W4GW_MIN_M:
            pytest.skip(f"under {lr.W4GW_MIN_M} rows the mma.sync kernel runs")
        return K.w4_gemm(*args, sm90=True, **kw)
    if kernel == "w4_gemm":
        return K.w4_gemm(*args, sm90=False, **kw)
    return getattr(K, kernel)(*args, **kw)


@pytest.mark.parametrize("kernel,m", [("w4_gemv", m) for m in MS] +
                         [(g, m) for g in GEMMS for m in GEMM_MS])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group", SHAPES)
def test_w4_gemv_and_gemm(K, n, k, group, dtype, kernel, m):
    w, scale, deq = int4_weight(n, k, group, dtype)
    x = x_rows(m, k, dtype)
    y = int4_kernel(K, kernel, x, w, scale, group)
    assert y.dtype == dtype and y.shape == (m, n)
    check(y, x.double() @ deq.double().T, dtype)


@pytest.mark.parametrize("m", (1, 5, 16))
@pytest.mark.parametrize("dtype", DTYPES)
def test_w4_gemv_awq_pre_scale_and_bias(K, dtype, m):
    n, k, group = 1152, 896, 128   # Qwen2-0.5B's fused QKV, which has a bias
    w, scale, deq = int4_weight(n, k, group, dtype, seed=2)
    x = x_rows(m, k, dtype, seed=3)
    pre = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    y = K.w4_gemv(x, w, scale, group, pre=pre, bias=bias)
    check(y, (x * pre).double() @ deq.double().T + bias.double(), dtype)


@pytest.mark.parametrize("wide", (False, True))   # the 2- or the 3-CTAs-an-SM kernels
@pytest.mark.parametrize("m", (1, 8, 16))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group,act", ((200, 576, 64, None), (96, 1152, 128, "swiglu"),
                                           (520, 2048, 32, None)))
def test_w4_gemv_both_kernels(K, n, k, group, act, dtype, m, wide):
    """Both INT4 kernels up to 8 rows, whatever the GPU's SM count picks for SHAPES, with
    AWQ's 1 / s, a tail chunk (K % 128) and a fused gate."""
    w, scale, deq = int4_weight(n * (2 if act else 1), k, group, dtype, seed=7)
    x = x_rows(m, k, dtype, seed=8)
    pre = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    y = K.w4_gemv(x, w, scale, group, pre=pre, act=act, sm_count=1 if wide else 0)
    ref = ((x * pre).double() @ deq.double().T)
    check(y, K.gated(ref.to(dtype), act).double() if act else ref, dtype,
          GATE_TOL[dtype] if act else None)


@pytest.mark.parametrize("act", ("swiglu", "geglu"))
@pytest.mark.parametrize("m", (1, 8, 13))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter,k,group", ((1536, 576, 64), (14336, 4096, 128)))
def test_w4_gemv_fused_gate(K, inter, k, group, dtype, m, act):
    w, scale, deq = int4_weight(2 * inter, k, group, dtype, seed=4)
    x = x_rows(m, k, dtype, seed=5)
    fused = K.w4_gemv(x, w, scale, group, act=act)
    gu = (x.double() @ deq.double().T).to(dtype)   # the GEMM's output, rounded
    check(fused, K.gated(gu, act).double(), dtype, GATE_TOL[dtype])


@pytest.mark.parametrize("kind", ("zero_points", "offsets"))
@pytest.mark.parametrize("wide", (False, True))
@pytest.mark.parametrize("m", (1, 8, 9, 16))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group,act", ((576, 576, 64, None), (6144, 4096, 128, None),
                                           (96, 1152, 128, "swiglu"), (520, 2048, 32, "geglu"),
                                           (1000, 256, 32, None)))
def test_w4_gemv_zero_points(K, n, k, group, act, dtype, m, wide, kind):
    """The zero-point kernels (kernels/qgemv_zp.cu: codes u - z, z per row and group, 0 to
    16) with and without chunk scales, and the offset kernels ((u - 8) s + o, o per row and
    group: never chunk scales, never _wide), a tail chunk, AWQ's 1 / s and a fused gate."""
    w, scale, deq, z = int4_weight(n * (2 if act else 1), k, group, dtype, seed=9,
                                   **{kind: True})
    x = x_rows(m, k, dtype, seed=10)
    pre = (torch.rand(k, device="cuda") + 0.5).to(dtype) if group == 128 else None
    y = K.w4_gemv(x, w, scale, group, pre=pre, act=act, zp=z, sm_count=1 if wide else 0)
    ref = (x if pre is None else x * pre).double() @ deq.double().T
    check(y, K.gated(ref.to(dtype), act).double() if act else ref, dtype,
          GATE_TOL[dtype] if act else None)


@pytest.mark.parametrize("zp", (None, "zero_points", "offsets"))
@pytest.mark.parametrize("kernel,m", [("w4_gemv", 1), ("w4_gemv", 8), ("w4_gemv", 16)] +
                         [(g, m) for g in GEMMS for m in (24, 200)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group", ((1000, 576, 64), (4104, 4096, 128)))
def test_w4_fp32_out(K, n, k, group, dtype, kernel, m, zp):
    """The _f32 kernels (a quantized LM head's fp32 logits): the same sums, not rounded to
    the dtype; with an fp32 bias."""
    w, scale, deq, *z = int4_weight(n, k, group, dtype, seed=12, **({zp: True} if zp else {}))
    x = x_rows(m, k, dtype, seed=13)
    bias = torch.randn(n, device="cuda")
    y = int4_kernel(K, kernel, x, w, scale, group, bias=bias, zp=z[0] if zp else None,
                    out_dtype=torch.float32)
    assert y.dtype == torch.float32
    check(y, x.double() @ deq.double().T + bias.double(), torch.float32)


@pytest.mark.parametrize("kernel", GEMMS)
@pytest.mark.parametrize("split", (False, True))   # K split over CTAs (the GPU's SMs) or not
@pytest.mark.parametrize("m", (5, 40, 77))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act,zp,pre,bias", ((None, None, True, True),
                                             (None, "zero_points", True, True),
                                             (None, "offsets", True, True),
                                             ("swiglu", None, True, False),
                                             ("geglu", "zero_points", False, False),
                                             ("swiglu", "zero_points", True, False),
                                             ("swiglu", "offsets", False, False)))
@pytest.mark.parametrize("n,k,group", ((96, 1152, 128), (520, 2048, 32), (1000, 576, 64)))
def test_w4_gemm_options(K, n, k, group, act, zp, pre, bias, dtype, m, split, kernel):
    """AWQ's 1 / s (folded into the dequantized weight, one more rounding, as dequant_int4 does
    for cuBLASLt), a bias, a fused gate, zero points or offsets (kernels/qgemv_zp.cu), tail
    chunks, with and without the split-K partials' last-CTA sum."""
    w, scale, deq, *z = int4_weight(n * (2 if act else 1), k, group, dtype, seed=14,
                                    **({zp: True} if zp else {}))
    x = x_rows(m, k, dtype, seed=15)
    p = (torch.rand(k, device="cuda") + 0.5).to(dtype) if pre else None
    b = torch.randn(n, device="cuda").to(dtype) if bias else None
    y = int4_kernel(K, kernel, x, w, scale, group, pre=p, bias=b, act=act,
                    zp=z[0] if zp else None, sm_count=None if split else 0)
    ref = x.double() @ (deq if p is None else (deq * p).to(dtype)).double().T
    if act:
        check(y, K.gated(ref.to(dtype), act).double(), dtype, GATE_TOL[dtype])
    else:
        check(y, ref + (b.double() if bias else 0), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group", ((1728, 576, 64), (512, 4096, 128),
                                         (40, 96, 32)))
@pytest.mark.parametrize("kind", ("zero_points", "offsets"))
def test_dequant_int4_zero_points_is_exact(K, n, k, group, dtype, kind):
    w, scale, deq, z = int4_weight(n, k, group, dtype, seed=11, **{kind: True})
    assert torch.equal(K.dequant_int4(w, scale, group, dtype, zp=z), deq)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group", ((1728, 576, 64), (512, 4096, 128),
                                         (40, 96, 32)))
def test_dequant_int4_is_exact(K, n, k, group, dtype):
    w, scale, deq = int4_weight(n, k, group, dtype, seed=6)
    assert torch.equal(K.dequant_int4(w, scale, group, dtype), deq)
    pre = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    assert torch.equal(K.dequant_int4(w, scale, group, dtype, pre=pre), (deq * pre).to(dtype))


def fp8_weight(n, k, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(n, k, generator=g, device="cuda") * 100).clamp(-448, 448).to(
        torch.float8_e4m3fn)
    sw = torch.rand(n, generator=g, device="cuda") * 1e-3 + 1e-4
    return w, sw


def fp8_reference(x, w, sw, sx):
    xq = (x.float() / sx).clamp(-448, 448).to(torch.float8_e4m3fn)
    return (xq.double() @ w.double().T) * sx * sw.double()


def fp8_sm_count(kernel, tiles):
    """An SM count that makes launch_rules.qgemv_launch pick this FP8 kernel for `tiles`
    (plain: more SMs than any GEMM here has tiles; _w16 only up to 8 rows, the plain kernel at
    16)."""
    return {"plain": 10 ** 6, "wide": math.ceil(tiles / 3), "w16": max(1, tiles // 4)}[kernel]


@pytest.mark.skipif("not fp8_capable()", reason="E4M3 MMA needs sm_89 or newer")
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ("plain", "wide", "w16"))
@pytest.mark.parametrize("n,k", ((576, 576), (6144, 4096), (4096, 14336), (1000, 272)))
def test_w8_gemv(K, n, k, dtype, m, kernel):
    w, sw = fp8_weight(n, k)
    x = x_rows(m, k, dtype)
    sx = float(x.abs().max()) / 448
    y = K.w8_gemv(x, w.view(torch.uint8), sw, sx,
                  sm_count=fp8_sm_count(kernel, math.ceil(n / 16)))
    assert y.dtype == dtype and y.shape == (m, n)
    check(y, fp8_reference(x, w, sw, sx), dtype)


@pytest.mark.skipif("not fp8_capable()", reason="E4M3 MMA needs sm_89 or newer")
@pytest.mark.parametrize("m", (1, 16))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ("plain", "wide", "w16"))
def test_w8_gemv_bias_fp32_out_and_saturation(K, dtype, m, kernel):
    """x beyond sx * 448 saturates to +-448, as QuantizeLinear's saturate=1 does."""
    n, k = 1152, 896
    w, sw = fp8_weight(n, k, seed=1)
    x = x_rows(m, k, dtype, seed=2)
    sx = float(x.abs().max()) / 448 / 4          # the top quarter of |x| saturates
    bias = torch.randn(n, device="cuda")
    y = K.w8_gemv(x, w.view(torch.uint8), sw, sx, bias=bias, out_dtype=torch.float32,
                  sm_count=fp8_sm_count(kernel, n // 16))
    check(y, fp8_reference(x, w, sw, sx) + bias.double(), torch.float32)


@pytest.mark.skipif("not fp8_capable()", reason="E4M3 MMA needs sm_89 or newer")
@pytest.mark.parametrize("act", ("swiglu", "geglu"))
@pytest.mark.parametrize("m", (1, 8, 13))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ("plain", "wide", "w16"))
def test_w8_gemv_fused_gate(K, dtype, m, act, kernel):
    inter, k = 1536, 576
    w, sw = fp8_weight(2 * inter, k, seed=3)
    x = x_rows(m, k, dtype, seed=4)
    sx = float(x.abs().max()) / 448
    fused = K.w8_gemv(x, w.view(torch.uint8), sw, sx, act=act,
                      sm_count=fp8_sm_count(kernel, inter // 8))
    gu = fp8_reference(x, w, sw, sx).to(dtype)
    check(fused, K.gated(gu, act).double(), dtype)


def fp8b_weight(n, k, group, dtype, seed=0):
    """Random E4M3 codes, zeros and every subnormal code among them, and block scales; the
    reference weight q * s rounded to the dtype once, as DequantizeLinear does."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(n, k, generator=g, device="cuda") * 64).clamp(-448, 448).to(
        torch.float8_e4m3fn)
    codes = torch.tensor(list(range(8)) + list(range(0x80, 0x88)), dtype=torch.uint8)
    w.view(torch.uint8)[0, :16] = codes.cuda()
    scale = (torch.rand(n, k // group, generator=g, device="cuda") * 2e-3 + 1e-4).to(dtype)
    deq = (w.float() * scale.float().repeat_interleave(group, dim=1)).to(dtype)
    return w, scale, deq


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group", ((1728, 576, 64), (512, 4096, 128), (40, 512, 256),
                                       (40, 96, 32)))
def test_dequant_fp8b_is_exact(K, n, k, group, dtype):
    """Bit for bit, the zeros and subnormal codes too (bf16's fall below its normals)."""
    w, scale, deq = fp8b_weight(n, k, group, dtype, seed=12)
    assert torch.equal(K.dequant_fp8b(w.view(torch.uint8), scale, group, dtype), deq)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ("plain", "wide", "w16"))
# (the last two: K % 64 = 32, a tail chunk of half a chunk)
@pytest.mark.parametrize("n,k,group", ((576, 576, 64), (6144, 4096, 128), (4096, 14336, 128),
                                       (1000, 256, 128), (200, 1024, 256), (1000, 352, 32),
                                       (200, 96, 32)))
def test_w8b_gemv(K, n, k, group, dtype, m, kernel):
    w, scale, deq = fp8b_weight(n, k, group, dtype)
    x = x_rows(m, k, dtype)
    y = K.w8b_gemv(x, w.view(torch.uint8), scale, group,
                   sm_count=fp8_sm_count(kernel, math.ceil(n / 16)))
    assert y.dtype == dtype and y.shape == (m, n)
    check(y, x.double() @ deq.double().T, dtype)


@pytest.mark.parametrize("m", (1, 16))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ("plain", "wide", "w16"))
def test_w8b_gemv_bias_and_fp32_out(K, dtype, m, kernel):
    n, k, group = 1152, 896, 128
    w, scale, deq = fp8b_weight(n, k, group, dtype, seed=1)
    x = x_rows(m, k, dtype, seed=2)
    bias = torch.randn(n, device="cuda")
    y = K.w8b_gemv(x, w, scale, group, bias=bias, out_dtype=torch.float32,
                   sm_count=fp8_sm_count(kernel, n // 16))
    check(y, x.double() @ deq.double().T + bias.double(), torch.float32)


@pytest.mark.parametrize("act", ("swiglu", "geglu"))
@pytest.mark.parametrize("m", (1, 8, 13))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ("plain", "wide", "w16"))
def test_w8b_gemv_fused_gate(K, dtype, m, act, kernel):
    inter, k, group = 1536, 576, 64
    w, scale, deq = fp8b_weight(2 * inter, k, group, dtype, seed=3)
    x = x_rows(m, k, dtype, seed=4)
    sm = fp8_sm_count(kernel, inter // 8)
    fused = K.w8b_gemv(x, w, scale, group, act=act, sm_count=sm)
    gu = (x.double() @ deq.double().T).to(dtype)
    check(fused, K.gated(gu, act).double(), dtype, GATE_TOL[dtype])


def first_token_rows(m, k, dtype, seed):
    """x [m, k] whose first-token rows (flags int32 [m]: row 0, and the last of three or
    more; a row of zeros among them from five rows) reach 40x past the others, and a
    calibrated scale of the others."""
    x = x_rows(m, k, dtype, seed=seed)
    first = torch.zeros(m, dtype=torch.int32, device="cuda")
    first[0] = 1
    if m >= 3:
        first[m - 1] = 1
    if m >= 5:
        first[2] = 1
        x[2] = 0
    x[first.bool()] *= 40
    rest = x[~first.bool()]
    # a step above |max| / 448 as the build picks them (numerics.FP8_SCALE_STEPS): x / sx of a
    # bf16 x and exactly |max| / 448 lands on E4M3 ties, which x * (1 / sx) may break the
    # other way (test_quantize_fp8)
    sx = (float(rest.abs().max()) if len(rest) else 1.0) / 448 * 2 ** (1 / 8)
    return x, first, sx


def first_token_reference(x, first, sx):
    """x rounded to E4M3 and back (fp64): the first tokens' rows with s = max(|max| / 448,
    2^-126) of their own (quantization/qdq.py first_token_input), the others with sx."""
    s = first_token_scales(x, first, sx)[:, None]
    return (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s.double()


def first_token_scales(x, first, sx):
    """Each row's scale (fp32 [rows]): max(|max| / 448, 2^-126) for a first token's, sx for
    the others. Divided by a tensor: torch multiplies by the reciprocal of a Python number,
    and the graph and the kernels divide."""
    amax = x.float().abs().amax(1)
    own = torch.clamp_min(amax / torch.full_like(amax, 448.0), 2.0 ** -126)
    return torch.where(first.bool(), own, torch.full_like(own, sx))


def check_rows(y, ref, tol):
    """Each row within tol of its own max |ref| (a first token's row is 40x the others)."""
    assert not y.isnan().any()
    err = (y.double() - ref).abs().amax(1) / ref.abs().amax(1).clamp_min(1e-30)
    assert err.max().item() < tol, f"row errors {err.tolist()}"
    return err


@pytest.mark.skipif("not fp8_capable()", reason="E4M3 MMA needs sm_89 or newer")
@pytest.mark.parametrize("m", (1, 5, 8, 16))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ("plain", "wide", "w16"))
# the gated ones small: a first token's gate times up over K = 14336 overflows fp16
@pytest.mark.parametrize("n,k,act", ((576, 576, None), (4096, 14336, None),
                                     (576, 576, "swiglu"), (1536, 576, "swiglu")))
def test_w8_gemv_first_tokens(K, n, k, dtype, m, kernel, act):
    """--fp8-first-token dynamic: the flagged rows take their own scale; the rows beside
    them are as without flags. With the calibrated scale alone, a first token's row would
    saturate (checked, so the flags are seen to matter)."""
    n_out = 2 * n if act else n
    w, sw = fp8_weight(n_out, k, seed=5)
    x, first, sx = first_token_rows(m, k, dtype, seed=6)
    tiles = n // 8 if act else math.ceil(n / 16)
    y = K.w8_gemv(x, w.view(torch.uint8), sw, sx, act=act, first=first,
                  sm_count=fp8_sm_count(kernel, tiles))
    ref = (first_token_reference(x, first, sx) @ w.double().T) * sw.double()
    if act:
        ref = K.gated(ref.to(dtype), act).double()
    tol = GATE_TOL[dtype] if act else TOL[dtype]
    check_rows(y, ref, tol)
    plain = K.w8_gemv(x, w.view(torch.uint8), sw, sx, act=act,
                      sm_count=fp8_sm_count(kernel, tiles))
    rest = ~first.bool()
    assert torch.equal(plain[rest], y[rest])
    lost = (plain.double() - ref).abs().amax(1) / ref.abs().amax(1).clamp_min(1e-30)
    assert (lost[first.bool() & (x.abs().amax(1) > 0)] > 10 * tol).all()


@pytest.mark.skipif("not fp8_capable()", reason="E4M3 conversion needs sm_89 or newer")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", (576, 4096))
def test_quantize_fp8_rows(K, dtype, k):
    """A CTA a row: the first tokens' rows with their own scales, each row's scale over sx
    (1 for the others) as cuBLASLt's per-row x scale; codes as test_quantize_fp8 allows."""
    x, first, sx = first_token_rows(300, k, dtype, seed=8)
    first[::7] = 1
    codes, row_scale = K.quantize_fp8_rows(x, sx, first)
    s = first_token_scales(x, first, sx)
    assert torch.equal(row_scale, s / torch.full_like(s, sx))
    got = codes.view(torch.float8_e4m3fn).float()
    ref = (x.float() / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    own = first.bool()
    assert torch.equal(got[own], ref[own])   # divided by s, as the graph divides
    differ = got != ref
    assert differ.float().mean().item() < 1e-3
    assert ((got - ref).abs()[differ] <= ref.abs()[differ] / 8 + 2 ** -9).all()


@pytest.mark.skipif("not fp8_capable()", reason="E4M3 conversion needs sm_89 or newer")
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_fp8(K, dtype):
    """Each code is torch's E4M3 of x / sx or, at a rounding tie that x * (1 / sx) breaks
    the other way, its neighbour: at most one step apart, and rarely."""
    x = x_rows(300, 4096, dtype, seed=7) * 3
    sx = float(x.abs().max()) / 448 / 2
    got = K.quantize_fp8(x, sx).view(torch.float8_e4m3fn).float()
    ref = (x.float() / sx).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    differ = got != ref
    assert differ.float().mean().item() < 1e-3
    assert ((got - ref).abs()[differ] <= ref.abs()[differ] / 8 + 2 ** -9).all()
