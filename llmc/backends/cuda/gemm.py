"""GEMMs for the cuda backend: one cublasLtMatmul per call, on pre-planned descriptors.

What it does
------------
The model graph's matrix products, in its row-major terms:

    Y[M, N] = X[M, K] @ W[K, N] (+ bias[N])   weights stored [in, out] (the linear layers)
    Y[M, N] = X[M, K] @ E[N, K]^T             the tied LM head: E is the embedding table

with X and W/E in fp16 or bf16, accumulation and scaling in fp32 (CUBLAS_COMPUTE_32F, scale
type CUDA_R_32F) and Y in the input dtype or in fp32 (the LM head writes fp32 logits directly),
and the FP8 (E4M3) W8A8 product with per-channel weight scales described below.
A `Blas` owns the cuBLASLt handle and the caller's workspace; `Blas.plan(n, k, ...)` makes a
`GemmPlan` once per (N, K, dtype, out dtype, transpose, bias); `GemmPlan.run(x, w, y, m,
stream)` is exactly one cublasLtMatmul on `stream`: no allocation, no synchronisation, no new
Python objects beyond the call's own ints, so it can be captured in a CUDA graph.

Why cuBLASLt, and through nvmath's bindings
-------------------------------------------
The backend launches ~200 GEMMs per decode step and captures decode steps in CUDA graphs, so
the per-call path must be the library call and nothing else.

- cuBLASLt rather than cuBLAS: descriptors (types, transposes, epilogue) are built once and
  reused; the algorithm is chosen once per M bucket with cublasLtMatmulAlgoGetHeuristic and
  passed explicitly, so no heuristic runs inside the call; the bias add is fused as an
  epilogue (CUBLASLT_EPILOGUE_BIAS) instead of a second kernel; and the workspace is the
  caller's, so nothing is allocated behind our back during graph capture.
- nvmath.bindings.cublasLt rather than nvmath's high-level `Matmul`: the high-level object
  manages its own operands, streams, workspace and per-call bookkeeping (events, logging,
  operand wrapping) - what we need is the bare C API with integer pointers, which is what
  the low-level Cython bindings are (`cublasLt.matmul(handle, desc, alpha, a, adesc, ...)`
  maps 1:1 onto cublasLtMatmul, raising cuBLASLtError on a failed status).
- rather than ctypes over libcublasLt.so: the bindings locate the library that matches the
  installed CUDA (wheels or toolkit), carry the enums and the struct layouts
  (cublasLtMatmulHeuristicResult_t as a numpy dtype), and a Cython call costs far less than a
  ctypes call with 16 converted arguments.

The layout trick
----------------
cuBLASLt is column-major. A row-major [R, C] array is, byte for byte, a column-major C x R
matrix with leading dimension C. So instead of computing Y = X W we compute its transpose,
which needs no copies:

    Y^T = W^T X^T:   D (N x M, ld N)  =  A (N x K, ld N)  *  B (K x M, ld K)
                     D = Y as stored,    A = W as stored,    B = X as stored; opA = opB = N

    tied head, Y^T = E X^T:  A = E as stored is column-major K x N (ld K), and opA = T turns
                     it into the N x K operand the product needs.

The bias of CUBLASLT_EPILOGUE_BIAS is a vector over D's rows, which are Y's columns: bias[N].
Only the B and D layouts depend on M (their column count); A and the matmul descriptor are
fixed per plan.

Per-M state: layouts are created per exact M (lazily, cached)
--------------------------------------------------------------
The B and D layouts of a given M are created once (cublasLtMatrixLayoutCreate is host-only
and cheap) and cached by M, rather than re-set per call with cublasLtMatrixLayoutSetAttribute
(ROWS/COLS). Re-setting would cost two more binding calls per GEMM and would mutate
descriptors shared by every call of the plan, so an algorithm validated for one M could be run
with another; cached per-M layouts are immutable after creation. The algorithm comes from
heuristics run at plan time for M buckets 1, 2, 4, ... max_m; an M that is not itself a bucket
takes its bucket's best algorithm that cublasLtMatmulAlgoCheck accepts for the exact M (or, if
none does, its own heuristic query). `GemmPlan.prepare(*ms)` builds these entries ahead of
time: call it (or run once) for every M before capturing a CUDA graph, so capture does only
the matmul itself.

Constraints worth knowing
-------------------------
- C and D: cuBLASLt's supported-type table pairs each (A, B) type with one C/D type; C must
  have D's type and layout. Here beta = 0 and C is D (same pointer, same layout), so this holds
  for both outputs: fp16 x fp16 -> fp16 or fp32, bf16 x bf16 -> bf16 or fp32, all with
  COMPUTE_32F and an fp32 scale type.
- The bias vector has D's type (CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE left at its default):
  16-bit for a 16-bit output, fp32 for an fp32 output.
- Pointers (X, W/E, Y) must be aligned to `alignment` bytes (default 256, as torch and
  cudaMalloc give): heuristics are told so (MIN_ALIGNMENT_*_BYTES) and `run` checks it, since an
  algorithm chosen for 256-byte alignment may fail or misbehave on less.
- A plan is not re-entrant: `run` sets the bias pointer on the shared matmul descriptor when it
  changes. Use one plan per stream (or one Blas per stream, since the workspace is shared too).

FP8 (E4M3) W8A8
---------------
`Blas.plan(n, k, dtype="float8e4m3fn", out_dtype=..., transpose_b=True)` makes an
`Fp8GemmPlan` for

    Y[m, N] = (Xq[m, K] @ Wq[N, K]^T) * x_scale * w_scale[N]  (+ bias[N])

with Xq and Wq in float8 E4M3 (the weight as the engine stores it, [out, in]), fp32 scales,
products accumulated in fp32 and Y in bfloat16, float16 or float32. `run` takes two more
pointers, `w_scale_ptr` and `x_scale_ptr`, which differ per layer like the weight pointer:
they live in the descriptor (CUBLASLT_MATMUL_DESC_A/B_SCALE_POINTER) and are rewritten only
when they change, so a call is still one cublasLtMatmul, capturable in a CUDA graph. cuBLASLt
reads the scales from device memory when the matmul runs, so a graph replay reads their
current contents.

What cuBLASLt requires, and so what a plan checks (cuBLAS docs, cublasLtMatmul and "Narrow
Precision Data Types Usage"):
- the "TN" form on Ada and Hopper: A transposed, B not. The layout trick gives exactly that
  with opA = T on the weight as stored [N, K], so FP8 plans need transpose_b=True;
- CUBLAS_COMPUTE_32F with an fp32 scale type (what every plan uses), FP8 hardware: compute
  capability 8.9 or newer;
- 16-byte alignment of pointers and leading dimensions: K % 16 == 0 (lda = ldb = K bytes)
  and N * sizeof(out) % 16 == 0 (N % 8 for a 16-bit output, N % 4 for fp32);
- E4M3 x E4M3 writes bf16, fp16 or fp32 (C = D); the bias of CUBLASLT_EPILOGUE_BIAS is then
  bf16, fp16 and, for an fp32 output, bf16 again (not fp32): `plan.bias_dtype` says which,
  and the plan sets CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE to it.

Two scaling modes (`scaling=`):
- "channel" (the default): CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F. cuBLASLt computes
  D[i, j] = scale_A[i] * scale_B[j] * sum_l A[i, l] B[l, j], and it enables this mode only
  with both A_SCALE_MODE and B_SCALE_MODE set to it: A's scale is a vector over D's rows (our
  N: the weight's per-output-channel scale, w_scale[N]) and B's a vector over D's columns
  (our m: one scale per row of X, x_scale[m]). So a per-tensor activation scale is passed as
  a vector holding it at least m times (written once at load time, or by the kernel that
  quantizes X); per-token activation scales come for free. cuBLASLt documents this mode for
  compute capability 9.0 (Hopper); elsewhere, if its heuristics find no algorithm, the
  plan's error says so and names scaling="tensor".
- "tensor": CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F, one fp32 each for W and X (compute
  capability 8.9+): for weights quantized with one scale, or a GPU without outer-vector
  scaling.

`run` checks that scale vectors are 16-byte aligned (a scalar: 4), as cuBLASLt asks of every
other FP8 operand (its docs say nothing of the scales' own; cudaMalloc and torch give 256).
`fast_accum=True` sets CUBLASLT_MATMUL_DESC_FAST_ACCUM: cuBLASLt then skips its periodic
promotion of the FP8 tensor cores' partial sums (kept at reduced precision on Hopper) to
fp32 - faster, less accurate on long K; off by default.

`import llmc.backends.cuda.gemm` needs neither nvmath nor a GPU; nvmath is imported when a
`Blas` is made, and `check_plan` (every argument rule above) runs without either.
"""

