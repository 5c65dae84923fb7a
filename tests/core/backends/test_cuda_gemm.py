"""cuBLASLt GEMMs (llmc/backends/cuda/gemm.py) against torch on the GPU (marked `gpu`).

torch is used here only to make inputs and the reference: the GEMM layer itself takes device
pointers (tensor.data_ptr()) and a stream handle (torch.cuda.current_stream().cuda_stream).
Outputs are poisoned (NaN) before each call, so an element the GEMM skips fails the check. The
reference is the float64 product of the same 16-bit inputs (finer than an fp32 reference,
and free of TF32), and the check is the relative max error max|y - ref| / max|ref|:
< 1e-2 for a 16-bit output, < 1e-3 for an fp32 output.

FP8 (E4M3) plans: the reference dequantizes both operands exactly (E4M3 value * fp32 scale,
in float64), multiplies and adds the bias. cuBLASLt's E4M3 products are exact and its sums
fp32 (periodically promoted from the tensor cores' partial sums), so what differs is summation
order and the final rounding: < 1e-2 for a 16-bit output (about 2 bf16 ulps), < 2e-3 for
fp32, 2e-2 with fast accumulation. Rows of X and W are drawn at sizes 2^-3..2^3 apart and the
error of each element is divided by its two scales before the relative max is taken, so
every row and channel weighs the same: a scale applied to the wrong row or channel, or not at
all, fails however small its row or channel is.
"""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
HAVE_NVMATH = importlib.util.find_spec("nvmath") is not None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and torch.cuda"),
    pytest.mark.skipif(not HAVE_NVMATH,
                       reason="nvmath-python is not installed (pip install nvmath-python==1.0.0)"),
]

from llmc.backends.cuda import gemm  # noqa: E402
from llmc.devices import CudaError  # noqa: E402

WORKSPACE = 32 * 1024 * 1024
MS = (1, 3, 16, 64, 257, 512)  # 3 and 257 are not buckets: they take the AlgoCheck path
MAX_M = max(MS)
# (N, K): SmolLM2-135M's square projections, down/up (1728 <-> 576) and gate-up (2 x 1536 =
# 3072), then Llama-3.1-8B's QKV (4096 -> 6144) and down (14336 -> 4096) projections.
SHAPES = ((576, 576), (1728, 576), (3072, 576), (6144, 4096), (4096, 14336))
LM_HEAD = (49152, 576)  # SmolLM2's tied head: E is the [vocab, hidden] embedding table
QKV_BIAS = (1152, 896)  # Qwen2-0.5B's fused QKV projection (896 + 2 x 128), with a bias
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPES = ("float16", "bfloat16")
OUTS = ("same", "float32")
TOL = {"float16": 1e-2, "bfloat16": 1e-2, "float32": 1e-3}


@pytest.fixture(scope="module")
def blas():
    workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")
    b = gemm.Blas(workspace.data_ptr(), workspace.numel())
    yield b
    torch.cuda.synchronize()
    b.close()
    del workspace


@pytest.fixture(scope="module")
def plans(blas):
    """One plan per (N, K, dtype, out, transpose, bias[, FP8 options]), shared by the tests
    that need it."""
    cache = {}

    def get(n, k, dtype, out, *, transpose_b=False, bias=False, **fp8):
        out_dtype = dtype if out == "same" else out
        key = (n, k, dtype, out_dtype, transpose_b, bias, tuple(sorted(fp8.items())))
        if key not in cache:
            cache[key] = blas.plan(n, k, dtype=dtype, out_dtype=out_dtype,
                                   transpose_b=transpose_b, bias=bias, max_m=MAX_M, **fp8)
        return cache[key]
    return get


