"""The skinny GEMM for decode (plugins/kernels/gemv.cu) against a float64 reference on the GPU
(marked `gpu`; skipped without CUDA). Outputs are poisoned (NaN) before each launch, so an
element the kernel skips fails the check.

Tolerance: the relative max error max|y - ref| / max|ref| against the float64 product of the
same 16-bit inputs, < 1e-2 for a 16-bit output (its rounding) and < 1e-4 for fp32 (the fp32
accumulation alone), as tests/core/backends/test_cuda_gemm.py holds cuBLASLt to. The fused
SwiGLU/GeGLU must equal the unfused path bit for bit: cuBLASLt's product rounded to the dtype,
then kernels/activation.cu."""
import math

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and torch.cuda"),
    pytest.mark.usefixtures("poison"),
]

DTYPES = [torch.float16, torch.bfloat16]
MS = (1, 2, 3, 5, 8)   # the CUDA-core GEMV (1, 2 rows), the tensor-core one (3-8)
# (N, K): SmolLM2's projections (K = 576 is not a multiple of the 256 a warp reads a step),
# Llama-3.1-8B's QKV and down, a ragged N, and a K of one 16-byte chunk; a Mixtral router
# (8 experts) and Qwen2-MoE's shared-expert gate (one output).
SHAPES = ((576, 576), (1728, 576), (6144, 4096), (4096, 14336), (1001, 264), (37, 8),
          (8, 4096), (1, 256))
TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-4}


def make(m, n, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
    w = (torch.randn(n, k, generator=g, device="cuda") * k ** -0.5).to(dtype)
    return x, w


def check(y, ref, dtype):
    assert not y.isnan().any(), "unwritten (poisoned) or NaN output"
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < TOL[dtype], f"relative max error {err:.2e} >= {TOL[dtype]:.0e}"


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv(K, n, k, dtype, m):
    x, w = make(m, n, k, dtype)
    y = K.gemv(x, w)
    assert y.dtype == dtype and y.shape == (m, n)
    check(y, x.double() @ w.double().T, dtype)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out", ("same", "float32"))
def test_gemv_bias_and_fp32_out(K, dtype, out, m):
    n, k = 1152, 896   # Qwen2-0.5B's fused QKV, which has a bias
    od = dtype if out == "same" else torch.float32
    x, w = make(m, n, k, dtype, seed=1)
    bias = torch.randn(n, device="cuda").to(od)
    y = K.gemv(x, w, bias=bias, out_dtype=od)
    assert y.dtype == od
    check(y, x.double() @ w.double().T + bias.double(), od)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_lm_head_fp32(K, dtype, m):
    n, k = 49152, 576  # SmolLM2's head: fp32 logits straight from the GEMV
    x, w = make(m, n, k, dtype, seed=2)
    y = K.gemv(x, w, out_dtype=torch.float32)
    check(y, x.double() @ w.double().T, torch.float32)


@pytest.mark.parametrize("act", ("swiglu", "geglu"))
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter,k", ((1536, 576), (14336, 4096), (99, 64)))
def test_gemv_fused_gate(K, inter, k, dtype, m, act):
    """act(gate) * up straight from the fused gate-up weight, bit-equal to the GEMV into the
    [m, 2I] gate-up buffer followed by the gated-activation kernel."""
    x, w = make(m, 2 * inter, k, dtype, seed=3)
    fused = K.gemv(x, w, act=act)
    assert fused.shape == (m, inter)
    unfused = K.gated(K.gemv(x, w), act)
    assert not fused.isnan().any()
    assert torch.equal(fused, unfused)
    gu = (x.double() @ w.double().T).to(dtype)   # the reference path, rounded like the GEMM
    ref = K.gated(gu.contiguous(), act)
    torch.testing.assert_close(fused, ref, rtol=2e-2, atol=2e-2)


# The tensor-core kernel's variants (kernels/gemv.cu: _wide, _w32), which launch_rules.gemv_launch
# picks by the GEMM's tiles an SM: each run on its own through an SM count that picks it.
TC_VARIANTS = ("wide", "w32")


def tc_sm_count(kernel, tiles):
    """An SM count that makes launch_rules.gemv_launch pick this kernel for `tiles` (3 tiles
    an SM for _wide, 4 or more for _w32)."""
    return {"wide": math.ceil(tiles / 3), "w32": tiles // 4}[kernel]


def picked(m, n, k, dtype, kernel, sm_count, out_dtype=None, act=None):
    from llmc.plugins import launch_rules as lr

    dt = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    od = {None: None, torch.float32: "float32"}.get(out_dtype, dt)
    return f"_{kernel}" in lr.gemv_launch(m, n, k, dt, od, act, sm_count).kernel


@pytest.mark.parametrize("kernel", TC_VARIANTS)
@pytest.mark.parametrize("m", (3, 8))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", ((576, 576), (6144, 4096), (4096, 14336), (1001, 264)))
def test_gemv_tensor_core_variants(K, n, k, dtype, m, kernel):
    sms = tc_sm_count(kernel, math.ceil(n / 16))
    assert picked(m, n, k, dtype, kernel, sms)
    x, w = make(m, n, k, dtype, seed=4)
    check(K.gemv(x, w, sm_count=sms), x.double() @ w.double().T, dtype)


@pytest.mark.parametrize("kernel", TC_VARIANTS)
@pytest.mark.parametrize("m", (3, 8))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_tensor_core_variants_bias_and_fp32_out(K, dtype, m, kernel):
    n, k = 1152, 896
    sms = tc_sm_count(kernel, n // 16)
    assert picked(m, n, k, dtype, kernel, sms, torch.float32)
    x, w = make(m, n, k, dtype, seed=5)
    bias = torch.randn(n, device="cuda")
    y = K.gemv(x, w, bias=bias, out_dtype=torch.float32, sm_count=sms)
    check(y, x.double() @ w.double().T + bias.double(), torch.float32)


@pytest.mark.parametrize("act", ("swiglu", "geglu"))
@pytest.mark.parametrize("kernel", TC_VARIANTS)
@pytest.mark.parametrize("m", (3, 8))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter,k", ((1536, 576), (99, 64)))
def test_gemv_tensor_core_variants_fused_gate(K, inter, k, dtype, m, kernel, act):
    """Bit-equal to the unfused path, which has as many tiles and so takes the same kernel."""
    sms = tc_sm_count(kernel, math.ceil(inter / 8))
    assert picked(m, inter, k, dtype, kernel, sms, act=act)
    assert picked(m, 2 * inter, k, dtype, kernel, sms)
    x, w = make(m, 2 * inter, k, dtype, seed=6)
    fused = K.gemv(x, w, act=act, sm_count=sms)
    assert not fused.isnan().any()
    assert torch.equal(fused, K.gated(K.gemv(x, w, sm_count=sms), act))
    ref = K.gated((x.double() @ w.double().T).to(dtype).contiguous(), act)
    torch.testing.assert_close(fused, ref, rtol=2e-2, atol=2e-2)