from __future__ import annotations

import numpy as np

from llmc.devices import CudaError, check

FP8 = "float8e4m3fn"  # llmc's name (dtypes.py) for float8 E4M3, finite-only: CUDA_R_8F_E4M3
# cudaDataType_t values (library_types.h; a stable ABI): the dtypes a plan takes.
CUDA_R = {"float32": 0, "float16": 2, "bfloat16": 14, FP8: 28}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, FP8: 1}
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
            "float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
            FP8: FP8, "float8_e4m3fn": FP8, "fp8": FP8, "e4m3": FP8}
INPUT_DTYPES = ("float16", "bfloat16")
FP8_OUT_DTYPES = ("bfloat16", "float16", "float32")
# FP8 scaling modes: "channel" = cuBLASLt's OUTER_VEC_32F, "tensor" = SCALAR_32F.
FP8_SCALINGS = ("channel", "tensor")
FP8_MIN_CAPABILITY = (8, 9)        # FP8 tensor cores: Ada, Hopper, Blackwell
OUTER_VEC_CAPABILITIES = ((9, 0),)  # where cuBLASLt documents outer-vector scaling

DEFAULT_WORKSPACE = 32 * 1024 * 1024
# Headroom kept out of the workspace size told to the heuristics: nvmath's own Matmul adds 16
# bytes to the reported need when an epilogue is set ("workaround for library issue").
_WORKSPACE_SLACK = 256
_HEURISTIC_COUNT = 8  # algorithms asked per bucket; non-bucket Ms try them in order