def make(plan, m, seed=0):
    """Random X, W (or E), a NaN-poisoned Y and, if the plan has one, a bias."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    n, k = plan.n, plan.k
    dt, od = TORCH[plan.dtype], TORCH[plan.out_dtype]
    x = torch.randn(m, k, generator=g, device="cuda").to(dt)
    w_shape = (n, k) if plan.transpose_b else (k, n)
    w = (torch.randn(*w_shape, generator=g, device="cuda") * k ** -0.5).to(dt)
    y = torch.full((m, n), float("nan"), dtype=od, device="cuda")
    b = torch.randn(n, generator=g, device="cuda").to(od) if plan.bias else None
    return x, w, y, b


def reference(plan, x, w, b):
    wd = w.double().T if plan.transpose_b else w.double()
    ref = x.double() @ wd
    return ref + b.double() if b is not None else ref


def run(plan, x, w, y, b, stream=None):
    stream = torch.cuda.current_stream() if stream is None else stream
    plan.run(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[0], stream.cuda_stream,
             bias_ptr=None if b is None else b.data_ptr())


def check(y, ref, out_dtype):
    assert not y.isnan().any(), "unwritten (poisoned) or NaN output"
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < TOL[out_dtype], f"relative max error {err:.2e} >= {TOL[out_dtype]:.0e}"


def check_gemm(plan, m, seed=0):
    x, w, y, b = make(plan, m, seed)
    run(plan, x, w, y, b)
    torch.cuda.synchronize()
    check(y, reference(plan, x, w, b), plan.out_dtype)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("out", OUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_linear(plans, n, k, dtype, out, m):
    """Y[M, N] = X[M, K] @ W[K, N], W stored [in, out]."""
    check_gemm(plans(n, k, dtype, out), m)


# (N, K) of the narrow GEMMs around a mixture of experts, weights stored [N, K] as the cuda
# backend keeps them: routers (Mixtral-8x7B: 8 experts; Qwen2-MoE-A2.7B: 60; Qwen3-30B-A3B:
# 128; the tiny test models: 4) and Qwen2-MoE's shared-expert gate (one output). Outputs of
# 2 to 16 bytes a row: leading dimensions below cuBLASLt's 16-byte vector width.
NARROW = ((8, 4096), (60, 2048), (128, 2048), (4, 256), (1, 256), (1, 2048))


@pytest.mark.parametrize("m", (9, 64, 257, 512))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", NARROW)
def test_narrow_outputs(plans, n, k, dtype, m):
    check_gemm(plans(n, k, dtype, "same", transpose_b=True), m)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("out", OUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_lm_head(plans, dtype, out, m):
    """Y[M, N] = X[M, K] @ E[N, K]^T: opA = T on the embedding table, no copy."""
    check_gemm(plans(*LM_HEAD, dtype, out, transpose_b=True), m)


@pytest.mark.parametrize("m", (1, 3, 64, 257))
@pytest.mark.parametrize("out", OUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_epilogue(plans, dtype, out, m):
    """CUBLASLT_EPILOGUE_BIAS adds bias[N] (in the output dtype) to every row of Y."""
    check_gemm(plans(*QKV_BIAS, dtype, out, bias=True), m)


def test_bias_pointer_changes_between_calls(plans):
    """The bias pointer is per call (one plan serves every layer): each call adds its own."""
    plan = plans(*QKV_BIAS, "bfloat16", "same", bias=True)
    for seed in (1, 2, 1):
        check_gemm(plan, 16, seed=seed)


def test_transposed_head_with_bias(plans):
    check_gemm(plans(*LM_HEAD, "bfloat16", "float32", transpose_b=True, bias=True), 5)


def test_side_stream(plans):
    """The GEMM runs on the stream it is given, not the current one."""
    plan = plans(1728, 576, "float16", "same")
    x, w, y, b = make(plan, 64)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # x and w were made on the current stream
    run(plan, x, w, y, b, stream=side)
    side.synchronize()
    check(y, reference(plan, x, w, b), plan.out_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_graph_capture(plans, dtype):
    """Two chained run() calls with different biases captured in one CUDA graph: a replay
    reads the inputs' current contents, keeps each call's own bias and orders the calls."""
    plan = plans(576, 576, dtype, "same", bias=True)
    m = 16
    x, w1, y1, b1 = make(plan, m, seed=1)
    _, w2, y2, b2 = make(plan, m, seed=2)
    plan.prepare(m)  # host-side per-M state made before capture (run once would do too)
    run(plan, x, w1, y1, b1)  # warm-up outside the capture
    run(plan, y1, w2, y2, b2)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a side stream: run() must use the capture stream
        run(plan, x, w1, y1, b1)
        run(plan, y1, w2, y2, b2)
    for seed in (3, 4):
        x.copy_(torch.randn(m, plan.k, device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(seed)))
        y1.fill_(float("nan"))
        y2.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(y1, reference(plan, x, w1, b1), plan.out_dtype)
        check(y2, reference(plan, y1, w2, b2), plan.out_dtype)  # from y1 as it was written
    del graph


def test_errors(blas, plans):
    plan = plans(576, 576, "bfloat16", "same")
    x, w, y, _ = make(plan, 4)
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="outside 1..512"):
        plan.run(x.data_ptr(), w.data_ptr(), y.data_ptr(), MAX_M + 1, stream)
    with pytest.raises(ValueError, match="256-byte aligned"):
        plan.run(x.data_ptr() + 2, w.data_ptr(), y.data_ptr(), 3, stream)
    with pytest.raises(ValueError, match="without a bias"):
        plan.run(x.data_ptr(), w.data_ptr(), y.data_ptr(), 4, stream, bias_ptr=y.data_ptr())
    with pytest.raises(ValueError, match="float32"):
        blas.plan(576, 576, dtype="float16", out_dtype="bfloat16")

    # A failed cuBLASLt status is a CudaError naming the call and the status: an attribute
    # buffer of the wrong size is CUBLAS_STATUS_INVALID_VALUE by the API's contract.
    lt = gemm._lt()
    desc = gemm._call("cublasLtMatmulDescCreate", lt.matmul_desc_create,
                      int(gemm._cublas().ComputeType.COMPUTE_32F), gemm.CUDA_R["float32"])
    try:
        buf = torch.zeros(1, dtype=torch.int64)
        with pytest.raises(CudaError, match="cublasLtMatmulDescSetAttribute failed with "
                                            "CUBLAS_STATUS_INVALID_VALUE") as info:
            gemm._call("cublasLtMatmulDescSetAttribute", lt.matmul_desc_set_attribute, desc,
                       lt.MatmulDescAttribute.TRANSA, buf.data_ptr(), 1)
        assert isinstance(info.value, gemm.CublasError) and info.value.status == 7
    finally:
        lt.matmul_desc_destroy(desc)


def test_own_workspace_and_close():
    """gemm.Workspace (cudaMalloc through cuda-bindings) serves a Blas; close is idempotent."""
    pytest.importorskip("cuda.bindings")
    with gemm.Workspace(1 << 20) as ws, gemm.Blas(ws.ptr, ws.size) as b:
        plan = b.plan(576, 576, dtype="float16", max_m=8)
        check_gemm(plan, 5)
        torch.cuda.synchronize()
    plan.close()
    b.close()
    ws.close()
    with pytest.raises(ValueError, match="closed"):
        plan.prepare(3)


# ---------------------------------------------------------------- FP8 (E4M3) W8A8

FP8 = "float8e4m3fn"
E4M3_MAX = 448.0
FP8_MS = (1, 7, 64, 300)  # 7 and 300 are not buckets
# (N, K): Llama-3.1-8B's QKV (4096 -> 6144) and down (14336 -> 4096) projections, and an N
# that is no power of two with SmolLM2's K = 576.
FP8_SHAPES = ((6144, 4096), (4096, 14336), (1000, 576))
FP8_OUTS = ("bfloat16", "float16", "float32")
FP8_TOL = {"float16": 1e-2, "bfloat16": 1e-2, "float32": 2e-3}
FAST_ACCUM_TOL = 2e-2
CC = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
needs_fp8 = pytest.mark.skipif(CC < (8, 9),
                               reason="needs an FP8 GPU (compute capability 8.9 or newer)")
needs_channel = pytest.mark.skipif(
    CC != (9, 0), reason="needs a Hopper GPU (compute capability 9.0): where cuBLASLt "
                         "documents per-channel FP8 scaling")


def fp8_plan(plans, n, k, out, *, bias=False, scaling="channel", fast_accum=False):
    return plans(n, k, FP8, out, transpose_b=True, bias=bias, scaling=scaling,
                 fast_accum=fast_accum)


def spread(rows, g):
    """Per-row size factors 2^-3..2^3."""
    return torch.exp2(torch.rand(rows, generator=g, device="cuda") * 6 - 3)


def quantize(t, per_row):
    """E4M3 values and fp32 scales (amax / 448) of t: one scale per row, or one for all."""
    amax = t.abs().amax(1) if per_row else t.abs().amax().reshape(1)
    scale = (amax / E4M3_MAX).float()
    q = (t / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q, scale):
    return q.float().double() * scale.double()[:, None]


def make_fp8(plan, m, seed=0):
    """E4M3 X [m, K] and W [N, K] with their scales (per token and per channel for
    "channel" scaling, one each for "tensor"), a NaN-poisoned Y and, if the plan has one, a
    bias in plan.bias_dtype."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    n, k = plan.n, plan.k
    per_row = plan.scaling == "channel"
    xq, xs = quantize(torch.randn(m, k, generator=g, device="cuda") * spread(m, g)[:, None],
                      per_row)
    wq, ws = quantize(torch.randn(n, k, generator=g, device="cuda") * k ** -0.5
                      * spread(n, g)[:, None], per_row)
    y = torch.full((m, n), float("nan"), dtype=TORCH[plan.out_dtype], device="cuda")
    b = None
    if plan.bias:
        # As large as the products of X's smallest row: it neither hides them nor hides in them.
        typical = (xq.float().double() @ wq.float().double().T).abs().mean()
        b = (torch.randn(n, generator=g, device="cuda").double() * ws.double() * xs.min()
             * typical).to(TORCH[plan.bias_dtype])
    return xq, xs, wq, ws, y, b


