"""cuBLASLt GEMMs (llmc/backends/cuda/gemm.py) against torch on the GPU (marked `gpu`).

torch is used here only to make inputs and the reference: the GEMM layer itself takes device
pointers (tensor.data_ptr()) and a stream handle (torch.cuda.current_stream().cuda_stream).
Outputs are poisoned (NaN) before each call, so an element the GEMM skips fails the check. The
reference is the float64 product of the same 16-bit inputs (finer than an fp32 reference,
and free of TF32), and the check is the relative max error max|y - ref| / max|ref|:
< 1e-2 for a 16-bit output, < 1e-3 for an fp32 output.
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
    """One plan per (N, K, dtype, out, transpose, bias), shared by the tests that need it."""
    cache = {}

    def get(n, k, dtype, out, *, transpose_b=False, bias=False):
        out_dtype = dtype if out == "same" else out
        key = (n, k, dtype, out_dtype, transpose_b, bias)
        if key not in cache:
            cache[key] = blas.plan(n, k, dtype=dtype, out_dtype=out_dtype,
                                   transpose_b=transpose_b, bias=bias, max_m=MAX_M)
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