class CublasError(CudaError):
    """A cuBLASLt call returned a status other than CUBLAS_STATUS_SUCCESS.

    `call` names the C function (e.g. "cublasLtMatmul"), `status` is the cublasStatus_t value
    (None if the bindings did not give one)."""

    def __init__(self, call: str, status: int | None, detail: str = ""):
        self.call = call
        self.status = status
        self.detail = detail
        name = _status_name(status)
        text = f"{call} failed with {name}" + (f" ({status})" if status is not None else "")
        super().__init__(text + (f": {detail}" if detail else ""))


def _status_name(status) -> str:
    if status is None:
        return "an unknown status"
    try:
        return "CUBLAS_STATUS_" + _cublas().Status(int(status)).name
    except Exception:  # the name is a courtesy: never mask the error itself
        return "cuBLAS status"


def _lt():
    """nvmath's cuBLASLt bindings, imported on first use (CI has no nvmath)."""
    try:
        from nvmath.bindings import cublasLt
    except ImportError as exc:
        raise ImportError(
            "the cuda backend's GEMMs need nvmath-python's cuBLASLt bindings and the cuBLAS "
            "library: pip install nvmath-python==1.0.0 nvidia-cublas") from exc
    return cublasLt


def _cublas():
    """nvmath's cuBLAS bindings: the cublasComputeType_t, cublasOperation_t and status enums."""
    _lt()
    from nvmath.bindings import cublas

    return cublas


def _call(name: str, fn, *args, context: str = ""):
    """Call a binding; a cuBLASLtError becomes a CublasError naming the C call and status."""
    lt = _lt()
    try:
        return fn(*args)
    except lt.cuBLASLtError as exc:
        status = getattr(exc, "status", None)
        detail = "; ".join(s for s in (context, str(exc)) if s)
        raise CublasError(name, status, detail) from exc


def normalize_dtype(dtype) -> str:
    """'bf16' / 'bfloat16' / torch.bfloat16 / numpy float16 -> 'bfloat16' / 'float16' / ..."""
    text = str(dtype).lower().removeprefix("torch.")
    if text not in _ALIASES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose float16, bfloat16, float32 "
                         f"or {FP8}")
    return _ALIASES[text]


def check_plan(n: int, k: int, *, dtype="bfloat16", out_dtype=None, transpose_b: bool = False,
               max_m: int = 512, alignment: int = 256, scaling: str | None = None,
               fast_accum: bool = False,
               capability: tuple[int, int] | None = None) -> tuple[str, str, str | None]:
    """A plan's arguments checked and normalised, with no GPU or nvmath needed:
    (dtype, out_dtype, scaling). `capability` is the GPU's (major, minor), read only for
    FP8 (None skips that check). Raises ValueError naming the rule and the fix."""
    dtype = normalize_dtype(dtype)
    if dtype == FP8:
        return _check_fp8(int(n), int(k), out_dtype, transpose_b, max_m, alignment, scaling,
                          capability)
    out = dtype if out_dtype is None else normalize_dtype(out_dtype)
    if dtype not in INPUT_DTYPES:
        raise ValueError(f"GEMM inputs must be float16, bfloat16 or {FP8}, not {dtype}")
    if out not in (dtype, "float32"):
        raise ValueError(f"a {dtype} GEMM writes {dtype} or float32, not {out}")
    if scaling is not None or fast_accum:
        raise ValueError(f"scaling and fast_accum are FP8 options; a {dtype} GEMM has neither")
    _check_sizes(n, k, max_m, alignment)
    return dtype, out, None