def reference_fp8(xq, xs, wq, ws, b):
    ref = dequantize(xq, xs) @ dequantize(wq, ws).T
    return ref + b.double() if b is not None else ref


def run_fp8(plan, xq, xs, wq, ws, y, b, stream=None):
    stream = torch.cuda.current_stream() if stream is None else stream
    plan.run(xq.data_ptr(), wq.data_ptr(), y.data_ptr(), xq.shape[0], stream.cuda_stream,
             bias_ptr=None if b is None else b.data_ptr(), w_scale_ptr=ws.data_ptr(),
             x_scale_ptr=xs.data_ptr())


def check_fp8(y, ref, xs, ws, tol):
    """Relative max error with each element's error and value divided by its two scales."""
    assert not y.isnan().any(), "unwritten (poisoned) or NaN output"
    s = xs.double()[:, None] * ws.double()[None, :]
    err = (((y.double() - ref) / s).abs().max() / (ref / s).abs().max()).item()
    assert err < tol, f"scale-normalised relative max error {err:.2e} >= {tol:.0e}"


def check_fp8_gemm(plan, m, seed=0, tol=None):
    xq, xs, wq, ws, y, b = make_fp8(plan, m, seed)
    run_fp8(plan, xq, xs, wq, ws, y, b)
    torch.cuda.synchronize()
    check_fp8(y, reference_fp8(xq, xs, wq, ws, b), xs, ws,
              FP8_TOL[plan.out_dtype] if tol is None else tol)