def _check_sizes(n, k, max_m, alignment) -> None:
    if min(int(n), int(k), int(max_m)) < 1:
        raise ValueError(f"GEMM sizes must be positive: n={n}, k={k}, max_m={max_m}")
    if int(alignment) < 1 or int(alignment) & (int(alignment) - 1):
        raise ValueError(f"alignment must be a power of two, not {alignment}")


def _check_fp8(n, k, out_dtype, transpose_b, max_m, alignment, scaling,
               capability) -> tuple[str, str, str]:
    if out_dtype is None:
        raise ValueError(f"an {FP8} GEMM needs out_dtype: bfloat16, float16 or float32")
    out = normalize_dtype(out_dtype)
    if out not in FP8_OUT_DTYPES:
        raise ValueError(f"an {FP8} GEMM writes bfloat16, float16 or float32, not {out}")
    if not transpose_b:
        raise ValueError(f"an {FP8} GEMM takes the weight as stored [N, K] (transpose_b=True): "
                         "cuBLASLt runs FP8 only in the TN form")
    scaling = "channel" if scaling is None else scaling
    if scaling not in FP8_SCALINGS:
        raise ValueError(f"scaling must be 'channel' (w_scale[N], x_scale[m]) or 'tensor' "
                         f"(one scale each), not {scaling!r}")
    _check_sizes(n, k, max_m, alignment)
    if k % 16:
        raise ValueError(f"an {FP8} GEMM needs K % 16 == 0 (16-byte rows), not K={k}; pad K")
    if n * ITEMSIZE[out] % 16:
        raise ValueError(f"an {FP8} GEMM writing {out} needs N % {16 // ITEMSIZE[out]} == 0 "
                         f"(16-byte output rows), not N={n}; pad N")
    if int(alignment) < 16:
        raise ValueError(f"an {FP8} GEMM needs 16-byte aligned pointers, not alignment="
                         f"{alignment}")
    if capability is not None and tuple(capability) < FP8_MIN_CAPABILITY:
        raise ValueError(f"{FP8} GEMMs need an FP8 GPU (compute capability 8.9 or newer: Ada, "
                         f"Hopper, Blackwell); this one is {capability[0]}.{capability[1]}")
    return FP8, out, scaling


def _set_attr(name: str, setter, dtype_fn, obj: int, attr, value) -> None:
    """cublasLt*SetAttribute with `value` in the attribute's own C type (dtype_fn(attr))."""
    buf = np.array([value], dtype=dtype_fn(attr))
    _call(name, setter, obj, attr, buf.ctypes.data, buf.itemsize,
          context=f"attribute {getattr(attr, 'name', attr)} = {value}")