@needs_channel
@pytest.mark.parametrize("m", FP8_MS)
@pytest.mark.parametrize("bias", (False, True))
@pytest.mark.parametrize("out", FP8_OUTS)
@pytest.mark.parametrize("n,k", FP8_SHAPES)
def test_fp8_per_channel(plans, n, k, out, bias, m):
    """Y = (Xq @ Wq^T) * x_scale[m] * w_scale[N] (+ bias): cuBLASLt's outer-vector scaling."""
    plan = fp8_plan(plans, n, k, out, bias=bias)
    assert plan.bias_dtype == ("bfloat16" if out == "float32" else out)
    check_fp8_gemm(plan, m)


@needs_fp8
@pytest.mark.parametrize("m", (1, 7, 300))
@pytest.mark.parametrize("out", FP8_OUTS)
@pytest.mark.parametrize("n,k", ((6144, 4096), (1000, 576)))
def test_fp8_per_tensor(plans, n, k, out, m):
    """scaling="tensor": one fp32 scale for W and one for X (any FP8 GPU)."""
    check_fp8_gemm(fp8_plan(plans, n, k, out, bias=m == 7, scaling="tensor"), m)


@needs_channel
def test_fp8_calibrated_activation_scale(plans):
    """A per-tensor activation scale on a per-channel plan: the value repeated, in a vector
    longer than m (one per layer for every m, as an engine stores it)."""
    plan = fp8_plan(plans, 1000, 576, "bfloat16", bias=True)
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(37, plan.k, generator=g, device="cuda")
    xq, x_scale = quantize(x, per_row=False)
    xs = x_scale.expand(MAX_M).contiguous()
    _, _, wq, ws, y, b = make_fp8(plan, 37, seed=6)
    run_fp8(plan, xq, xs, wq, ws, y, b)
    torch.cuda.synchronize()
    check_fp8(y, reference_fp8(xq, xs[:37], wq, ws, b), xs[:37], ws, FP8_TOL["bfloat16"])


@needs_channel
@pytest.mark.parametrize("n,k", ((4096, 14336), (1000, 576)))
def test_fp8_fast_accum(plans, n, k):
    """CUBLASLT_MATMUL_DESC_FAST_ACCUM: no promotion of partial sums, a looser tolerance."""
    check_fp8_gemm(fp8_plan(plans, n, k, "bfloat16", fast_accum=True), 64, tol=FAST_ACCUM_TOL)


@needs_channel
def test_fp8_scale_pointers_change_between_calls(plans):
    """Weight, scales and bias are per call (one plan serves every layer): each call uses its
    own, also when a call repeats the pointers of the call before the last."""
    plan = fp8_plan(plans, 6144, 4096, "bfloat16", bias=True)
    for seed in (1, 2, 1, 1):
        check_fp8_gemm(plan, 16, seed=seed)