def m_buckets(max_m: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to max_m; max_m itself is the last bucket (a power of two or not)."""
    out, m = [], 1
    while m < max_m:
        out.append(m)
        m *= 2
    out.append(max_m)
    return tuple(out)


class Workspace:
    """A device buffer for cuBLASLt's workspace, cudaMalloc'd through cuda-bindings.

    One per stream is enough: every GEMM on the stream is serialised and may reuse it. A
    session that already owns device memory can pass its own pointer to Blas instead."""

    def __init__(self, size: int = DEFAULT_WORKSPACE):
        from cuda.bindings import runtime

        self.size = int(size)
        self.ptr = int(check(runtime.cudaMalloc(self.size)))

    def close(self) -> None:
        if self.ptr:
            from cuda.bindings import runtime

            ptr, self.ptr = self.ptr, 0
            check(runtime.cudaFree(ptr))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Blas:
    """A cuBLASLt handle (cublasLtCreate once, cublasLtDestroy on close) and the workspace its
    plans use: `workspace_ptr` is device memory of `workspace_size` bytes owned by the caller,
    alive until close(). The plans made here are closed with it.

    The handle is not tied to a stream; each run() names its stream. Make the Blas (and its
    plans) with the target device's context current: heuristics read that device."""

    def __init__(self, workspace_ptr: int, workspace_size: int):
        self._lt = _lt()
        self.workspace_ptr = int(workspace_ptr)
        self.workspace_size = int(workspace_size)
        if self.workspace_size and not self.workspace_ptr:
            raise ValueError("workspace_size > 0 with a null workspace pointer")
        self.handle = _call("cublasLtCreate", self._lt.create)
        self.version = int(self._lt.get_version())
        self._plans: list[GemmPlan] = []
        self._capability: tuple[int, int] | None = None

    @property
    def capability(self) -> tuple[int, int]:
        """The current device's compute capability (read once; FP8 plans check it)."""
        if self._capability is None:
            from llmc.devices import device_capability

            self._capability = device_capability()
        return self._capability

    def plan(self, n: int, k: int, *, dtype="bfloat16", out_dtype=None,
             transpose_b: bool = False, bias: bool = False, max_m: int = 512,
             alignment: int = 256, scaling: str | None = None,
             fast_accum: bool = False) -> GemmPlan:
        """A GemmPlan for Y[m, n] = X[m, k] @ W[k, n] (or @ E[n, k]^T with transpose_b),
        m in 1..max_m; out_dtype None means dtype. With dtype="float8e4m3fn" an Fp8GemmPlan
        (transpose_b=True and an out_dtype required; scaling "channel" or "tensor",
        fast_accum: see the module docstring)."""
        if not self.handle:
            raise ValueError("this Blas is closed")
        cls = Fp8GemmPlan if normalize_dtype(dtype) == FP8 else GemmPlan
        plan = cls(self, n, k, dtype=dtype, out_dtype=out_dtype, transpose_b=transpose_b,
                   bias=bias, max_m=max_m, alignment=alignment, scaling=scaling,
                   fast_accum=fast_accum)
        self._plans.append(plan)
        return plan

    def close(self) -> None:
        for plan in self._plans:
            plan.close()
        self._plans.clear()
        if self.handle:
            handle, self.handle = self.handle, 0
            _call("cublasLtDestroy", self._lt.destroy, handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _PointerAttr:
    """A pointer-valued matmul-descriptor attribute (the bias, the FP8 scales): one plan
    serves every layer of its shape, so run() rewrites it, only when the pointer changes.
    `value` is the pointer the descriptor holds now."""

    __slots__ = ("attr", "buf", "addr", "size", "value")

    def __init__(self, lt, attr):
        self.attr = attr
        self.buf = np.zeros(1, dtype=lt.get_matmul_desc_attribute_dtype(attr))
        self.addr, self.size = self.buf.ctypes.data, self.buf.itemsize
        self.value = 0

    def write(self, plan: GemmPlan, ptr: int) -> None:
        self.buf[0] = ptr
        try:
            plan._set_desc(plan._desc, self.attr, self.addr, self.size)
        except plan._error as exc:
            raise CublasError("cublasLtMatmulDescSetAttribute", getattr(exc, "status", None),
                              f"{self.attr.name}; {exc}") from exc
        self.value = ptr


class GemmPlan:
    """Y[m, N] = X[m, K] @ W[K, N] (+ bias[N]), or X @ E[N, K]^T with transpose_b, for any
    m in 1..max_m; all row-major, pointers are device addresses (ints).

    Made by Blas.plan. Holds the matmul descriptor, A's layout, the preference, fp32 alpha = 1
    and beta = 0 (host pointer mode), the heuristic results per M bucket and, per M seen, the
    B/D layouts and the algorithm. The weight pointer is a run() argument, so one plan serves
    every layer with the same shape."""

    def __init__(self, blas: Blas, n: int, k: int, *, dtype="bfloat16", out_dtype=None,
                 transpose_b: bool = False, bias: bool = False, max_m: int = 512,
                 alignment: int = 256, scaling: str | None = None, fast_accum: bool = False):
        lt = self._lt = blas._lt
        cublas = _cublas()
        fp8 = normalize_dtype(dtype) == FP8
        if fp8 is not isinstance(self, Fp8GemmPlan):
            raise ValueError(f"make {dtype} plans with Blas.plan")
        self.dtype, self.out_dtype, self.scaling = check_plan(
            n, k, dtype=dtype, out_dtype=out_dtype, transpose_b=transpose_b, max_m=max_m,
            alignment=alignment, scaling=scaling, fast_accum=fast_accum,
            capability=blas.capability if fp8 else None)
        self.n, self.k, self.max_m = int(n), int(k), int(max_m)
        self.transpose_b, self.bias = bool(transpose_b), bool(bias)
        self.fast_accum = bool(fast_accum)
        self.alignment = int(alignment)
        # CUBLASLT_EPILOGUE_BIAS's vector: D's type, except bf16 for an FP8 GEMM's fp32 output.
        self.bias_dtype = "bfloat16" if fp8 and self.out_dtype == "float32" else self.out_dtype
        self._align_mask = self.alignment - 1
        self._blas = blas
        self._handle = blas.handle
        self._ws_ptr, self._ws_size = blas.workspace_ptr, blas.workspace_size
        self._matmul = lt.matmul
        self._error = lt.cuBLASLtError
        self._desc = self._pref = self._a = 0
        self._layouts: list[int] = []
        self._by_m: dict[int, tuple[int, int, int]] = {}
        self._algos: list[np.ndarray] = []  # owns the algorithm structs _by_m points into
        self._buckets: dict[int, np.ndarray] = {}
        try:
            self._build(lt, cublas)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        form = "X @ E^T" if self.transpose_b else "X @ W"
        scales = f", {self.scaling} scales" if self.scaling else ""
        return (f"{type(self).__name__}({form}, N={self.n}, K={self.k}, {self.dtype} -> "
                f"{self.out_dtype}{scales}{', bias' if self.bias else ''}, M<={self.max_m})")

    # ------------------------------------------------------------------ plan time

    def _build(self, lt, cublas) -> None:
        mda = lt.MatmulDescAttribute
        self._desc = _call("cublasLtMatmulDescCreate", lt.matmul_desc_create,
                           int(cublas.ComputeType.COMPUTE_32F), CUDA_R["float32"])
        setd = lt.get_matmul_desc_attribute_dtype

        def set_desc(attr, value):
            _set_attr("cublasLtMatmulDescSetAttribute", lt.matmul_desc_set_attribute, setd,
                      self._desc, attr, value)

        op_a = cublas.Operation.T if self.transpose_b else cublas.Operation.N
        set_desc(mda.TRANSA, int(op_a))
        set_desc(mda.TRANSB, int(cublas.Operation.N))
        # The bias pointer lives in the descriptor; run() rewrites it only when it changes.
        self._set_desc = lt.matmul_desc_set_attribute
        self._bias = _PointerAttr(lt, mda.BIAS_POINTER)
        if self.bias:
            set_desc(mda.EPILOGUE, int(lt.Epilogue.BIAS))
        self._describe(lt, set_desc)
        # A: W as stored is column-major N x K (ld N); E as stored is K x N (ld K), used as E^T.
        rows, cols = (self.k, self.n) if self.transpose_b else (self.n, self.k)
        self._a = self._layout(self.dtype, rows, cols, rows)

        self._alpha = np.ones(1, dtype=np.float32)  # the scale type is fp32
        self._beta = np.zeros(1, dtype=np.float32)
        self._alpha_ptr, self._beta_ptr = self._alpha.ctypes.data, self._beta.ctypes.data

        self._pref = _call("cublasLtMatmulPreferenceCreate", lt.matmul_preference_create)
        pa = lt.MatmulPreferenceAttribute

        def set_pref(attr, value):
            _set_attr("cublasLtMatmulPreferenceSetAttribute", lt.matmul_preference_set_attribute,
                      lt.get_matmul_preference_attribute_dtype, self._pref, attr, value)

        self._ws_budget = max(0, self._ws_size - _WORKSPACE_SLACK)
        set_pref(pa.MAX_WORKSPACE_BYTES, self._ws_budget)
        for attr in (pa.MIN_ALIGNMENT_A_BYTES, pa.MIN_ALIGNMENT_B_BYTES,
                     pa.MIN_ALIGNMENT_C_BYTES, pa.MIN_ALIGNMENT_D_BYTES):
            set_pref(attr, min(self.alignment, 256))

        for bucket in m_buckets(self.max_m):
            self.prepare(bucket)

    def _describe(self, lt, set_desc) -> None:
        """Descriptor attributes beyond types, transposes and the bias epilogue: none here."""

    def _layout(self, dtype: str, rows: int, cols: int, ld: int) -> int:
        layout = _call("cublasLtMatrixLayoutCreate", self._lt.matrix_layout_create,
                       CUDA_R[dtype], rows, cols, ld,
                       context=f"{dtype} {rows} x {cols}, ld {ld}")
        self._layouts.append(layout)
        return layout

    def _heuristic(self, b: int, d: int, m: int) -> np.ndarray:
        """The algorithms cuBLASLt's heuristics rank for this plan at M = m, best first."""
        lt = self._lt
        results = np.zeros(_HEURISTIC_COUNT, dtype=lt.matmul_heuristic_result_dtype)
        count = np.zeros(1, dtype=np.int32)
        _call("cublasLtMatmulAlgoGetHeuristic", lt.matmul_algo_get_heuristic, self._handle,
              self._desc, self._a, b, d, d, self._pref, _HEURISTIC_COUNT, results.ctypes.data,
              count.ctypes.data, context=f"{self!r} at M={m}")
        results = results[:int(count[0])]
        results = results[(results["state"] == 0)
                          & (results["workspace_size"] <= self._ws_budget)]
        if not len(results):
            raise CublasError("cublasLtMatmulAlgoGetHeuristic", None,
                              f"no algorithm for {self!r} at M={m} within a "
                              f"{self._ws_budget}-byte workspace")
        return results

    def _checked(self, candidates: np.ndarray, b: int, d: int) -> np.ndarray | None:
        """The first candidate cublasLtMatmulAlgoCheck accepts for these exact layouts."""
        lt = self._lt
        result = np.zeros(1, dtype=lt.matmul_heuristic_result_dtype)
        for i in range(len(candidates)):
            algo = candidates[i:i + 1].copy()
            try:
                lt.matmul_algo_check(self._handle, self._desc, self._a, b, d, d,
                                     algo.ctypes.data, result.ctypes.data)
            except lt.cuBLASLtError:
                continue
            if int(result[0]["workspace_size"]) <= self._ws_budget:
                return algo
        return None

    def prepare(self, *ms: int) -> None:
        """Build the per-M state (B and D layouts, the algorithm) for each M now. Host-only;
        call it for every M a CUDA graph will capture, before the capture."""
        if not self._desc:
            raise ValueError(f"{self!r} is closed")
        for m in ms:
            m = int(m)
            if m in self._by_m:
                continue
            if not 1 <= m <= self.max_m:
                raise ValueError(f"M={m} is outside 1..{self.max_m} of {self!r}")
            b = self._layout(self.dtype, self.k, m, self.k)       # X as stored: K x M, ld K
            d = self._layout(self.out_dtype, self.n, m, self.n)   # Y as stored: N x M, ld N
            bucket = next(x for x in m_buckets(self.max_m) if x >= m)
            if bucket == m:
                self._buckets[m] = self._heuristic(b, d, m)
                algo = self._buckets[m][:1].copy()
            else:
                if bucket not in self._buckets:
                    self.prepare(bucket)
                algo = self._checked(self._buckets[bucket], b, d)
                if algo is None:  # none of the bucket's algorithms fits this M: ask for it
                    algo = self._heuristic(b, d, m)[:1].copy()
            self._algos.append(algo)
            # algo (cublasLtMatmulAlgo_t) sits at offset 0 of the heuristic-result struct
            self._by_m[m] = (b, d, algo.ctypes.data)

    # ------------------------------------------------------------------ run time

    def run(self, x_ptr: int, w_ptr: int, y_ptr: int, m: int, stream: int,
            bias_ptr: int | None = None) -> None:
        """Enqueue Y = X @ W (+ bias) on `stream` as one cublasLtMatmul; returns at once.

        x_ptr: X[m, K]; w_ptr: W[K, N] (or E[N, K] with transpose_b); y_ptr: Y[m, N] in the
        out dtype; bias_ptr: bias[N] in plan.bias_dtype (the out dtype but for FP8 plans'
        fp32 output), required iff the plan has a bias.
        stream: a cudaStream_t/CUstream as an int (torch: stream.cuda_stream), 0 = legacy."""
        entry = self._by_m.get(m)
        if entry is None:
            self.prepare(m)
            entry = self._by_m[m]
        if (x_ptr | w_ptr | y_ptr) & self._align_mask:
            raise ValueError(f"{self!r}: X, W and Y must be {self.alignment}-byte aligned "
                             f"(got {x_ptr:#x}, {w_ptr:#x}, {y_ptr:#x})")
        if bias_ptr is not None or self.bias:
            self._use_bias(bias_ptr)
        b, d, algo = entry
        try:
            self._matmul(self._handle, self._desc, self._alpha_ptr, w_ptr, self._a, x_ptr, b,
                         self._beta_ptr, y_ptr, d, y_ptr, d, algo, self._ws_ptr,
                         self._ws_size, int(stream))
        except self._error as exc:
            raise CublasError("cublasLtMatmul", getattr(exc, "status", None),
                              f"{self!r} at M={m}; {exc}") from exc

    def _use_bias(self, bias_ptr: int | None) -> None:
        if not self.bias:
            raise ValueError(f"{self!r} was planned without a bias; plan with bias=True")
        if not bias_ptr:
            raise ValueError(f"{self!r} needs a bias pointer")
        if bias_ptr != self._bias.value:
            self._bias.write(self, bias_ptr)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Destroy the descriptors (idempotent). The Blas closes its plans when it closes."""
        lt = self._lt
        for layout in self._layouts:
            _call("cublasLtMatrixLayoutDestroy", lt.matrix_layout_destroy, layout)
        self._layouts.clear()
        self._by_m.clear()
        self._algos.clear()
        self._buckets.clear()
        if self._pref:
            pref, self._pref = self._pref, 0
            _call("cublasLtMatmulPreferenceDestroy", lt.matmul_preference_destroy, pref)
        if self._desc:
            desc, self._desc = self._desc, 0
            _call("cublasLtMatmulDescDestroy", lt.matmul_desc_destroy, desc)


class Fp8GemmPlan(GemmPlan):
    """Y[m, N] = (Xq[m, K] @ Wq[N, K]^T) * x_scale * w_scale (+ bias[N]): float8 E4M3 X and
    W (the weight as stored, [out, in]), fp32 scales, Y in bf16/fp16/fp32. Made by Blas.plan
    with dtype="float8e4m3fn"; see "FP8 (E4M3) W8A8" in the module docstring.

    scaling "channel": w_scale is fp32 [N] (per output channel), x_scale fp32 [>= m] (row i
    of X scaled by x_scale[i]; a per-tensor scale repeated); "tensor": one fp32 each."""

    def _describe(self, lt, set_desc) -> None:
        mda = lt.MatmulDescAttribute
        if self.scaling == "channel":
            # cuBLASLt's outer-vector mode needs both modes set (one alone is not a mode).
            mode = int(lt.MatmulMatrixScale.OUTER_VEC_32F)
            set_desc(mda.A_SCALE_MODE, mode)
            set_desc(mda.B_SCALE_MODE, mode)
        if self.bias:
            set_desc(mda.BIAS_DATA_TYPE, CUDA_R[self.bias_dtype])
        if self.fast_accum:
            set_desc(mda.FAST_ACCUM, 1)
        # A = W as stored, B = X as stored (the layout trick): A's scale is the weight's.
        self._w_scale = _PointerAttr(lt, mda.A_SCALE_POINTER)
        self._x_scale = _PointerAttr(lt, mda.B_SCALE_POINTER)
        # Vectors 16-byte aligned like every FP8 operand; a scalar is one float.
        self._scale_mask = 15 if self.scaling == "channel" else 3
        # Heuristics and AlgoCheck never read the scales, but they see the descriptor: give
        # them the state run() will give it (scale pointers set), with a pointer that is real
        # device memory. run() replaces both before any matmul.
        if self._ws_ptr:
            self._w_scale.write(self, self._ws_ptr)
            self._x_scale.write(self, self._ws_ptr)

    def _heuristic(self, b: int, d: int, m: int) -> np.ndarray:
        try:
            return super()._heuristic(b, d, m)
        except CublasError as exc:
            cc = self._blas.capability
            if self.scaling != "channel" or cc in OUTER_VEC_CAPABILITIES:
                raise
            raise CublasError(exc.call, exc.status, (
                f"{exc.detail}; cuBLASLt documents per-channel FP8 scaling (OUTER_VEC_32F) for "
                f"compute capability 9.0 and this GPU is {cc[0]}.{cc[1]}: plan with "
                "scaling='tensor' (one weight scale) here")) from exc

    def run(self, x_ptr: int, w_ptr: int, y_ptr: int, m: int, stream: int,
            bias_ptr: int | None = None, *, w_scale_ptr: int | None = None,
            x_scale_ptr: int | None = None) -> None:
        """Enqueue Y = (X @ W^T) * x_scale * w_scale (+ bias) on `stream` as one
        cublasLtMatmul. Pointers as GemmPlan.run (X [m, K] and W [N, K] in E4M3), plus
        w_scale_ptr: fp32 [N] ("channel") or [1] ("tensor"), the weight's dequantization
        scale; x_scale_ptr: fp32 [>= m] ("channel") or [1] ("tensor"), the activation's.
        cuBLASLt reads both when the matmul runs (a graph replay reads their contents then)."""
        if not w_scale_ptr or not x_scale_ptr:
            raise ValueError(f"{self!r} needs w_scale_ptr and x_scale_ptr (fp32 device "
                             "pointers)")
        if (w_scale_ptr | x_scale_ptr) & self._scale_mask:
            raise ValueError(f"{self!r}: scale pointers must be {self._scale_mask + 1}-byte "
                             f"aligned (got {w_scale_ptr:#x}, {x_scale_ptr:#x})")
        if w_scale_ptr != self._w_scale.value:
            self._w_scale.write(self, w_scale_ptr)
        if x_scale_ptr != self._x_scale.value:
            self._x_scale.write(self, x_scale_ptr)
        GemmPlan.run(self, x_ptr, w_ptr, y_ptr, m, stream, bias_ptr)