@needs_channel
def test_fp8_cuda_graph_capture(plans):
    """Two calls with their own weights, scales and biases captured in one CUDA graph: each
    keeps its own pointers, and a replay reads the current contents of X and of the scales
    (cuBLASLt reads the scales on the device when the matmul runs)."""
    plan = fp8_plan(plans, 1000, 576, "bfloat16", bias=True)
    m = 16
    xq1, xs1, wq1, ws1, y1, b1 = make_fp8(plan, m, seed=1)
    xq2, xs2, wq2, ws2, y2, b2 = make_fp8(plan, m, seed=2)
    plan.prepare(m)
    run_fp8(plan, xq1, xs1, wq1, ws1, y1, b1)  # warm-up outside the capture
    run_fp8(plan, xq2, xs2, wq2, ws2, y2, b2)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_fp8(plan, xq1, xs1, wq1, ws1, y1, b1)
        run_fp8(plan, xq2, xs2, wq2, ws2, y2, b2)
    # An uncaptured call with other pointers in between: the descriptor changes, the graph not.
    xq3, xs3, wq3, ws3, y3, b3 = make_fp8(plan, m, seed=3)
    run_fp8(plan, xq3, xs3, wq3, ws3, y3, b3)
    torch.cuda.synchronize()
    check_fp8(y3, reference_fp8(xq3, xs3, wq3, ws3, b3), xs3, ws3, FP8_TOL["bfloat16"])
    for seed in (4, 5):
        g = torch.Generator(device="cuda").manual_seed(seed)
        for xq, xs in ((xq1, xs1), (xq2, xs2)):  # new X and new per-token scales, in place
            q, s = quantize(torch.randn(m, plan.k, generator=g, device="cuda")
                            * spread(m, g)[:, None], per_row=True)
            xq.copy_(q)
            xs.copy_(s)
        ws2.mul_(2.0)  # and a new weight scale
        y1.fill_(float("nan"))
        y2.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_fp8(y1, reference_fp8(xq1, xs1, wq1, ws1, b1), xs1, ws1, FP8_TOL["bfloat16"])
        check_fp8(y2, reference_fp8(xq2, xs2, wq2, ws2, b2), xs2, ws2, FP8_TOL["bfloat16"])
    del graph


def test_capability(blas):
    """Blas.capability (what FP8 plans check) is the current device's."""
    assert blas.capability == CC


@needs_fp8
def test_fp8_errors(blas, plans):
    scaling = "channel" if CC == (9, 0) else "tensor"
    plan = fp8_plan(plans, 1000, 576, "bfloat16", scaling=scaling)
    xq, xs, wq, ws, y, _ = make_fp8(plan, 4)
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="needs w_scale_ptr and x_scale_ptr"):
        plan.run(xq.data_ptr(), wq.data_ptr(), y.data_ptr(), 4, stream)
    with pytest.raises(ValueError, match="needs w_scale_ptr and x_scale_ptr"):
        plan.run(xq.data_ptr(), wq.data_ptr(), y.data_ptr(), 4, stream,
                 w_scale_ptr=ws.data_ptr())
    with pytest.raises(ValueError, match="scale pointers must be"):
        plan.run(xq.data_ptr(), wq.data_ptr(), y.data_ptr(), 4, stream,
                 w_scale_ptr=ws.data_ptr() + 2, x_scale_ptr=xs.data_ptr())
    with pytest.raises(ValueError, match="256-byte aligned"):
        plan.run(xq.data_ptr() + 16, wq.data_ptr(), y.data_ptr(), 3, stream,
                 w_scale_ptr=ws.data_ptr(), x_scale_ptr=xs.data_ptr())
    with pytest.raises(ValueError, match="without a bias"):
        plan.run(xq.data_ptr(), wq.data_ptr(), y.data_ptr(), 4, stream, bias_ptr=y.data_ptr(),
                 w_scale_ptr=ws.data_ptr(), x_scale_ptr=xs.data_ptr())
    # check_plan's rules hold on the GPU path too (the CPU tests cover each rule).
    with pytest.raises(ValueError, match="transpose_b=True"):
        blas.plan(1000, 576, dtype=FP8, out_dtype="bfloat16")
    with pytest.raises(ValueError, match="K % 16"):
        blas.plan(1000, 584, dtype=FP8, out_dtype="bfloat16", transpose_b=True)
    # A 16-bit plan takes no scales: its run() is unchanged.
    plan16 = plans(576, 576, "bfloat16", "same")
    with pytest.raises(TypeError, match="w_scale_ptr"):
        plan16.run(0, 0, 0, 1, stream, w_scale_ptr=ws.data_ptr())

